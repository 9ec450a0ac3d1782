"""`mining load`: load an interval's lake partitions into the warehouse (idempotent)."""

from __future__ import annotations

import argparse
import json

from mining.commands._common import add_interval_args, interval_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("load", help="load an interval's lake partitions into the DuckDB warehouse")
    add_interval_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mining.pipeline import run_step, settings_for_run

    result = run_step(settings_for_run(), interval_from(args), "load")
    print(json.dumps(result.as_dict()))
    return 0
