"""Embedder throughput: the naive way vs mining's, side by side in one run.

naive  = what the original system did: full-resolution decode, LANCZOS resize of the whole
         image, centre crop, batch 1, onnxruntime with default session options.
ours   = mining.embed: draft-mode JPEG decode + crop-only resize, batches of
         MINING_EMBED_BATCH_SIZE, tuned intra-op threads, decoding overlapped with inference.

Each mode runs in its own subprocess so peak RSS (getrusage ru_maxrss) is its own. Both
embed the same full-resolution photos (../shared/data/photos by default); the table also
reports the mean cosine similarity between the two modes' embeddings (same model, so it
shows the faster preprocessing does not change what the model sees).

    .venv/bin/python bench/bench_embed.py [--photos DIR] [--limit N] [--repeat R] [--rounds K]

CPU ms/image (user + system time of the process) is shown too: on a machine shared with
other work, wall-clock throughput swings, CPU time per image much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _photos(folder: Path, limit: int, repeat: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    files = files[:limit] if limit else files
    return files * repeat


def _settings():  # type: ignore[no-untyped-def]
    from mining.models import build
    from mining.settings import load_settings

    settings = load_settings()
    build(settings, settings.embedder)
    return settings


def run_naive(paths: list[Path]) -> np.ndarray:
    import onnxruntime as ort
    from PIL import Image

    from mining.models import load_spec, model_path

    settings = _settings()
    spec = load_spec(settings, settings.embedder)
    pre = spec.preprocess
    sess = ort.InferenceSession(str(model_path(settings, spec.name)), providers=["CPUExecutionProvider"])
    out_name = spec.outputs[0] if spec.outputs else sess.get_outputs()[0].name
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    vecs = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")  # full-resolution decode
            r = pre.resize / min(im.size)
            im = im.resize((round(im.width * r), round(im.height * r)), Image.Resampling.LANCZOS)
            left, top = (im.width - pre.crop) // 2, (im.height - pre.crop) // 2
            im = im.crop((left, top, left + pre.crop, top + pre.crop))
            x = (np.asarray(im, np.float32) * pre.scale - mean) / std
        v = sess.run([out_name], {spec.input_name: x.transpose(2, 0, 1)[None]})[0][0]
        vecs.append(v / np.linalg.norm(v))
    return np.stack(vecs)


def run_ours(paths: list[Path]) -> np.ndarray:
    from mining.embed import load_embedder

    res = load_embedder(_settings()).embed_paths(paths)
    assert res.ok.all(), [e for e in res.errors if e]
    return res.vectors


def child(mode: str, paths: list[Path], out: Path) -> None:
    fn = run_naive if mode == "naive" else run_ours
    fn(paths[:2])  # warm-up: session creation and first-run allocations are not throughput
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    vecs = fn(paths)
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    np.save(out.with_suffix(".npy"), vecs)
    out.write_text(json.dumps({"mode": mode, "n": len(paths), "seconds": elapsed, "cpu_seconds": cpu,
                               "peak_rss_mb": r1.ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    ap.add_argument("--limit", type=int, default=0, help="use the first N photos (0: all)")
    ap.add_argument("--repeat", type=int, default=1, help="embed the list this many times")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the modes this many times and keep each one's best (noisy machines)")
    ap.add_argument("--child", choices=["naive", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    paths = _photos(args.photos, args.limit, args.repeat)
    if args.child:
        child(args.child, paths, args.out)
        return
    if not paths:
        sys.exit(f"no photos under {args.photos}")
    results: dict[str, dict] = {}
    vecs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(max(1, args.rounds)):
            for mode in ("naive", "ours"):
                out = Path(tmp) / f"{mode}.json"
                cmd = [sys.executable, __file__, "--child", mode, "--out", str(out), "--photos", str(args.photos),
                       "--limit", str(args.limit), "--repeat", str(args.repeat)]
                subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                got = json.loads(out.read_text())
                if mode not in results or got["seconds"] < results[mode]["seconds"]:
                    results[mode] = got
                vecs[mode] = np.load(out.with_suffix(".npy"))
    cos = float(np.mean(np.sum(vecs["naive"] * vecs["ours"], axis=1)))
    base = results["naive"]["n"] / results["naive"]["seconds"]
    from mining.settings import load_settings

    s = load_settings()
    print(f"\nEmbedder `{s.embedder}`, {len(paths)} photos from {args.photos} ({os.cpu_count()} cores), "
          f"batch {s.embed_batch_size}, intra-op threads {s.intra_op_threads or 'all'}\n")
    print("| mode | images/s | ms/image | CPU ms/image | peak RSS (MB) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, label in (("naive", "naive: full decode + LANCZOS, batch 1, default session"),
                        ("ours", "mining: draft decode + crop resize, batched, tuned, overlapped")):
        r = results[mode]
        ips = r["n"] / r["seconds"]
        cpu_ms = 1000 * r["cpu_seconds"] / r["n"]
        print(f"| {label} | {ips:.1f} | {1000 / ips:.1f} | {cpu_ms:.1f} | {r['peak_rss_mb']:.0f} | {ips / base:.2f}x |")
    print(f"\nmean cosine(naive, ours) over the same photos: {cos:.4f}")


if __name__ == "__main__":
    main()
