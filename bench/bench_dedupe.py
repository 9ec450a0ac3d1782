"""Measure perceptual dedupe: recall on repost-style transforms, false matches, query speed.

    .venv/bin/python bench/bench_dedupe.py [--photos DIR] [--limit N] [--skip-speed]

Every photo in ../shared/data/photos is the "gallery" image (hashed from its file, as the
gallery does); each transformation of it is a "repost" (re-encoded as JPEG and hashed from
the bytes, as a downloaded candidate is). A repost is caught when its pHash is within the
threshold of the original's pHash or mirrored pHash (mining.dedupe's rule).

* recall(t, thr): share of (photo, transformation t) reposts caught by their own original.
* false-match rate (FMR): share of ordered pairs (query from photo i, gallery photo j != i)
  that match, over originals and every transformation of i as queries.
Then a query over 1M random hashes is timed, vectorised vs two baselines.
Prints Markdown tables (pasted into docs/dedupe.md).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import resource
import sys
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mining.dedupe import GalleryIndex, distances, hash_bytes, hash_file, pack

SIZES = (8, 16)
# pHash splits at the median, so both sizes give even distances only: even thresholds suffice.
THRESHOLDS = {8: [0, 4, 8, 10, 12, 14, 16, 18, 20], 16: [0, 16, 32, 48, 64, 80, 88, 92, 96, 100, 104]}
# Distinct files that are variants of one photograph (the light and dark edition of the same
# wallpaper, checked by eye): a match between them is right, so they are reported apart.
KNOWN_VARIANTS = [("scenery/scenery_017.jpg", "scenery/scenery_018.jpg"),
                  ("scenery/scenery_007.jpg", "scenery/scenery_008.jpg")]
DEFAULT_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


def _crop(img: Image.Image, frac: float, centre: bool) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * frac), round(h * frac)
    if centre:  # frac removed in total, half from each side
        return img.crop((dx // 2, dy // 2, w - (dx - dx // 2), h - (dy - dy // 2)))
    return img.crop((0, 0, w - dx, h - dy))  # all from the right and bottom edges


def _text(img: Image.Image, text: str, rel_height: float, where: str) -> Image.Image:
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    size = max(8, round(out.height * rel_height))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.textbbox((0, 0), text, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    pad = size // 2
    x, y = (out.width - tw - pad, out.height - th - pad) if where == "corner" else ((out.width - tw) // 2,
                                                                                     out.height - th - 3 * pad)
    draw.text((x + 2, y + 2), text, fill=(0, 0, 0), font=font)
    draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return out


def _resize(img: Image.Image, f: float) -> Image.Image:
    return img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)


# name -> (transform, JPEG quality of the repost)
TRANSFORMS: dict[str, tuple[Callable[[Image.Image], Image.Image], int]] = {
    "resize 50%": (lambda im: _resize(im, 0.5), 90),
    "resize 25%": (lambda im: _resize(im, 0.25), 90),
    "JPEG q70": (lambda im: im, 70),
    "JPEG q50": (lambda im: im, 50),
    "crop 2% centred": (lambda im: _crop(im, 0.02, True), 90),
    "crop 5% centred": (lambda im: _crop(im, 0.05, True), 90),
    "crop 2% one corner": (lambda im: _crop(im, 0.02, False), 90),
    "crop 5% one corner": (lambda im: _crop(im, 0.05, False), 90),
    "mirror": (ImageOps.mirror, 90),
    "brightness +20%": (lambda im: ImageEnhance.Brightness(im).enhance(1.2), 90),
    "brightness -20%": (lambda im: ImageEnhance.Brightness(im).enhance(0.8), 90),
    "contrast +20%": (lambda im: ImageEnhance.Contrast(im).enhance(1.2), 90),
    "contrast -20%": (lambda im: ImageEnhance.Contrast(im).enhance(0.8), 90),
    "small text (corner)": (lambda im: _text(im, "u/reposter", 0.03, "corner"), 90),
    "caption text (bottom)": (lambda im: _text(im, "Found this on my hike, OC", 0.06, "bottom"), 90),
    "mirror+resize 50%+q60+bright +10%": (
        lambda im: ImageEnhance.Brightness(_resize(ImageOps.mirror(im), 0.5)).enhance(1.1), 60),
}


def _hash_photo(path: str) -> tuple[dict[int, tuple[str, str]], dict[str, dict[int, str]], float]:
    """Gallery hashes of the file and query pHashes of every transformation."""
    gallery = {s: hash_file(path, s) for s in SIZES}
    t0 = time.perf_counter()  # timed after the first call, which imports scipy
    hash_file(path, 8)
    hash_s = time.perf_counter() - t0
    with Image.open(path) as im:
        img = im.convert("RGB")
    queries: dict[str, dict[int, str]] = {}
    for name, (fn, quality) in TRANSFORMS.items():
        buf = io.BytesIO()
        fn(img).convert("RGB").save(buf, "JPEG", quality=quality)
        data = buf.getvalue()
        queries[name] = {s: hash_bytes(data, s)[0] for s in SIZES}
    queries["original (same file)"] = {s: gallery[s][0] for s in SIZES}
    return gallery, queries, hash_s


def _min_dist(q: np.ndarray, ph: np.ndarray, mi: np.ndarray) -> np.ndarray:
    return np.minimum(distances(q, ph), distances(q, mi))


def hash_all(photos: list[Path], cache: Path | None) -> list[tuple]:
    """Hash every photo and transformation (2 processes); optionally cached between runs."""
    key = [str(p) for p in photos]
    if cache is not None and cache.exists():
        saved = pickle.loads(cache.read_bytes())
        if saved["photos"] == key and saved["transforms"] == list(TRANSFORMS):
            return saved["results"]
    with Pool(min(2, os.cpu_count() or 1)) as pool:
        results = pool.map(_hash_photo, key, chunksize=2)
    if cache is not None:
        cache.write_bytes(pickle.dumps({"photos": key, "transforms": list(TRANSFORMS), "results": results}))
    return results


def quality_tables(photos: list[Path], results: list[tuple]) -> tuple[str, dict[int, dict[str, object]], float]:
    """Recall per transformation and false-match rates for each hash size and threshold."""
    hash_s = sum(r[2] for r in results)
    names = [*TRANSFORMS, "original (same file)"]
    n = len(photos)
    rel = [p.relative_to(p.parents[1]).as_posix() for p in photos]
    variants = np.zeros((n, n), dtype=bool)
    for a, b in KNOWN_VARIANTS:
        if a in rel and b in rel:
            i, j = rel.index(a), rel.index(b)
            variants[i, j] = variants[j, i] = True
    distinct = ~np.eye(n, dtype=bool)
    strict = distinct & ~variants
    out, chosen = [], {}
    for s in SIZES:
        bits = s * s
        ph = pack([r[0][s][0] for r in results], s)
        mi = pack([r[0][s][1] for r in results], s)
        own: dict[str, np.ndarray] = {}
        cross: list[np.ndarray] = []  # per query set: (n queries, n gallery) distances
        for t in names:
            d = _min_dist(pack([r[1][t][s] for r in results], s), ph, mi)
            own[t] = np.diag(d).copy()
            cross.append(d)
        allq = np.concatenate([own[t] for t in TRANSFORMS])
        stacked = np.stack(cross)  # (sets, n, n)

        def rates(thr: int, st: np.ndarray = stacked, aq: np.ndarray = allq) -> tuple[float, float, float, float]:
            hit = st <= thr
            fmr_all = hit[:, distinct].mean()
            fmr = hit[:, strict].mean()
            any_false = (hit & strict).any(axis=2).mean()
            return float(np.mean(aq <= thr)), float(fmr_all), float(fmr), float(any_false)

        curve = {thr: rates(thr) for thr in range(bits + 1)}
        ok = [t for t, (rc, _, fmr, _) in curve.items() if rc >= 0.99 and fmr <= 0.001]
        safe = [t for t, (_, _, fmr, _) in curve.items() if fmr <= 0.001]
        best = min(ok) if ok else max(safe)
        rc, _, fmr, any_false = curve[best]
        misses = {t: float(np.mean(own[t] > best)) for t in TRANSFORMS if np.mean(own[t] > best) > 0}
        chosen[s] = {"threshold": best, "recall": rc, "fmr": fmr, "any_false": any_false, "misses": misses,
                     "meets_target": bool(ok)}
        thrs = sorted(set(THRESHOLDS[s]) | {best})
        pairs = int(strict.sum()) * len(cross)
        out.append(f"\n### hash_size {s} ({bits}-bit pHash): {n} photos x {len(TRANSFORMS)} transformations\n")
        out.append("| recall at distance <= | " + " | ".join(str(t) for t in thrs) + " | median | max |")
        out.append("|---|" + "---:|" * (len(thrs) + 2))
        for t in names:
            cells = [f"{np.mean(own[t] <= thr):.3f}" for thr in thrs]
            out.append(f"| {t} | " + " | ".join(cells) + f" | {int(np.median(own[t]))} | {int(own[t].max())} |")
        out.append("| **all transformations** | " + " | ".join(f"**{curve[t][0]:.3f}**" for t in thrs)
                   + f" | {int(np.median(allq))} | {int(allq.max())} |")
        out.append(f"| false-match rate, {pairs:,} distinct pairs | "
                   + " | ".join(f"{100 * curve[t][2]:.3f}%" for t in thrs) + " | | |")
        if variants.any():
            out.append("| false-match rate incl. the known variant pairs | "
                       + " | ".join(f"{100 * curve[t][1]:.3f}%" for t in thrs) + " | | |")
        out.append(f"| queries matching any other photo (gallery of {n - 1}) | "
                   + " | ".join(f"{100 * curve[t][3]:.2f}%" for t in thrs) + " | | |")
        verdict = ("smallest threshold with recall >= 0.99 and FMR <= 0.1%" if ok else
                   "no threshold reaches recall 0.99 at FMR <= 0.1%; largest with FMR <= 0.1%")
        out.append(f"\n{verdict}: **{best}** bits (feasible: {ok[0]}..{ok[-1]})" if ok else f"\n{verdict}: **{best}**")
        out.append(f"recall {rc:.4f}, FMR {100 * fmr:.4f}%, queries with a false match {100 * any_false:.2f}%; "
                   "missed at that threshold: "
                   + (", ".join(f"{t} ({100 * v:.1f}%)" for t, v in misses.items()) or "nothing"))
    return "\n".join(out), chosen, hash_s


def speed_table(n: int = 1_000_000, repeats: int = 30) -> str:
    rng = np.random.default_rng(0)
    rows = ["| hash | gallery | build (add_many) | query, vectorised | query, np.unpackbits baseline | "
            "query, pure Python baseline | speed-up vs Python |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s in SIZES:
        nbytes = s * s // 8
        raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
        hexes = [r.tobytes().hex() for r in raw]
        mirrors = hexes[::-1]
        shas = [f"{i:064x}" for i in range(n)]
        index = GalleryIndex(s)
        t0 = time.perf_counter()
        index.add_many(shas, hexes, mirrors)
        build = time.perf_counter() - t0
        queries = [rng.integers(0, 256, size=nbytes, dtype=np.uint8).tobytes().hex() for _ in range(repeats)]
        index.query(queries[0])
        times = []
        for q in queries:
            t0 = time.perf_counter()
            index.query(q)
            times.append(time.perf_counter() - t0)
        vec = float(np.median(times))
        # baseline 1: unpackbits popcount over the same packed bytes
        g8, m8 = raw, raw[::-1]
        q8 = np.frombuffer(bytes.fromhex(queries[0]), dtype=np.uint8)
        t0 = time.perf_counter()
        for _ in range(3):
            d = np.minimum(np.unpackbits(g8 ^ q8, axis=1).sum(axis=1), np.unpackbits(m8 ^ q8, axis=1).sum(axis=1))
            int(d.argmin())
        unpack = (time.perf_counter() - t0) / 3
        # baseline 2: a Python loop with int.bit_count (timed on 100k, scaled)
        sub = 100_000
        ints = [int(h, 16) for h in hexes[:sub]]
        mints = [int(h, 16) for h in mirrors[:sub]]
        qi = int(queries[0], 16)
        t0 = time.perf_counter()
        min(min((qi ^ a).bit_count(), (qi ^ b).bit_count()) for a, b in zip(ints, mints, strict=True))
        python = (time.perf_counter() - t0) * n / sub
        rows.append(f"| {s * s}-bit | {n:,} | {build:.2f} s | {1000 * vec:.2f} ms | {1000 * unpack:.1f} ms | "
                    f"{1000 * python:.0f} ms | {python / vec:.0f}x |")
        del index, hexes, mirrors, shas, raw
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N photos")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="only time queries over 1M random hashes")
    ap.add_argument("--cache", type=Path, help="pickle of the hashes, reused when photos and transforms match")
    args = ap.parse_args()
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if args.limit:
        photos = photos[: args.limit]
    if len(photos) < 2:
        print(f"need photos under {args.photos}", file=sys.stderr)
        return 2
    if args.speed_only:
        print(speed_table())
        return 0
    t0 = time.perf_counter()
    results = hash_all(photos, args.cache)
    table, chosen, hash_s = quality_tables(photos, results)
    wall = time.perf_counter() - t0
    print(f"## Dedupe quality ({len(photos)} photos from {args.photos}, {wall:.0f} s)")
    print(table)
    print(f"\nHashing a gallery file (hash_file, 64-bit pHash + mirror, JPEG draft decode): "
          f"{len(photos) / hash_s:.1f} photos/s per core ({1000 * hash_s / len(photos):.0f} ms each)")
    for s, c in chosen.items():
        print(f"- hash_size {s}: threshold {c['threshold']}, recall {c['recall']:.4f}, FMR {100 * c['fmr']:.4f}%, "
              f"queries with a false match {100 * c['any_false']:.2f}%, target met: {c['meets_target']}")
    if not args.skip_speed:
        print("\n## Query speed (one query against random gallery hashes, median of 30; pHash and mirror)\n")
        print(speed_table())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\nPeak RSS: {peak:.0f} MiB (main), {kids:.0f} MiB (largest hashing worker)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
