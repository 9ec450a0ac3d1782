"""Scrape throughput against a local RedditReplay: budget disabled (huge) vs the default budget.

    .venv/bin/python bench/bench_scrape.py [--sources 12] [--posts 1000] [--real-sleep]

Each configuration runs in its own subprocess (so peak RSS is its own) over a fresh
MINING_HOME: OAuth token, every source paged back through one hour, Parquet written.
The default budget (100 requests/min with OAuth) must wait once a run needs more than
100 requests; unless ``--real-sleep`` is given those waits are skipped on a virtual clock
and added to the wall time, so the table shows what a real run would take.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining import clock
from mining.devserver import DevServer
from mining.lake import Interval
from mining.listings import scrape_interval
from mining.replay import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, RedditReplay, make_post
from mining.settings import Secret, load_settings

CONFIGS = {"huge": 1_000_000, "default": None}
HOUR = Interval.parse("2026-03-01T10:00:00Z")


class _SkippedSleeps:
    """Sleeping advances a virtual offset instead of blocking (the waits are still counted)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._mono, self._now = clock.monotonic, clock.now

    def install(self) -> None:
        clock.monotonic = lambda: self._mono() + self.offset
        clock.now = lambda: self._now() + self.offset
        clock.sleep = self.sleep

    def sleep(self, seconds: float) -> None:
        self.offset += max(0.0, seconds)


def _post(sub: str, i: int, n: int) -> dict:
    created = HOUR.start.timestamp() + 3599 * (n - 1 - i) / max(1, n - 1) if i < n else HOUR.start.timestamp() - 60
    pid = f"{sub[:3].lower()}{i:05d}"
    url = f"https://i.redd.it/{pid}.jpg"
    return make_post(pid, created, sub, url=url, preview={"images": [{"source": {
        "url": f"https://preview.redd.it/{pid}.jpg?width=4000&format=pjpg&auto=webp&s=0123456789abcdef",
        "width": 4000, "height": 3000}, "resolutions": [], "variants": {}, "id": pid}], "enabled": True})


def run_one(config: str, sources: int, posts: int, real_sleep: bool) -> dict:
    sleeps = _SkippedSleeps()
    if not real_sleep:
        sleeps.install()
    names = [f"Sub{k:02d}" for k in range(sources)]
    with DevServer() as server, tempfile.TemporaryDirectory() as home:
        replay = RedditReplay(server, enforce_ratelimit=False, depth_cap=posts + 100)
        for name in names:
            replay.add_posts(name, [_post(name, i, posts) for i in range(posts + 1)])  # +1: older than the hour
        settings = load_settings(env={}, home=Path(home), reddit_base_url=server.url,
                                 reddit_token_url=replay.token_url, reddit_client_id=DEFAULT_CLIENT_ID,
                                 reddit_client_secret=Secret(DEFAULT_CLIENT_SECRET), sources=tuple(names),
                                 watch_list=(), requests_per_minute=CONFIGS[config],
                                 listing_max_pages=posts // 100 + 2)
        started = time.perf_counter()
        result = scrape_interval(settings, HOUR)
        elapsed = time.perf_counter() - started + sleeps.offset
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "budget": settings.budget_per_minute, "requests": result.counts["requests"],
            "posts": result.counts["posts_kept"], "wall_s": elapsed, "waited_s": sleeps.offset, "rss_mb": rss_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=12)
    parser.add_argument("--posts", type=int, default=1000, help="posts per source inside the hour")
    parser.add_argument("--real-sleep", action="store_true", help="really wait for the budget")
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.sources, args.posts, args.real_sleep)))
        return
    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--one", config, "--sources", str(args.sources), "--posts", str(args.posts)]
        if args.real_sleep:
            cmd.append("--real-sleep")
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    base = rows[0]["posts"] / rows[0]["wall_s"]
    print(f"Scrape of {args.sources} sources x {args.posts} posts (one hour, pages of 100, OAuth) "
          f"against a local RedditReplay{'' if args.real_sleep else '; budget waits simulated'}:\n")
    print("| budget (req/min) | requests | posts | wall s | of which budget waits s | posts/s | requests/s "
          "| vs huge | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pps = r["posts"] / r["wall_s"]
        print(f"| {r['budget']:,} ({r['config']}) | {r['requests']} | {r['posts']:,} | {r['wall_s']:.1f} "
              f"| {r['waited_s']:.1f} | {pps:,.0f} | {r['requests'] / r['wall_s']:.2f} | {pps / base:.2f}x "
              f"| {r['rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
