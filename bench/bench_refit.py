"""Weekly refit at the original system's scale: 300k liked x 1280-d float32 embeddings.

Times `mining.novelty.refit` (select among kNN/GMM on a held-out split, calibrate, compare with
the active version, refit on all, save, activate) and reports peak RSS. The baseline, run side by
side in its own process, is the original recipe: sklearn's 16-component full-covariance GMM on the
raw float64 embeddings, measured for a few EM iterations on a smaller sample (it cannot finish at
300k x 1280 here) and reported per iteration.

    .venv/bin/python bench/bench_refit.py [--rows 300000] [--dim 1280] [--stream 20000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(rows: int, dim: int, stream: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (float32, generated in chunks: no float64 copy of the whole matrix)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((96, dim), dtype=np.float32)
    liked = np.empty((rows, dim), np.float32)
    unl = np.empty((stream, dim), np.float32)
    for arr, lo, hi in ((liked, 0, 32), (unl, 0, 96)):
        for a in range(0, len(arr), 8192):
            n = min(8192, len(arr) - a)
            block = centres[rng.integers(lo, hi, n)] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            arr[a:a + n] = block
    return liked, unl


def ours(args: argparse.Namespace) -> dict:
    from mining import novelty as nv
    from mining.settings import load_settings

    t0 = time.perf_counter()
    liked, unl = synthetic(args.rows, args.dim, args.stream)
    gen_s, rss_data = time.perf_counter() - t0, peak_rss_mb()
    with tempfile.TemporaryDirectory() as home:
        settings = load_settings(env={}, home=home)
        t = time.perf_counter()
        first = nv.fit_and_select(liked[: args.first], unl, settings, seed=1)  # an older, smaller active version
        nv.activate(settings, nv.save(settings, first).name)
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        result = nv.refit(settings, liked, unl, seed=0)
        refit_s = time.perf_counter() - t
        t = time.perf_counter()
        scores = result.fitted.score(unl)
        score_rate = len(unl) / (time.perf_counter() - t)
    return {"mode": "ours", "rows": args.rows, "dim": args.dim, "stream": args.stream, "generate_s": gen_s,
            "rss_after_data_mb": rss_data, "first_fit_rows": args.first, "first_fit_s": first_s,
            "refit_s": refit_s, "activated": result.activated, "kind": result.fitted.kind,
            "new_auroc": result.new_auroc, "active_auroc": result.active_auroc,
            "pu_auroc": result.fitted.metrics.get("pu_auroc_all_kinds"), "score_per_s": score_rate,
            "threshold": result.fitted.threshold, "accept_share": float((scores >= result.fitted.threshold).mean()),
            "peak_rss_mb": peak_rss_mb(), "input_mb": liked.nbytes / 2**20}


def baseline(args: argparse.Namespace) -> dict:
    from sklearn.mixture import GaussianMixture

    liked, _ = synthetic(args.baseline_rows, args.dim, 10)
    X = liked.astype(np.float64)  # what sklearn works in
    t = time.perf_counter()
    g = GaussianMixture(16, covariance_type="full", max_iter=args.baseline_iters, tol=0.0, random_state=0)
    g.fit(X)
    secs = time.perf_counter() - t
    per_iter = secs / max(1, g.n_iter_)
    return {"mode": "baseline", "rows": args.baseline_rows, "dim": args.dim, "iters": int(g.n_iter_),
            "fit_s": secs, "s_per_iter": per_iter, "s_per_iter_at_full_rows": per_iter * args.rows / args.baseline_rows,
            "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--stream", type=int, default=20_000)
    p.add_argument("--first", type=int, default=20_000, help="size of the older active version's gallery")
    p.add_argument("--baseline-rows", type=int, default=3000)
    p.add_argument("--baseline-iters", type=int, default=3)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--mode", choices=("both", "ours", "baseline"), default="both")
    args = p.parse_args()
    if args.mode != "both":
        print(json.dumps(ours(args) if args.mode == "ours" else baseline(args)))
        return
    runs = {}
    for mode in ("ours", "baseline"):
        if mode == "baseline" and args.skip_baseline:
            continue
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
    o = runs["ours"]
    print(f"Refit over {o['rows']:,} x {o['dim']} float32 embeddings ({o['input_mb']:.0f} MiB input), "
          f"stream {o['stream']:,}; one process per row, peak RSS includes the input.\n")
    print("| run | rows fitted | time | peak RSS | notes |")
    print("|---|---|---|---|---|")
    print(f"| mining refit (select+calibrate+compare+refit+save) | {o['rows']:,} (fits on <= 50k sample) "
          f"| {o['refit_s']:.0f} s | {o['peak_rss_mb']:.0f} MiB | chose {o['kind']}, PU-AUROC {o['pu_auroc']}, "
          f"new {o['new_auroc']:.3f} vs active {o['active_auroc']:.3f}, activated={o['activated']}; "
          f"RSS after data {o['rss_after_data_mb']:.0f} MiB; scoring {o['score_per_s']:.0f} img/s |")
    if "baseline" in runs:
        b = runs["baseline"]
        print(f"| original recipe: GMM 16 full on raw float64 | {b['rows']:,} ({b['iters']} EM iters) "
              f"| {b['s_per_iter']:.1f} s/iter | {b['peak_rss_mb']:.0f} MiB | ~{b['s_per_iter_at_full_rows']:.0f} s "
              f"per EM iteration extrapolated to {o['rows']:,} rows |")
    print()
    print(json.dumps(runs, indent=2, default=str))


if __name__ == "__main__":
    main()
