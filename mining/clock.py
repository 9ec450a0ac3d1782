"""The one place mining reads time or sleeps.

Rate limiting, backoff and deadlines call these instead of ``time`` directly, so tests can
install a virtual clock (sleeping advances it instantly) and still assert real timing
properties such as "never more than N requests in any 60 s window".
"""

from __future__ import annotations

import time as _time


def monotonic() -> float:
    return _time.monotonic()


def now() -> float:
    """Wall-clock seconds since the epoch."""
    return _time.time()


def sleep(seconds: float) -> None:
    if seconds > 0:
        _time.sleep(seconds)
