"""A polite Reddit API client: OAuth or anonymous, budgeted, retried, never leaking secrets.

Reddit bans clients that burst, retry blindly or hide behind browser User-Agents, and a
crawl that dies on one 500 loses the hour. So every request goes through one
:class:`RequestBudget` (a sliding 60 s window, tightened further by Reddit's own
``X-Ratelimit-*`` headers), 429s wait exactly what ``Retry-After`` asks, 5xx and network
errors back off exponentially with jitter, and only a request that exhausts its retries
raises :class:`RedditError` (a run-level failure the caller may record per source).
All waiting goes through :mod:`mining.clock` so tests run on a virtual clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import threading
from collections import deque
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import requests

from mining import clock
from mining.lake import atomic_write_bytes
from mining.settings import Settings

log = logging.getLogger(__name__)

WINDOW_S = 60.0
# Requests are stamped when the client sends them but logged when the server receives
# them; a small margin keeps "no 60 s window over budget" true on the server's side too.
WINDOW_MARGIN_S = 0.5
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
TOKEN_RENEW_MARGIN_S = 300.0
URL_FIELDS = ("url", "url_overridden_by_dest", "thumbnail", "preview", "media_metadata", "gallery_data",
              "media", "secure_media")


class RedditError(RuntimeError):
    """A Reddit request failed for good (retries exhausted, refused, or unreadable)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ---- escaping ----------------------------------------------------------------------
def _unescape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("&amp;", "&") if "&amp;" in value else value
    if isinstance(value, dict):
        return {k: _unescape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unescape(v) for v in value]
    return value


def unescape_post(post: dict) -> dict:
    """A copy of ``post`` whose URL fields hold plain ``&`` instead of ``&amp;``.

    Reddit HTML-escapes URLs in ``preview``/``media_metadata``/``url`` unless asked for
    ``raw_json=1``; some servers and proxies ignore that flag, and an escaped URL 404s.
    Titles and text are left alone: only URL-bearing fields are touched. Crosspost
    parents are unescaped the same way.
    """
    out = dict(post)
    for key in URL_FIELDS:
        if key in out:
            out[key] = _unescape(out[key])
    parents = out.get("crosspost_parent_list")
    if isinstance(parents, list):
        out["crosspost_parent_list"] = [unescape_post(p) if isinstance(p, dict) else p for p in parents]
    return out


# ---- budget ------------------------------------------------------------------------
class RequestBudget:
    """At most ``per_minute`` requests in ANY 60 s window, for every client sharing it.

    In-process the window is a deque of send times; with ``shared_path`` the same window
    lives in a small JSON file under an ``flock``, so the hourly scrape and the collector
    running in separate processes share one budget. Reddit's headers can only tighten it:
    when ``X-Ratelimit-Remaining`` reaches 0 everyone waits for ``X-Ratelimit-Reset``.
    """

    def __init__(self, per_minute: int, shared_path: Path | None = None, window_s: float = WINDOW_S) -> None:
        if per_minute < 1:
            raise ValueError("budget must allow at least one request per minute")
        self.per_minute = per_minute
        self.window_s = window_s + WINDOW_MARGIN_S
        self.shared_path = shared_path
        self.waited_s = 0.0
        self._sent: deque[float] = deque()
        self._blocked_until = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block (via clock.sleep) until a request may be sent; return seconds waited."""
        waited = 0.0
        with self._lock:
            while True:
                wait = self._try_take(clock.now())
                if wait <= 0:
                    break
                clock.sleep(wait)
                waited += wait
        self.waited_s += waited
        if waited:
            log.debug("request budget: waited %.1fs", waited)
        return waited

    def _try_take(self, now: float) -> float:
        """Record a send at ``now`` and return 0, or return how long to wait."""
        with self._shared_state() as state:
            sent = state["sent"]
            while sent and sent[0] <= now - self.window_s:
                sent.popleft()
            blocked = max(self._blocked_until, state["blocked_until"])
            if blocked > now:
                return blocked - now
            if len(sent) >= self.per_minute:
                return sent[0] + self.window_s - now + 1e-3
            sent.append(now)
            return 0.0

    @contextlib.contextmanager
    def _shared_state(self) -> Iterator[dict[str, Any]]:
        if self.shared_path is None:
            state = {"sent": self._sent, "blocked_until": self._blocked_until}
            yield state
            self._blocked_until = state["blocked_until"]
            return
        self.shared_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.shared_path.with_suffix(".lock")
        with open(lock_path, "a") as lock_fh:
            fcntl.flock(lock_fh, fcntl.LOCK_EX)
            try:
                try:
                    raw = json.loads(self.shared_path.read_text())
                except (OSError, ValueError):
                    raw = {}
                state = {"sent": deque(float(t) for t in raw.get("sent", [])),
                         "blocked_until": float(raw.get("blocked_until", 0.0))}
                before = (list(state["sent"]), state["blocked_until"])
                yield state
                if (list(state["sent"]), state["blocked_until"]) != before:
                    payload = {"sent": list(state["sent"]), "blocked_until": state["blocked_until"]}
                    atomic_write_bytes(json.dumps(payload).encode(), self.shared_path)
            finally:
                fcntl.flock(lock_fh, fcntl.LOCK_UN)

    def block_for(self, seconds: float) -> None:
        """Stop every sender for ``seconds`` (Reddit said the window is used up)."""
        until = clock.now() + max(0.0, seconds)
        with self._lock, self._shared_state() as state:
            state["blocked_until"] = max(state["blocked_until"], until)
        self._blocked_until = max(self._blocked_until, until)

    def observe(self, headers: Any) -> None:
        """Apply ``X-Ratelimit-Remaining/Used/Reset`` from a response."""
        remaining = _float_header(headers, "X-Ratelimit-Remaining")
        reset = _float_header(headers, "X-Ratelimit-Reset")
        used = _float_header(headers, "X-Ratelimit-Used")
        if remaining is None:
            return
        log.debug("ratelimit: used=%s remaining=%s reset=%s", used, remaining, reset)
        if remaining < 1:
            self.block_for(reset if reset is not None else WINDOW_S)


def _float_header(headers: Any, name: str) -> float | None:
    raw = headers.get(name) if headers is not None else None
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _retry_after(headers: Any) -> float | None:
    raw = headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - clock.now())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: about 1, 2, 4, ... s (capped), never synchronised."""
    base = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2**attempt))
    return base * (0.5 + 0.5 * (rng or random).random())


# ---- client ------------------------------------------------------------------------
class RedditClient:
    """Reddit listings over OAuth (client credentials) or anonymous JSON.

    One client (and its budget) serves a whole run; pass ``budget`` to share it wider.
    Not thread-safe: give each thread its own client (the budget is shared through the
    state file, or pass one ``RequestBudget`` to all of them).
    """

    def __init__(self, settings: Settings, budget: RequestBudget | None = None,
                 session: requests.Session | None = None) -> None:
        self.settings = settings
        self.base_url = settings.api_base_url
        self.oauth = settings.oauth
        self.budget = budget or RequestBudget(settings.budget_per_minute,
                                              shared_path=settings.state_dir / "reddit_budget.json")
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = settings.user_agent
        self.requests_sent = 0
        self._last_network_error = ""
        self._token: str | None = None
        self._token_expires = 0.0
        self._rng = random.Random()
        key = f"{settings.reddit_client_id}|{settings.reddit_token_url}|{self.base_url}"
        self._token_key = hashlib.sha256(key.encode()).hexdigest()[:16]

    # -- public --------------------------------------------------------------------
    def listing(self, source: str, after: str | None = None, limit: int | None = None,
                before: str | None = None, sort: str = "new") -> dict[str, Any]:
        """One page of ``/r/<source>/<sort>``: ``{"after": str|None, "posts": [post, ...]}``."""
        name = source.removeprefix("r/")
        path = f"/r/{name}/{sort}" if self.oauth else f"/r/{name}/{sort}.json"
        params: dict[str, Any] = {"limit": limit or self.settings.listing_page_size, "raw_json": 1}
        if after:
            params["after"] = after
        if before:
            params["before"] = before
        body = self.get_json(path, params)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("children"), list):
            raise RedditError(f"unexpected listing shape from GET {path}: no data.children")
        posts = [unescape_post(c["data"]) for c in data["children"]
                 if isinstance(c, dict) and c.get("kind") == "t3" and isinstance(c.get("data"), dict)]
        return {"after": data.get("after"), "before": data.get("before"), "posts": posts}

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET ``path`` on the API with budget, retries and auth; the parsed JSON body."""
        params = {"raw_json": 1, **(params or {})}
        url = self.base_url + path
        what = f"GET {path}"
        reauthed = False
        attempt = 0
        last = "no attempt"
        while True:
            headers = {"Authorization": f"bearer {self._access_token()}"} if self.oauth else {}
            resp = self._send("GET", url, what, params=params, headers=headers)
            if resp is not None:
                status = resp.status_code
                if status == 200:
                    try:
                        return resp.json()
                    except ValueError as exc:
                        last = f"malformed JSON from {what}: {exc} (body starts {resp.text[:40]!r})"
                elif status == 401 and self.oauth and not reauthed:
                    log.info("%s: 401, renewing the access token", what)
                    self._drop_token()
                    reauthed = True
                    continue
                elif status == 429:
                    wait = _retry_after(resp.headers)
                    last = f"{what}: 429 Too Many Requests"
                    if attempt < self.settings.max_retries:
                        wait = wait if wait is not None else backoff_delay(attempt, self._rng)
                        log.warning("%s: 429, waiting %.1fs (Retry-After)", what, wait)
                        clock.sleep(wait)
                        attempt += 1
                        continue
                elif status >= 500:
                    last = f"{what}: HTTP {status}"
                else:
                    raise RedditError(f"{what}: HTTP {status} (not retried)", status)
            else:
                last = self._last_network_error
            if attempt >= self.settings.max_retries:
                raise RedditError(f"{last}; gave up after {attempt + 1} attempts",
                                  resp.status_code if resp is not None else None)
            delay = backoff_delay(attempt, self._rng)
            log.warning("%s; retry %d/%d in %.1fs", last, attempt + 1, self.settings.max_retries, delay)
            clock.sleep(delay)
            attempt += 1

    # -- transport -----------------------------------------------------------------
    def _send(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response | None:
        """One budgeted request; None on a network error (recorded, never with secrets)."""
        self.budget.acquire()
        self.requests_sent += 1
        try:
            resp = self.session.request(method, url, timeout=self.settings.request_timeout_s, **kwargs)
        except requests.RequestException as exc:
            # The exception text can hold the URL but never headers/auth; keep only its type.
            self._last_network_error = f"{what}: {type(exc).__name__}"
            return None
        self.budget.observe(resp.headers)
        return resp

    # -- OAuth token -----------------------------------------------------------------
    @property
    def _token_path(self) -> Path:
        return self.settings.state_dir / "reddit_token.json"

    def _access_token(self) -> str:
        now = clock.now()
        if self._token is None:
            self._load_token()
        if self._token is None or now >= self._token_expires:
            self._fetch_token()
        assert self._token is not None
        return self._token

    def _load_token(self) -> None:
        try:
            cached = json.loads(self._token_path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(cached, dict) and cached.get("key") == self._token_key and cached.get("access_token"):
            self._token = str(cached["access_token"])
            self._token_expires = float(cached.get("renew_at", 0.0))

    def _drop_token(self) -> None:
        self._token, self._token_expires = None, 0.0
        with contextlib.suppress(OSError):
            self._token_path.unlink()

    def _fetch_token(self) -> None:
        s = self.settings
        what = "POST access_token"
        attempt = 0
        while True:
            resp = self._send("POST", s.reddit_token_url, what,
                              auth=(s.reddit_client_id, s.reddit_client_secret.value),
                              data={"grant_type": "client_credentials"})
            if resp is not None and resp.status_code == 200:
                try:
                    body = resp.json()
                    token = str(body["access_token"])
                    ttl = float(body.get("expires_in", 3600))
                except (ValueError, KeyError, TypeError):
                    raise RedditError(f"{what}: malformed token response") from None
                break
            if resp is not None and resp.status_code in (400, 401, 403):
                raise RedditError(f"{what}: HTTP {resp.status_code}: Reddit refused the client credentials "
                                  "(check MINING_REDDIT_CLIENT_ID / MINING_REDDIT_CLIENT_SECRET)",
                                  resp.status_code)
            last = self._last_network_error if resp is None else f"{what}: HTTP {resp.status_code}"
            if attempt >= s.max_retries:
                raise RedditError(f"{last}; gave up after {attempt + 1} attempts")
            wait = _retry_after(resp.headers) if resp is not None and resp.status_code == 429 else None
            clock.sleep(wait if wait is not None else backoff_delay(attempt, self._rng))
            attempt += 1
        margin = min(TOKEN_RENEW_MARGIN_S, ttl * 0.1)
        self._token, self._token_expires = token, clock.now() + ttl - margin
        payload = json.dumps({"key": self._token_key, "access_token": token, "renew_at": self._token_expires})
        self._token_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(payload.encode(), self._token_path)  # mkstemp creates it 0600
        os.chmod(self._token_path, 0o600)
        log.info("obtained a Reddit access token (valid %.0fs)", ttl)
