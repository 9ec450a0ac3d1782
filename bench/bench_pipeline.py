"""The whole hourly pipeline end to end vs the embedder alone, side by side in one run.

One replayed hour on a local Reddit-compatible server: every photo of ../shared/data/photos not
used to bootstrap the gallery is an i.redd.it-style post whose image the server returns at full
resolution. `mining init` bootstraps the gallery (and trains the watermark detector) once,
outside the timing; then each round copies that state and times, each in its own subprocess so
peak RSS (ru_maxrss) is its own:

pipeline = mining.pipeline.run_interval: scrape, download, embed, score (novelty, watermark on
           the survivors, pHash), load into DuckDB, publish to the gallery folder, with the default
           per-host politeness (MINING_PER_HOST_RATE_PER_S=5: every image here comes from one host,
           as most of Reddit's come from i.redd.it, so downloading 102 images takes >= 20 s);
unthrottled = the same with the per-host rate lifted: what the machine itself does;
embed    = mining.embed over the same photos from disk: the models benchmark's figure, the
           ceiling the pipeline is measured against (target: pipeline >= 80% of it).

    .venv/bin/python bench/bench_pipeline.py [--photos DIR] [--liked N] [--rounds K]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
MODES = {"embed": {}, "pipeline": {}, "pipeline-unthrottled": {"MINING_PER_HOST_RATE_PER_S": "100000"}}

from mining.lake import Interval  # noqa: E402


def _photos(folder: Path) -> tuple[list[Path], list[Path]]:
    """(scenery, other) from the manifest; folders named so when there is none."""
    manifest = folder / "manifest.csv"
    if manifest.exists():
        with open(manifest) as fh:
            rows = list(csv.DictReader(fh))
        return ([folder / r["file"] for r in rows if r["category"] == "scenery"],
                [folder / r["file"] for r in rows if r["category"] != "scenery"])
    return sorted((folder / "scenery").glob("*.jpg")), sorted((folder / "other").glob("*.jpg"))


def child(mode: str, home: Path, hour: Interval, files: list[Path], out: Path) -> None:
    from mining.settings import load_settings

    settings = load_settings()
    assert settings.home == home, (settings.home, home)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    steps: dict[str, float] = {}
    counts: dict[str, dict] = {}
    if mode.startswith("pipeline"):
        from mining.pipeline import HOURLY_STEPS, run_step

        for step in HOURLY_STEPS:
            s0 = time.perf_counter()
            result = run_step(settings, hour, step, dag_id="bench")
            steps[step] = time.perf_counter() - s0
            counts[step] = result.counts
    else:
        from mining.embed import load_embedder

        res = load_embedder(settings).embed_paths(files)
        assert res.ok.all(), [e for e in res.errors if e]
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.write_text(json.dumps({"mode": mode, "n": len(files), "seconds": elapsed,
                               "cpu_seconds": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                               "peak_rss_mb": r1.ru_maxrss / 1024, "steps": steps, "counts": counts}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos")
    ap.add_argument("--liked", type=int, default=24, help="scenery photos that bootstrap the gallery")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the modes K times, keep each one's best")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--hour", help=argparse.SUPPRESS)
    ap.add_argument("--files", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        hour = Interval.hour_of(datetime.fromisoformat(args.hour))
        child(args.child, args.home, hour, [Path(p) for p in json.loads(args.files.read_text())], args.out)
        return

    from mining.demo import demo_env
    from mining.devserver import DevServer, Response
    from mining.replay import RedditReplay, make_post

    scenery, other = _photos(args.photos)
    if len(scenery) <= args.liked:
        sys.exit(f"need more than {args.liked} scenery photos under {args.photos}")
    rng = random.Random(5)
    rng.shuffle(scenery)
    liked, posted = scenery[:args.liked], scenery[args.liked:] + other
    rng.shuffle(posted)
    hour = Interval.hour_of(datetime.now(UTC) - timedelta(hours=2))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, DevServer() as server:
        tmp_path = Path(tmp)
        replay = RedditReplay(server, oauth=False)
        t0 = hour.start.timestamp()
        posts = []
        for i, photo in enumerate(posted):
            server.route(f"/i/{i:04d}.jpg", Response(200, photo.read_bytes(), {"Content-Type": "image/jpeg"}))
            posts.append(make_post(f"b{i:04d}", t0 + 60 + i * (3000 / len(posted)), "EarthPorn",
                                   url=f"{server.url}/i/{i:04d}.jpg", title=photo.stem))
        replay.add_posts("EarthPorn", posts)
        base = tmp_path / "base"
        (base / "liked").mkdir(parents=True)
        for p in liked:
            shutil.copyfile(p, base / "liked" / p.name)
        env = {**os.environ, **demo_env(base, server.url), "PYTHONWARNINGS": "ignore",
               "MINING_REQUESTS_PER_MINUTE": "100000"}
        print(f"bootstrapping the gallery from {len(liked)} liked photos (mining init, not timed) ...", flush=True)
        subprocess.run([str(BIN / "mining"), "init", "--liked", str(base / "liked")], env=env, check=True,
                       capture_output=True)
        files = tmp_path / "files.json"
        files.write_text(json.dumps([str(p) for p in posted]))
        for k in range(max(1, args.rounds)):
            for mode, extra in MODES.items():
                home = tmp_path / f"{mode}{k}"
                shutil.copytree(base, home)
                out = tmp_path / f"{mode}{k}.json"
                cmd = [sys.executable, __file__, "--child", mode, "--home", str(home), "--hour",
                       hour.start.isoformat(), "--files", str(files), "--out", str(out)]
                subprocess.run(cmd, check=True, env={**env, **extra, "MINING_HOME": str(home)})
                got = json.loads(out.read_text())
                if mode not in results or got["seconds"] < results[mode]["seconds"]:
                    results[mode] = got
                shutil.rmtree(home)

    from mining.settings import load_settings

    s = load_settings()
    emb, pipe = results["embed"], results["pipeline-unthrottled"]
    print(f"\n{len(posted)} posts / full-resolution photos from {args.photos} served on 127.0.0.1, "
          f"{len(liked)} liked in the gallery, embedder `{s.embedder}`, {os.cpu_count()} cores\n")
    print("| run | images | seconds | images/s | CPU ms/image | peak RSS (MB) | vs embedder |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_ips = emb["n"] / emb["seconds"]
    for r, label in ((emb, "embedder only (mining.embed over the files)"),
                     (results["pipeline"], "hourly pipeline end to end, default per-host politeness"),
                     (pipe, "hourly pipeline end to end, per-host rate lifted")):
        ips = r["n"] / r["seconds"]
        print(f"| {label} | {r['n']} | {r['seconds']:.1f} | {ips:.2f} | {1000 * r['cpu_seconds'] / r['n']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {ips / base_ips:.0%} |")
    for mode in ("pipeline", "pipeline-unthrottled"):
        print(f"\n{mode} seconds by step: " + ", ".join(f"{k} {v:.1f}" for k, v in results[mode]["steps"].items()))
    print("score counts: " + json.dumps(pipe["counts"].get("score", {}), sort_keys=True))
    print("publish counts: " + json.dumps(pipe["counts"].get("publish", {}), sort_keys=True))


if __name__ == "__main__":
    main()
