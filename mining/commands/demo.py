"""`mining demo`: the offline end-to-end demo (see mining/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="replay a realistic Reddit hour locally and mine it through Airflow")
    p.add_argument("--home", type=Path, help="where the demo keeps its data (default ./demo-home, wiped)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mining.demo import run_demo

    return run_demo(args.home)
