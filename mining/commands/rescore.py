"""`mining rescore`: re-score stored embeddings with the active novelty model, beside the old scores."""

from __future__ import annotations

import argparse
import json
import time

from mining.commands._common import add_interval_args, interval_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rescore", help="re-score an interval's stored embeddings with the active novelty model "
                                       "(no downloads; old scores are kept)")
    add_interval_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mining.pipeline import record_run, settings_for_run
    from mining.warehouse import rescore

    settings = settings_for_run()
    interval = interval_from(args)
    started = time.time()
    result = rescore(settings, interval)
    record_run(settings, "cli", f"cli:{interval.key}", "rescore", interval, started, result)
    print(json.dumps(result.as_dict()))
    return 0
