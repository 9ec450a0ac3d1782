"""A small replayed Reddit world for the end-to-end tiers (browser, PostgreSQL, secrets).

Builds, from real photographs (mining.demo.find_photos), one realistic hour per interval
with disjoint photos and distinct post ids, serves it from a local RedditReplay, and gives
the MINING_* environment that points the pipeline at it. Hours share nothing a concurrent
run could race on (different images, different reposted gallery images), so running them
in parallel must give the same decisions as running them one after another.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mining.demo import SUBREDDIT, PhotoSet, build_hour, demo_env, find_photos
from mining.devserver import DevServer, Response
from mining.lake import Interval
from mining.replay import RedditReplay

BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parents[1]
GALLERY_SIZE = 24
HELD_OUT = 5  # per hour: 2 accepted-kind, 3 watermarked (build_hour's split)
OTHER = 11  # per hour: novelty rejections, gallery post, junk sources
# What tests/conftest.py sets for in-process Airflow; subprocess deployments must not inherit it.
CONFTEST_AIRFLOW_ENV = ("AIRFLOW__CORE__UNIT_TEST_MODE", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                        "AIRFLOW__CORE__DAGS_FOLDER")


@dataclass
class World:
    home: Path
    env: dict[str, str]
    intervals: list[Interval]
    liked_dir: Path
    expect: dict[str, str] = field(default_factory=dict)  # post_id -> what it is
    server: DevServer | None = None
    replay: RedditReplay | None = None


def _rename(posts: list[dict], expect: dict[str, str], tag: str) -> tuple[list[dict], dict[str, str]]:
    """Give an hour's posts their own ids (build_hour numbers every hour from demo000)."""
    text = json.dumps(posts).replace("demo", tag)
    return json.loads(text), {k.replace("demo", tag): v for k, v in expect.items()}


@contextmanager
def replay_world(home: Path, intervals: Sequence[Interval], *, oauth: bool = False, client_id: str = "",
                 client_secret: str = "") -> Iterator[World]:
    """Start the local Reddit for ``intervals`` and prepare ``home`` (liked folder, env)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mining-demo"
    photos = find_photos(cache)
    rng = random.Random(11)
    liked = photos.liked[:]
    rng.shuffle(liked)
    n = len(intervals)
    if len(liked) < GALLERY_SIZE + HELD_OUT * n or len(photos.other) < OTHER * n:
        raise RuntimeError(f"not enough photos in {photos.source} for {n} hours")
    gallery = liked[:GALLERY_SIZE]
    home.mkdir(parents=True, exist_ok=True)
    liked_dir = home / "liked"
    liked_dir.mkdir(exist_ok=True)
    for p in gallery:
        shutil.copyfile(p, liked_dir / p.name)
    server = DevServer().start()
    try:
        kwargs = {"client_id": client_id, "client_secret": client_secret} if oauth else {}
        replay = RedditReplay(server, oauth=oauth, **kwargs)
        world = World(home=home, env={}, intervals=list(intervals), liked_dir=liked_dir, server=server,
                      replay=replay)
        for k, interval in enumerate(intervals):
            held = liked[GALLERY_SIZE + HELD_OUT * k: GALLERY_SIZE + HELD_OUT * (k + 1)]
            hour_photos = PhotoSet(liked=held, other=photos.other[OTHER * k: OTHER * (k + 1)], source=photos.source)
            rotated = gallery[3 * k:] + gallery[:3 * k]  # each hour reposts different gallery images
            hour = build_hour(hour_photos, rotated, held, interval, f"{server.url}/h{k}", seed=7 + k)
            posts, expect = _rename(hour.posts, hour.expect, f"h{k}p")
            replay.add_posts(SUBREDDIT, posts)
            world.expect.update(expect)
            for name, data in hour.images.items():
                server.route(f"/h{k}/img/{name}", Response(200, data, {"Content-Type": "image/jpeg"}))
        env = demo_env(home, server.url)
        env["MINING_REDDIT_TOKEN_URL"] = f"{server.url}/api/v1/access_token"
        if oauth:
            env["REDDIT_CLIENT_ID"] = client_id
            env["REDDIT_CLIENT_SECRET"] = client_secret
        world.env = env
        yield world
    finally:
        server.stop()


def mining(args: Sequence[str], env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run the ``mining`` CLI with ``env`` on top of the current environment; raise with its output on failure."""
    proc = subprocess.run([str(BIN / "mining"), *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"mining {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def decisions(home: Path) -> list[tuple]:
    """(post_id, image_url path, decision, reason) for every candidate: what two runs must agree on."""
    from mining.settings import load_settings
    from mining.warehouse import Warehouse

    settings = load_settings(env={"MINING_HOME": str(home)})
    with Warehouse.open(settings, read_only=True) as wh:
        _, rows = wh.query("SELECT post_id, regexp_replace(image_url, '^https?://[^/]+', ''), decision, reason "
                           "FROM mined_images ORDER BY ALL")
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def airflow_local(tmp: Path, mining_home: Path, extra_env: dict[str, str] | None = None,
                  timeout_s: float = 240) -> Iterator[str]:
    """`make airflow`'s script in its own process group on a free port; yields the base URL.

    Stopping signals the whole group: standalone's children outlive a kill of the parent alone.
    """
    import signal
    import time
    import urllib.request

    port = free_port()
    env = dict(os.environ)
    for key in CONFTEST_AIRFLOW_ENV:
        env.pop(key, None)  # conftest's in-process settings are not the local deployment's
    env.update({**(extra_env or {}), "MINING_HOME": str(mining_home), "AIRFLOW_HOME": str(tmp / "airflow"),
                "AIRFLOW_PORT": str(port)})
    log_path = tmp / "airflow-local.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(["bash", str(PROJECT_ROOT / "scripts" / "airflow-local.sh")], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"airflow-local.sh exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/v2/dags", timeout=5) as resp:
                    if resp.status == 200 and len(json.load(resp).get("dags", [])) >= 3:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"Airflow did not answer in {timeout_s} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
