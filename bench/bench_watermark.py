"""Watermark stage throughput: naive decoding vs ours, side by side, on full-resolution photos.

naive: full JPEG decode, LANCZOS resize to the detector's resolution, one image at a time
       (how the original system fed its classifier).
naive-512: the same, at the original system's 512x512 input, when the detector serves at
       another size (the model is fully convolutional, so it runs at either).
ours:  ``WatermarkDetector.predict_paths``: JPEG DCT-scaled draft decode straight to about
       the detector's resolution, on a worker thread overlapped with the models.
decode-naive / decode-ours: the decoding alone, so the table shows how much of the stage the
       models take: even free decoding speeds the stage by at most naive / (naive - decoding).
Each mode runs in its own process so peak RSS is its own. Needs a trained detector
(``mining watermark train``); without one a throwaway head is trained on 4 photos (the
timing does not depend on the head's quality).

    python bench/bench_watermark.py [PHOTO_DIR] [--n 64]
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = ROOT.parent / "shared" / "data" / "photos"
BATCH = 4  # what the pipeline's score step passes to predict_paths (its default)
ORIGINAL_SIZE = 512  # the original system's classifier input


def _worker(mode: str, models_dir: str, files: list[str]) -> None:
    from PIL import Image

    from mining.settings import load_settings
    from mining.watermark import load_detector, open_for_detection

    settings = load_settings(models_dir=Path(models_dir))
    det = load_detector(settings)
    assert det is not None
    # Warm-up at the batch shape each mode runs: session initialisation is not throughput.
    det.predict([Image.new("RGB", (64, 64))] * (1 if mode == "naive" else BATCH))
    t0 = time.perf_counter()
    if mode == "naive-512":
        det.input_size = det.decode_size = ORIGINAL_SIZE  # type: ignore[attr-defined]
        det.predict([Image.new("RGB", (64, 64))])
        t0 = time.perf_counter()
    if mode in ("naive", "naive-512", "decode-naive"):
        for f in files:
            with Image.open(f) as im:
                im = im.convert("RGB")
                scale = det.decode_size / max(im.size)
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            if mode != "decode-naive":
                det.predict([im])
    elif mode == "decode-ours":
        for f in files:
            open_for_detection(f, det.decode_size)
    else:
        det.predict_paths(files, batch=BATCH)
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "images": len(files), "seconds": seconds, "rss_mb": rss_mb}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("photos", nargs="?", type=Path, default=DEFAULT_PHOTOS)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.worker:
        _worker(args.worker[0], args.worker[1], rest)
        return 0
    from mining.settings import load_settings
    from mining.watermark import list_images, load_detector, train

    files = [str(p) for p in list_images(args.photos)][: args.n]
    settings = load_settings()
    models_dir = settings.models_dir
    detector = load_detector(settings)
    if detector is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-wm-"))
        small = tmp / "clean"
        small.mkdir()
        for f in files[:4]:
            (small / Path(f).name).symlink_to(f)
        models_dir = tmp / "models"
        train(settings.replace(models_dir=models_dir, home=tmp), small, n_per_image=2, neg_per_image=1)
        detector = load_detector(settings.replace(models_dir=models_dir))
    extra = ("naive-512",) if getattr(detector, "input_size", ORIGINAL_SIZE) != ORIGINAL_SIZE else ()
    results = {}
    for mode in ("naive", *extra, "ours", "decode-naive", "decode-ours"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, str(models_dir), *files],
                             check=True, capture_output=True, text=True, cwd=ROOT)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["naive"]["images"] / results["naive"]["seconds"]
    print(f"Watermark stage on {len(files)} full-resolution photos from {args.photos}:\n")
    print("| mode | images/s | vs naive | peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    for mode, r in results.items():
        ips = r["images"] / r["seconds"]
        print(f"| {mode} | {ips:.2f} | {ips / base:.2f}x | {r['rss_mb']:.0f} |")
    per = {m: 1000 * r["seconds"] / r["images"] for m, r in results.items()}
    models = per["naive"] - per["decode-naive"]
    print(f"\nPer image: naive {per['naive']:.0f} ms, of which decoding {per['decode-naive']:.0f} ms; ours "
          f"decodes in {per['decode-ours']:.0f} ms, overlapped with the models. The models take {models:.0f} ms "
          f"either way, so no decoding strategy can exceed {per['naive'] / models:.2f}x.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
