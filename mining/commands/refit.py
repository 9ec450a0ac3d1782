"""`mining refit`: refit the taste model on the gallery; activate only if at least as good."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("refit", help="refit the novelty model on the gallery, compare, activate if not worse")
    p.add_argument("--week", help="ISO week whose stored embeddings are rescored (default: last complete week)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mining.refit import refit
    from mining.settings import load_settings

    result = refit(load_settings(), args.week, seed=args.seed)
    print(json.dumps(result.as_dict(), indent=2, default=str))
    return 0
