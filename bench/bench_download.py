"""Download throughput: mining's safe Downloader vs a naive sequential ``requests.get`` loop.

    .venv/bin/python bench/bench_download.py [--images 60] [--workers 8] [--per-host 4]

N real JPEGs (../shared/data/photos when present, else generated 2048x1280 noise JPEGs)
are served from memory by a local DevServer in this process; each configuration runs in
its own subprocess over a fresh MINING_HOME, so its peak RSS is its own. Both store every
image under its sha256; only ours also resolves and checks each hop, streams with caps and
a deadline, sniffs the format and verifies/decodes with Pillow (JPEG in draft mode).
The per-host rate limit is lifted (one local host); with the defaults (2 per host, 5/s)
a single host is capped at 5 images/s by design. The third row switches the Pillow
decode check off (bench only) to show what the network path alone costs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def _images(n: int) -> tuple[list[bytes], str]:
    files = sorted(PHOTOS.rglob("*.jpg")) if PHOTOS.is_dir() else []
    if files:
        data = [p.read_bytes() for p in files[:n]]
        source = f"{len(data)} photos from ../shared/data/photos"
    else:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        data = []
        for _ in range(min(n, 16)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (1280, 2048, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
            data.append(buf.getvalue())
        source = f"{len(data)} generated 2048x1280 JPEGs"
    return [data[i % len(data)] for i in range(n)], source


def _child(config: str, urls_file: str, home: str, workers: int, per_host: int) -> None:
    urls = json.loads(Path(urls_file).read_text())
    t0 = time.perf_counter()
    if config == "naive":
        import requests

        ok = total = 0
        for url in urls:
            resp = requests.get(url, timeout=30)
            if resp.status_code == 200:
                sha = hashlib.sha256(resp.content).hexdigest()
                path = Path(home) / "images" / sha[:2] / sha[2:4] / f"{sha}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(resp.content)
                ok += 1
                total += len(resp.content)
    else:
        from mining import download
        from mining.download import Downloader
        from mining.settings import load_settings

        if config == "ours-nodecode":  # bench only: isolates the network path from Pillow's decode
            from mining.imaging import ImageInfo, sniff_format

            download.verify_image = lambda body, settings: ImageInfo(sniff_format(body[:16]) or "JPEG", 2048, 1280,
                                                                     False)

        settings = load_settings(env={}, home=home, allowed_hosts=("127.0.0.1",), download_workers=workers,
                                 per_host_concurrency=per_host, per_host_rate_per_s=1e6, min_width=64,
                                 min_height=64)
        results = Downloader(settings).fetch_many(urls)
        good = [r for r in results.values() if r.status == "downloaded"]
        ok, total = len(good), sum(r.bytes or 0 for r in good)
        bad = [r.status for r in results.values() if r.status != "downloaded"]
        if bad:
            print(f"unexpected statuses: {bad[:5]}", file=sys.stderr)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ok": ok, "bytes": total, "wall": wall, "rss_mb": rss_mb}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--per-host", type=int, default=4)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, workers=args.workers, per_host=args.per_host)
        return 0

    from mining.devserver import DevServer, Response

    images, source = _images(args.images)
    rows = []
    with DevServer() as server, tempfile.TemporaryDirectory() as tmp:
        urls = []
        for i, data in enumerate(images):
            server.route(f"/img/{i}.jpg", Response(200, data, {"Content-Type": "image/jpeg"}))
            urls.append(f"{server.url}/img/{i}.jpg")
        urls_file = Path(tmp) / "urls.json"
        urls_file.write_text(json.dumps(urls))
        configs = [("naive", "naive: sequential requests.get + write"),
                   ("ours", f"mining Downloader ({args.workers} workers, {args.per_host}/host, verified)"),
                   ("ours-nodecode", "mining Downloader, Pillow decode check off (bench only)")]
        for config, label in configs:
            home = Path(tmp) / config
            home.mkdir()
            out = subprocess.run(
                [sys.executable, __file__, "--workers", str(args.workers), "--per-host", str(args.per_host),
                 "--child", config, str(urls_file), str(home)],
                check=True, capture_output=True, text=True)
            if out.stderr.strip():
                print(out.stderr.strip(), file=sys.stderr)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((label, res))
    base = rows[0][1]["ok"] / rows[0][1]["wall"]
    print(f"Images: {source}, {len(images)} downloads, {sum(map(len, images)) / 1e6:.1f} MB in total; "
          "local DevServer on 127.0.0.1 (server in the parent process, each client in its own subprocess).\n")
    print("| client | images | MB | wall s | images/s | MB/s | peak RSS MB | vs naive |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        ips = r["ok"] / r["wall"]
        print(f"| {label} | {r['ok']} | {r['bytes'] / 1e6:.1f} | {r['wall']:.2f} | {ips:.1f} | "
              f"{r['bytes'] / 1e6 / r['wall']:.1f} | {r['rss_mb']:.0f} | {ips / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
