"""Taste-model evaluation table: each novelty model kind side by side on ../shared photos.

The GMM row is the baseline (the original system's recipe); kNN and the automatic choice are
compared with it on the same held-out folds. Also times fitting and scoring per kind and reports
peak RSS. Uses the configured embedder (build it with `.venv/bin/mining models build`).

    .venv/bin/python bench/bench_novelty.py [--liked DIR] [--other DIR] [--seed 0] [--synthetic]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mining import novelty as nv  # noqa: E402
from mining.evaluate import AUTO, evaluate_dirs, evaluate_embeddings  # noqa: E402
from mining.settings import load_settings  # noqa: E402


def synthetic(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((12, 1280)).astype(np.float32)
    draw = lambda cs, n: nv.l2_normalise(cs[rng.integers(0, len(cs), n)] + 1.2 * rng.standard_normal((n, 1280)))  # noqa: E731
    return draw(c[:3], 63), draw(c[3:], 63)


def main() -> None:
    photos = Path(os.environ.get("MINING_SHARED_DIR", ROOT.parent / "shared")) / "data" / "photos"
    p = argparse.ArgumentParser()
    p.add_argument("--liked", type=Path, default=photos / "scenery")
    p.add_argument("--other", type=Path, default=photos / "other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", action="store_true", help="synthetic 1280-d clusters instead of photos")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(env={}, home=home)
        t = time.perf_counter()
        if args.synthetic or not args.liked.is_dir():
            liked, other = synthetic(args.seed)
            report = evaluate_embeddings(liked, other, settings, seed=args.seed)
            source = "synthetic 1280-d clusters"
        else:
            cache = Path(home) / "emb.npz"
            report = evaluate_dirs(settings, args.liked, args.other, seed=args.seed, cache=cache)
            with np.load(cache) as npz:
                liked, other = npz["liked"], npz["other"]
            source = f"{args.liked} vs {args.other} ({settings.embedder})"
        eval_s = time.perf_counter() - t
        timings = []
        for kind in nv.KINDS:
            t = time.perf_counter()
            fitted = nv.fit_and_select(liked, other, settings, seed=args.seed, kinds=(kind,))
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(5):
                fitted.score(other)
            rate = 5 * len(other) / (time.perf_counter() - t)
            timings.append((kind, fit_s, rate))
    base = report.row("gmm").auroc
    print(f"Source: {source}. Evaluation took {eval_s:.1f} s.\n")
    print(report.to_markdown())
    print("\n| model | AUROC vs GMM baseline | fit+select+calibrate | scoring |")
    print("|---|---|---|---|")
    for kind, fit_s, rate in timings:
        print(f"| {kind} | {report.row(kind).auroc / base:.2f}x | {fit_s:.2f} s | {rate:,.0f} img/s |")
    print(f"| {AUTO} | {report.row(AUTO).auroc / base:.2f}x | | |")
    print(f"\nPeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
