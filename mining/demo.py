"""The offline demo: one realistic hour of Reddit, mined end to end through Airflow.

It needs no internet and no ../shared: real photographs come from (in order) a folder the
user names (``MINING_DEMO_PHOTOS`` with ``liked/`` and ``other/``), ../shared/data/photos
when present, or two Debian wallpaper packages (real nature photos and desktop art)
downloaded from Debian's archive. A local Reddit-compatible server replays an hour of
posts (images, galleries, crossposts, junk, watermarked copies and reposts of gallery
images); `mining init` bootstraps the gallery; Airflow runs `mining_hourly` for that hour;
the outcome is printed from the warehouse with SQL.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import ExifTags, Image, ImageOps

from mining.lake import Interval
from mining.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

DEBIAN_PACKAGES = ("mate-backgrounds", "ukui-wallpapers")
# Real photographs of nature in those packages (the "liked" kind) ...
DEBIAN_LIKED = (
    "mate/nature/Aqua.jpg", "mate/nature/Blinds.jpg", "mate/nature/Dune.jpg", "mate/nature/FreshFlower.jpg",
    "mate/nature/Garden.jpg", "mate/nature/GreenMeadow.jpg", "mate/nature/LadyBird.jpg",
    "mate/nature/RainDrops.jpg", "mate/nature/Storm.jpg", "mate/nature/TwoWings.jpg",
    "mate/nature/YellowFlower.jpg", "Dragonfly_by_Bolly.jpg", "Kleiber_by_Lukas_Baubkus.jpg",
    "aitzgorri_by_Aitzol_Berasategi.jpg", "life_by_Aitzol_Berasategi.jpg",
    "picosdeeuropa_by_Aitzol_Berasategi.jpg", "seeding_by_Clements_Engelhardt.jpg",
    "sunset_by_Aitzol_Berasategi.jpg",
)
# ... and other images: desktop art and indoor/object photos.
DEBIAN_OTHER = (
    "2004default.jpg", "Fossa_by_Jasper_Roks.jpg", "Painting-Colors_by__herobrine7gamer.jpg",
    "Picture_0B_by_freespace.jpg", "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg",
    "calla.png", "city.png", "desert.png", "firstgeneration.jpg", "fluent-color.png", "goldfish.png",
    "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
    "rhythm.jpg", "string.jpg", "the-mouse.jpg", "umang_by_Abhishek_Mudgal.jpg",
    "mate/abstract/Flow.png", "mate/abstract/Gulp.png", "mate/desktop/Ubuntu-Mate-Warm-no-logo.png",
)

SUBREDDIT = "EarthPorn"
DEMO_MIN_SIZE = (640, 480)  # MINING_MIN_WIDTH / MINING_MIN_HEIGHT of the demo's settings


@dataclass
class PhotoSet:
    liked: list[Path]
    other: list[Path]
    source: str


@dataclass
class DemoHour:
    """What the replayed hour contains, so the demo can say what it expects."""

    interval: Interval
    posts: list[dict] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)
    expect: dict[str, str] = field(default_factory=dict)  # post_id -> what a good curator does


# ---- photos ---------------------------------------------------------------------------
def find_photos(cache: Path) -> PhotoSet:
    """Real photographs available on this machine, best source first, each big enough to be kept.

    Photos under the demo's minimum size would be skipped as too small, whatever the posts
    built from them claim to be, so they are left out (the demo makes its own tiny image).
    """
    found = _find_photos(cache)
    return PhotoSet(_big_enough(found.liked), _big_enough(found.other), found.source)


def _big_enough(paths: list[Path]) -> list[Path]:
    keep = []
    for p in paths:
        with Image.open(p) as im:  # reads the header only
            w, h = im.size
            if im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # shown rotated a quarter turn
                w, h = h, w
        if w >= DEMO_MIN_SIZE[0] and h >= DEMO_MIN_SIZE[1]:
            keep.append(p)
    return keep


def _find_photos(cache: Path) -> PhotoSet:
    named = os.environ.get("MINING_DEMO_PHOTOS")
    if named:
        root = Path(named).expanduser()
        liked, other = _images(root / "liked"), _images(root / "other")
        if not liked or not other:
            raise SystemExit(f"MINING_DEMO_PHOTOS={root} needs liked/ and other/ folders with images")
        return PhotoSet(liked, other, f"{root} (MINING_DEMO_PHOTOS)")
    shared = PROJECT_ROOT.parent / "shared" / "data" / "photos"
    if (shared / "scenery").is_dir() and (shared / "other").is_dir():
        return PhotoSet(_images(shared / "scenery"), _images(shared / "other"), f"{shared} (scenery liked)")
    return _debian_photos(cache)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))


def _debian_photos(cache: Path) -> PhotoSet:
    """Fetch two wallpaper packages from Debian's archive and unpack them (no install needed)."""
    root = cache / "debian"
    base = root / "usr" / "share" / "backgrounds"
    if not all((base / name).exists() for name in DEBIAN_LIKED[:3]):
        debs = cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        print(f"fetching real photographs from Debian packages: {', '.join(DEBIAN_PACKAGES)} ...", flush=True)
        cmd = ["apt-get", "download", *DEBIAN_PACKAGES]
        if subprocess.run(cmd, cwd=debs, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(cmd, cwd=debs, check=True, capture_output=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    liked = [base / n for n in DEBIAN_LIKED if (base / n).exists()]
    other = [base / n for n in DEBIAN_OTHER if (base / n).exists()]
    if len(liked) < 8 or len(other) < 6:
        raise SystemExit("could not find enough photos in the Debian packages; set MINING_DEMO_PHOTOS=DIR")
    return PhotoSet(liked, other, "Debian packages " + ", ".join(DEBIAN_PACKAGES) + " (nature photos liked)")


def _jpeg(img: Image.Image, quality: int = 90, max_side: int = 2048) -> bytes:
    img = ImageOps.exif_transpose(img).convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# ---- the replayed hour ------------------------------------------------------------------
def build_hour(photos: PhotoSet, gallery: list[Path], heldout: list[Path], interval: Interval,
               base_url: str, seed: int = 7) -> DemoHour:
    """Posts of one realistic hour; image URLs point at the local server (``base_url``)."""
    from mining.replay import make_post
    from mining.synth import add_watermark

    rng = random.Random(seed)
    hour = DemoHour(interval)
    t0 = interval.start.timestamp()
    ids = iter(f"demo{n:03d}" for n in range(1000))

    def image(name: str, data: bytes) -> str:
        hour.images[name] = data
        return f"{base_url}/img/{name}"

    def post(expect: str, url: str, **extra: object) -> dict:
        pid = next(ids)
        p = make_post(pid, t0 + rng.uniform(60, 3500), SUBREDDIT, url=url,
                      title=extra.pop("title", f"{expect} #{pid}"), **extra)
        hour.posts.append(p)
        hour.expect[pid] = expect
        return p

    import numpy as np

    wm_rng = np.random.default_rng(seed)
    clean, marked = heldout[: max(2, len(heldout) - 3)], heldout[max(2, len(heldout) - 3):]
    for path in clean:  # new photos of the liked kind: should be accepted
        post("accept: liked kind", image(f"{path.stem}.jpg", _jpeg(Image.open(path))))
    for path in photos.other[:8]:  # other kinds of image: rejected by novelty
        post("reject: novelty", image(f"{path.stem}.jpg", _jpeg(Image.open(path))))
    for path in marked:  # liked kind but watermarked: rejected by the watermark detector
        with Image.open(path) as im:
            wm, _ = add_watermark(ImageOps.exif_transpose(im).convert("RGB"), wm_rng, kind="corner")
        post("reject: watermark", image(f"{path.stem}_wm.jpg", _jpeg(wm, 88)))
    # Reposts of gallery images: resized + recompressed, mirrored, and a byte-identical copy.
    with Image.open(gallery[0]) as im:
        small = ImageOps.exif_transpose(im).convert("RGB")
        small = small.resize((int(small.width * 0.6), int(small.height * 0.6)))
    post("duplicate: resized repost", image("repost_resized.jpg", _jpeg(small, 70)))
    with Image.open(gallery[1]) as im:
        post("duplicate: mirrored repost", image("repost_mirror.jpg", _jpeg(ImageOps.mirror(im))))
    post("duplicate: identical repost", image("repost_same" + gallery[2].suffix.lower(), gallery[2].read_bytes()))
    # A gallery post: two good images and one item Reddit failed to process.
    if len(photos.other) > 9:
        items = {"m1": photos.other[8], "m2": photos.other[9]}
        meta = {}
        for mid, path in items.items():
            with Image.open(path) as im:
                w, h = im.size
            meta[mid] = {"status": "valid", "e": "Image", "m": "image/jpg",
                         "s": {"u": image(f"{path.stem}.jpg", _jpeg(Image.open(path))), "x": w, "y": h}}
        meta["m3"] = {"status": "failed"}
        post("gallery: 2 images + 1 failed item", f"https://www.reddit.com/gallery/{'x'}",
             is_gallery=True, media_metadata=meta,
             gallery_data={"items": [{"media_id": m, "id": i} for i, m in enumerate(["m1", "m3", "m2"])]})
    # Junk a real hour is full of.
    post("skip: self post", "https://www.reddit.com/r/EarthPorn/comments/x/", is_self=True)
    post("skip: video", "https://v.redd.it/abc123", is_video=True)
    post("skip: nsfw", image("nsfw.jpg", _jpeg(Image.open(photos.other[0]))), over_18=True)
    post("skip: gifv", "https://i.imgur.com/abcdef.gifv")
    post("skip: removed", image("removed.jpg", b"x"), removed_by_category="moderator")
    tiny = Image.open(photos.other[1]).convert("RGB")
    tiny.thumbnail((320, 320))
    post("skip: too small", image("tiny.jpg", _jpeg(tiny)))
    post("fail: truncated JPEG", image("truncated.jpg", _jpeg(Image.open(photos.other[2]))[:5000]))
    post("fail: HTML served as image", image("page.jpg", b"<html><body>not an image</body></html>"))
    post("fail: 404", f"{base_url}/img/missing.jpg")
    # A crosspost of one of the good photos (resolved through its parent).
    parent = dict(hour.posts[0])
    post("crosspost: resolves to its parent's image", f"https://www.reddit.com{parent['permalink']}",
         crosspost_parent_list=[parent], crosspost_parent=parent["name"])
    return hour


# ---- running it ---------------------------------------------------------------------------
def run_demo(home: Path | None = None) -> int:
    """Set everything up in ``home`` (default ./demo-home), run the hour through Airflow, report."""
    from mining.devserver import DevServer, Response
    from mining.replay import RedditReplay

    home = (home or Path(os.environ.get("MINING_DEMO_HOME", "demo-home"))).resolve()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mining-demo"
    photos = find_photos(cache)
    print(f"photos: {len(photos.liked)} liked, {len(photos.other)} other, from {photos.source}")
    rng = random.Random(11)
    liked = photos.liked[:]
    rng.shuffle(liked)
    n_gallery = min(24, max(6, int(len(liked) * 0.6)))
    gallery, heldout = liked[:n_gallery], liked[n_gallery:][:12]
    liked_dir = home / "liked"
    liked_dir.mkdir()
    for p in gallery:
        shutil.copyfile(p, liked_dir / p.name)

    now = datetime.now(UTC)
    interval = Interval.hour_of(now - timedelta(hours=1))
    server = DevServer().start()
    try:
        replay = RedditReplay(server, oauth=False)
        hour = build_hour(photos, gallery, heldout, interval, server.url)
        replay.add_posts(SUBREDDIT, hour.posts)
        replay.add_posts("all", hour.posts[:5])
        for name, data in hour.images.items():
            server.route(f"/img/{name}", Response(200, data, {"Content-Type": "image/jpeg"}))
        env = demo_env(home, server.url)
        os.environ.update(env)
        print(f"local Reddit at {server.url}: {len(hour.posts)} posts in r/{SUBREDDIT} for {interval}")

        print(f"\n$ mining init --liked {liked_dir}", flush=True)
        _mining(["init", "--liked", str(liked_dir)], env)
        # A manual run of a data-interval timetable owns the interval that ends at its date.
        print("\n$ airflow dags test mining_hourly " + interval.end.isoformat(), flush=True)
        airflow_setup(env)
        _check([_bin("airflow"), "dags", "test", "mining_hourly", interval.end.isoformat()], env,
               log_path=home / "airflow-dags-test.log")
    finally:
        server.stop()
    print_outcome(home, hour)
    print(f"""
Where to look next:
  gallery folder : {home / 'gallery'}
  SQL            : MINING_HOME={home} .venv/bin/mining sql "SELECT decision, reason FROM mined_images"
  Airflow UI     : make airflow   (then open http://localhost:8080)
  task logs      : {home / 'airflow-dags-test.log'}
""")
    return 0


def demo_env(home: Path, base_url: str) -> dict[str, str]:
    return {
        "MINING_HOME": str(home),
        "MINING_REDDIT_BASE_URL": base_url,
        "MINING_SOURCES": "all",
        "MINING_WATCH_LIST": SUBREDDIT,
        "MINING_ALLOWED_HOSTS": "127.0.0.1",
        "MINING_MIN_WIDTH": str(DEMO_MIN_SIZE[0]),
        "MINING_MIN_HEIGHT": str(DEMO_MIN_SIZE[1]),
        "MINING_REQUESTS_PER_MINUTE": "600",
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
    }


def airflow_setup(env: dict[str, str]) -> None:
    """Migrate the metadata DB and create the pools the DAGs name (a missing pool stalls silently)."""
    _check([_bin("airflow"), "db", "migrate"], env)
    for name, slots, desc in POOLS:
        _check([_bin("airflow"), "pools", "set", name, str(slots), desc], env)


POOLS = (("reddit_api", 1, "Reddit API request budget (one scraper at a time)"),
         ("warehouse_writer", 1, "DuckDB allows one writer"))


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _mining(args: list[str], env: dict[str, str]) -> None:
    _check([_bin("mining"), *args], env)


def _check(cmd: list[str], env: dict[str, str], log_path: Path | None = None) -> None:
    full = {**os.environ, **env}
    if log_path is None:
        proc = subprocess.run(cmd, env=full, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
    else:
        with open(log_path, "w") as fh:
            proc = subprocess.run(cmd, env=full, stdout=fh, stderr=subprocess.STDOUT, text=True)
        out = log_path.read_text()
    if proc.returncode != 0:
        print(out[-6000:], file=sys.stderr)
        raise SystemExit(f"demo step failed ({proc.returncode}): {' '.join(cmd)}")


def print_outcome(home: Path, hour: DemoHour) -> None:
    from mining.settings import load_settings
    from mining.warehouse import Warehouse

    settings = load_settings(env={"MINING_HOME": str(home)})
    with Warehouse.open(settings, read_only=True) as wh:
        _, rows = wh.query(
            "SELECT decision, count(*) AS n FROM mined_images GROUP BY decision ORDER BY n DESC")
        if not rows:
            raise SystemExit(f"the hourly run produced no decisions: see {home / 'airflow-dags-test.log'}")
        print("\nDecisions:   " + ", ".join(f"{d}: {n}" for d, n in rows))
        _, rows = wh.query(
            "SELECT post_id, subreddit, decision, reason, published_to FROM mined_images "
            "ORDER BY decision, post_id")
    width = max(len(v) for v in hour.expect.values())
    print(f"\n{'post':8} {'what it is':{width}}  decision   reason")
    for post_id, _sub, decision, reason, published in rows:
        what = hour.expect.get(post_id, "")
        tail = f"  -> {published}" if published else ""
        print(f"{post_id:8} {what:{width}}  {decision or '-':10} {(reason or '')[:110]}{tail}")
