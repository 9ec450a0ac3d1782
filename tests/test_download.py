"""The safe downloader and the download step, against a real local server full of hostile hosts."""

from __future__ import annotations

import io
import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from PIL import Image
from test_imaging import jpeg_bytes, png_bomb

from mining import cli, clock, schemas
from mining.devserver import DevServer, Request, Response
from mining.download import Downloader, download_interval
from mining.lake import Interval, read_partition, write_partition
from mining.settings import Settings

HOUR = Interval(datetime(2026, 1, 2, 10, tzinfo=UTC), datetime(2026, 1, 2, 11, tzinfo=UTC))
NEXT = Interval(HOUR.end, HOUR.end + timedelta(hours=1))


def post_row(post: dict | str, hour: Interval = HOUR, post_id: str | None = None) -> dict:
    raw = post if isinstance(post, str) else json.dumps(post)
    pid = post_id or (post["id"] if isinstance(post, dict) else "broken")
    return {"post_id": pid, "subreddit": "EarthPorn", "source": "EarthPorn", "title": "t", "author": "a",
            "permalink": f"https://www.reddit.com/r/EarthPorn/comments/{pid}/", "url": None, "domain": None,
            "created_utc": hour.start + timedelta(minutes=5), "over_18": False, "is_self": False,
            "is_video": False, "is_gallery": False, "is_crosspost": False, "removed_by_category": None,
            "score": 1, "num_comments": 0, "fetched_at": hour.end, "raw_json": raw}


def post(pid: str, url: str, **extra: Any) -> dict:
    p = {"id": pid, "subreddit": "EarthPorn", "url": url, "over_18": False, "is_self": False,
         "is_video": False, "author": "x"}
    p.update(extra)
    return p


def write_posts(settings: Settings, posts: list[dict | str], hour: Interval = HOUR) -> None:
    rows = [post_row(p, hour, post_id=f"bad{i}" if isinstance(p, str) else None) for i, p in enumerate(posts)]
    write_partition(settings.lake_dir, "posts", hour, pa.Table.from_pylist(rows, schema=schemas.POSTS))


def candidates(settings: Settings, hour: Interval = HOUR) -> dict[str, dict]:
    table = read_partition(settings.lake_dir, "candidates", hour)
    assert table is not None
    assert table.schema == schemas.CANDIDATES
    return {r["candidate_id"]: r for r in table.to_pylist()}


def image_files(settings: Settings) -> set[Path]:
    return {p for p in (settings.home / "images").rglob("*") if p.is_file()}


def png_bytes(size: tuple[int, int] = (120, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


class Tracker:
    """A generator body that records how much of it the server managed to send."""

    def __init__(self, chunk: bytes, total: int | None, pause_s: float = 0.0, head: bytes = b"") -> None:
        self.chunk, self.total, self.pause_s, self.head = chunk, total, pause_s, head
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.head:
            self.sent += len(self.head)
            yield self.head
        while self.total is None or self.sent < self.total:
            if self.pause_s:
                time.sleep(self.pause_s)
            self.sent += len(self.chunk)
            yield self.chunk


@pytest.fixture
def hostile(settings: Settings, dev_server: DevServer) -> dict[str, Any]:
    """Routes for good images and every hostile case; returns the trackers and URLs."""
    base = dev_server.url
    good = {f"/img/good{i}.jpg": jpeg_bytes((200 + i, 150), (i * 40, 100, 50)) for i in range(3)}
    for path, data in good.items():
        dev_server.route(path, Response(200, data, {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/pic.png", Response(200, png_bytes(), {"Content-Type": "image/png"}))
    dev_server.route("/img/g1.jpg", Response(200, jpeg_bytes((300, 200), (1, 2, 3)), {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/g2.jpg", Response(200, jpeg_bytes((310, 200), (3, 2, 1)), {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/tiny.jpg", Response(200, jpeg_bytes((32, 32)), {"Content-Type": "image/jpeg"}))
    full = jpeg_bytes((900, 700), (9, 9, 9))
    dev_server.route("/img/truncated.jpg", Response(200, full[: len(full) // 2], {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/page.jpg", Response(200, b"<html><body>Not here</body></html>",
                                               {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/bomb.png", Response(200, png_bomb(), {"Content-Type": "image/png"}))
    huge = Tracker(b"\xff" * 65536, 100 * 1024 * 1024, head=b"\xff\xd8\xff\xe0")
    dev_server.route("/img/huge.jpg", lambda req: Response(200, huge, {"Content-Type": "image/jpeg"}))
    declared = Tracker(b"\x00" * 65536, 100 * 1024 * 1024)
    dev_server.route("/img/declared.jpg", lambda req: Response(
        200, declared, {"Content-Type": "image/jpeg", "Content-Length": str(100 * 1024 * 1024)}))
    endless = Tracker(b"\x00" * 1024, None, pause_s=0.05, head=b"\xff\xd8\xff\xe0")
    dev_server.route("/img/endless.jpg", lambda req: Response(200, endless, {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/slow.jpg", Response(200, jpeg_bytes(), {"Content-Type": "image/jpeg"}, delay_s=3.0))
    dev_server.route("/img/to-private.jpg", Response.redirect("http://10.0.0.1/x.jpg"))
    dev_server.route("/img/to-metadata.jpg", Response.redirect("http://169.254.169.254/latest/meta-data/"))
    dev_server.route("/img/to-file.jpg", Response.redirect("file:///etc/passwd"))
    dev_server.route("/loop/a.jpg", Response.redirect("/loop/b.jpg"))
    dev_server.route("/loop/b.jpg", Response.redirect(f"{base}/loop/a.jpg"))
    for i in range(10):
        dev_server.route(f"/chain/{i}.jpg", Response.redirect(f"/chain/{i + 1}.jpg", 301))
    dev_server.route("/img/moved.jpg", Response.redirect("/img/good0.jpg", 307))
    dev_server.route("/img/error.jpg", Response(500, b"oops"))
    return {"base": base, "huge": huge, "declared": declared, "endless": endless, "good": good}


def hostile_posts(base: str) -> tuple[list[dict | str], dict[str, str]]:
    """Posts and the status each candidate must end with."""
    gallery = post("gal", "https://www.reddit.com/gallery/gal", is_gallery=True,
                   gallery_data={"items": [{"media_id": "a"}, {"media_id": "b"}, {"media_id": "c"}]},
                   media_metadata={
                       "a": {"status": "valid", "e": "Image", "s": {"u": f"{base}/img/g1.jpg?x=1&amp;y=2",
                                                                  "x": 300, "y": 200}},
                       "b": {"status": "failed"},
                       "c": {"status": "valid", "e": "Image", "s": {"u": f"{base}/img/g2.jpg", "x": 310, "y": 200}},
                   })
    posts: list[dict | str] = [
        post("good0", f"{base}/img/good0.jpg"), post("good1", f"{base}/img/good1.jpg"),
        post("good2", f"{base}/img/good2.jpg", post_hint="image"), post("png", f"{base}/img/pic.png"),
        gallery, post("moved", f"{base}/img/moved.jpg"),
        '{"id": "broken", "url": "http://x/y.jpg", ',  # malformed JSON
        post("types", f"{base}/img/good0.jpg", over_18="sometimes"),
        post("tiny", f"{base}/img/tiny.jpg"), post("trunc", f"{base}/img/truncated.jpg"),
        post("html", f"{base}/img/page.jpg"), post("bomb", f"{base}/img/bomb.png"),
        post("huge", f"{base}/img/huge.jpg"), post("declared", f"{base}/img/declared.jpg"),
        post("endless", f"{base}/img/endless.jpg"), post("slow", f"{base}/img/slow.jpg"),
        post("priv", f"{base}/img/to-private.jpg"), post("meta", f"{base}/img/to-metadata.jpg"),
        post("tofile", f"{base}/img/to-file.jpg"), post("loop", f"{base}/loop/a.jpg"),
        post("chain", f"{base}/chain/0.jpg"), post("missing", f"{base}/img/missing.jpg"),
        post("err", f"{base}/img/error.jpg"), post("ftp", "ftp://example.org/a.jpg"),
        post("file", "file:///etc/passwd"), post("nsfw", f"{base}/img/good1.jpg", over_18=True),
        post("vid", "https://v.redd.it/abc", is_video=True),
    ]
    expect = {
        "good0:0": "downloaded", "good1:0": "downloaded", "good2:0": "downloaded", "png:0": "downloaded",
        "gal:0": "downloaded", "gal:1": "skipped:gallery_item_failed", "gal:2": "downloaded",
        "moved:0": "downloaded", "bad6:0": "failed:bad_post", "types:0": "failed:bad_post",
        "tiny:0": "skipped:too_small", "trunc:0": "failed:truncated", "html:0": "failed:not_an_image",
        "bomb:0": "failed:decompression_bomb", "huge:0": "failed:too_large", "declared:0": "failed:too_large",
        "endless:0": "failed:timeout", "slow:0": "failed:timeout", "priv:0": "failed:private_address",
        "meta:0": "failed:private_address", "tofile:0": "failed:bad_scheme", "loop:0": "failed:redirect_loop",
        "chain:0": "failed:too_many_redirects", "missing:0": "failed:http_404", "err:0": "failed:http_500",
        "ftp:0": "failed:bad_scheme", "file:0": "failed:bad_scheme", "nsfw:0": "skipped:over_18",
        "vid:0": "skipped:video",
    }
    return posts, expect


@pytest.fixture
def tight(settings: Settings) -> Settings:
    """Small caps so hostile cases finish fast; only 127.0.0.1 is exempt from the address guard."""
    # Connect timeout above the 1 s SYN retransmit: the test server's accept backlog is small.
    return settings.replace(max_image_bytes=4 * 1024 * 1024, download_deadline_s=3.0, read_timeout_s=1.0,
                            connect_timeout_s=2.5, per_host_concurrency=4, per_host_rate_per_s=1000.0,
                            download_workers=6)


def test_hostile_interval_completes_with_every_status_recorded(tight: Settings, hostile: dict) -> None:
    posts, expect = hostile_posts(hostile["base"])
    write_posts(tight, posts)
    result = download_interval(tight, HOUR)
    rows = candidates(tight)
    got = {cid: (r["status"] if not r["status"].startswith("failed:bad_post") else "failed:bad_post")
           for cid, r in rows.items()}
    assert got == expect
    # The good ones really are on disk, content-addressed, and described.
    for cid in ("good0:0", "good1:0", "good2:0", "png:0", "gal:0", "gal:2", "moved:0"):
        r = rows[cid]
        path = tight.home / r["path"]
        assert path.is_file() and path.name == f"{r['sha256']}.{'png' if cid == 'png:0' else 'jpg'}"
        assert r["path"] == f"images/{r['sha256'][:2]}/{r['sha256'][2:4]}/{path.name}"
        assert r["bytes"] == path.stat().st_size and r["http_status"] == 200
        assert r["format"] in ("JPEG", "PNG") and r["width"] and r["height"]
        assert r["interval_start"] == HOUR.start
    assert rows["gal:0"]["url"].endswith("/img/g1.jpg?x=1&y=2")
    assert rows["moved:0"]["sha256"] == rows["good0:0"]["sha256"]  # one file per distinct content
    assert rows["tiny:0"]["width"] == 32  # real size recorded for the skip
    assert rows["priv:0"]["elapsed_s"] < 0.5 and rows["meta:0"]["elapsed_s"] < 0.5  # refused, never connected
    assert len(image_files(tight)) == 6
    # The 100 MB bodies were cut at the cap, not read to the end.
    assert hostile["huge"].sent < 40 * 1024 * 1024
    assert hostile["declared"].sent < 40 * 1024 * 1024
    assert result.counts["downloaded"] == 7 and result.counts["candidates"] == len(expect)
    assert sum(v for k, v in result.counts.items() if k != "candidates") == len(expect)


def test_rerun_is_identical_and_fetches_nothing(settings: Settings, dev_server: DevServer) -> None:
    for i in range(4):
        dev_server.route(f"/img/{i}.jpg", Response(200, jpeg_bytes((100 + i, 100)), {"Content-Type": "image/jpeg"}))
    write_posts(settings, [post(f"p{i}", f"{dev_server.url}/img/{i}.jpg") for i in range(4)]
                + [post("dup", f"{dev_server.url}/img/0.jpg")])
    download_interval(settings, HOUR)
    first, files = candidates(settings), image_files(settings)
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    served = len(dev_server.requests_to("/img/"))
    assert served == 4  # the duplicate URL is fetched once
    download_interval(settings, HOUR)
    assert candidates(settings) == first
    assert image_files(settings) == files and {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert len(dev_server.requests_to("/img/")) == served
    assert {r["status"] for r in first.values()} == {"downloaded"}


def test_rerun_after_partial_failure_fetches_only_what_is_missing(settings: Settings, dev_server: DevServer) -> None:
    broken = {"on": True}
    data = jpeg_bytes((150, 150), (5, 5, 5))

    def flaky(req: Request) -> Response:
        return Response(503, b"busy") if broken["on"] else Response(200, data, {"Content-Type": "image/jpeg"})

    for i in range(3):
        dev_server.route(f"/img/{i}.jpg", Response(200, jpeg_bytes((100 + i, 100)), {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/flaky.jpg", flaky)
    write_posts(settings, [post(f"p{i}", f"{dev_server.url}/img/{i}.jpg") for i in range(3)]
                + [post("flaky", f"{dev_server.url}/img/flaky.jpg")])
    download_interval(settings, HOUR)
    assert candidates(settings)["flaky:0"]["status"] == "failed:http_503"
    before = len(dev_server.log)
    broken["on"] = False
    download_interval(settings, HOUR)
    assert [r.path for r in dev_server.log[before:]] == ["/img/flaky.jpg"]
    assert {r["status"] for r in candidates(settings).values()} == {"downloaded"}
    # A deleted file is fetched again too (the record alone is not trusted).
    victim = settings.home / candidates(settings)["p1:0"]["path"]
    victim.unlink()
    before = len(dev_server.log)
    download_interval(settings, HOUR)
    assert [r.path for r in dev_server.log[before:]] == ["/img/1.jpg"] and victim.is_file()


def test_url_from_an_earlier_interval_is_skipped_with_its_sha(settings: Settings, dev_server: DevServer) -> None:
    dev_server.route("/img/a.jpg", Response(200, jpeg_bytes((120, 90)), {"Content-Type": "image/jpeg"}))
    dev_server.route("/img/b.jpg", Response(200, jpeg_bytes((130, 90)), {"Content-Type": "image/jpeg"}))
    write_posts(settings, [post("first", f"{dev_server.url}/img/a.jpg")], HOUR)
    write_posts(settings, [post("again", f"{dev_server.url}/img/a.jpg"), post("new", f"{dev_server.url}/img/b.jpg")],
                NEXT)
    result = download_interval(settings, Interval(HOUR.start, NEXT.end))  # two hours, in order
    assert result.counts == {"downloaded": 2, "skipped:already_downloaded": 1, "candidates": 3}
    first, second = candidates(settings, HOUR), candidates(settings, NEXT)
    assert second["again:0"]["status"] == "skipped:already_downloaded"
    assert second["again:0"]["sha256"] == first["first:0"]["sha256"]
    assert second["new:0"]["status"] == "downloaded"
    assert len(dev_server.requests_to("/img/a.jpg")) == 1
    # Rerunning the earlier hour still says downloaded (it owns the URL), without fetching.
    download_interval(settings, HOUR)
    assert candidates(settings, HOUR) == first and len(dev_server.requests_to("/img/a.jpg")) == 1


def test_missing_posts_partition_is_a_run_failure(settings: Settings) -> None:
    with pytest.raises(FileNotFoundError, match="scrape"):
        download_interval(settings, HOUR)


def test_private_first_hop_refused_without_connecting(settings: Settings, dev_server: DevServer) -> None:
    dev_server.route("/img/x.jpg", Response(200, jpeg_bytes(), {"Content-Type": "image/jpeg"}))
    strict = settings.replace(allowed_hosts=())
    for url in (f"{dev_server.url}/img/x.jpg", f"http://localhost:{dev_server.port}/img/x.jpg",
                "http://[::1]/x.jpg", "http://0.0.0.0/x.jpg", "http://224.0.0.1/x.jpg"):
        assert Downloader(strict, store=False).fetch(url).status == "failed:private_address", url
    assert dev_server.log == []
    cidr = settings.replace(allowed_hosts=("127.0.0.0/8",))
    assert Downloader(cidr, store=False).fetch(f"{dev_server.url}/img/x.jpg").status == "downloaded"


def test_per_host_concurrency_and_rate(settings: Settings, dev_server: DevServer,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Real time here: a shared virtual clock cannot order concurrent sleeps.
    monkeypatch.setattr(clock, "monotonic", time.monotonic)
    monkeypatch.setattr(clock, "now", time.time)
    monkeypatch.setattr(clock, "sleep", time.sleep)
    data = jpeg_bytes((100, 100))
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def slow(req: Request) -> Response:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.3)  # long enough that 10/s alone would put 3 in flight
        with lock:
            state["now"] -= 1
        return Response(200, data + req.path.encode(), {"Content-Type": "image/jpeg"})

    dev_server.route("/c/", slow, prefix=True)
    s = settings.replace(download_workers=8, per_host_concurrency=2, per_host_rate_per_s=10.0)
    results = Downloader(s).fetch_many([f"{dev_server.url}/c/{i}.jpg" for i in range(12)])
    assert {r.status for r in results.values()} == {"downloaded"}
    assert state["max"] == 2
    starts = sorted(r.at for r in dev_server.requests_to("/c/"))
    # 12 starts at 10/s span 1.1 s (unlimited it would be ~0 s); slack for a busy machine.
    assert starts[-1] - starts[0] >= 0.8
    other = Downloader(s).fetch(f"{dev_server.url}/c/other.jpg")  # a fresh host gate starts at once
    assert other.status == "downloaded"


def test_cli_prints_summary(settings: Settings, dev_server: DevServer, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    dev_server.route("/img/a.jpg", Response(200, jpeg_bytes((120, 90)), {"Content-Type": "image/jpeg"}))
    write_posts(settings, [post("a", f"{dev_server.url}/img/a.jpg"), post("s", "https://x/", is_self=True)])
    monkeypatch.setenv("MINING_HOME", str(settings.home))
    monkeypatch.setenv("MINING_ALLOWED_HOSTS", "127.0.0.1")
    monkeypatch.setenv("MINING_MIN_WIDTH", "64")
    monkeypatch.setenv("MINING_MIN_HEIGHT", "64")
    assert cli.main(["download", "--start", HOUR.start.isoformat()]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"downloaded": 1, "skipped:self": 1} and summary["total"] == 2
    assert cli.main(["download", "--start", "2020-01-01T00:00:00"]) == 1  # nothing scraped there


def test_https_verifies_the_certificate_of_the_pinned_host(settings: Settings, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    with DevServer() as server:
        server.route("/a.jpg", Response(200, jpeg_bytes(), {"Content-Type": "image/jpeg"}))
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        server.httpd.socket = server_ctx.wrap_socket(server.httpd.socket, server_side=True)
        url = f"https://localhost:{server.port}/a.jpg"
        assert Downloader(settings, store=False).fetch(url).status == "failed:tls"  # self-signed: refused
        trusted = ssl.create_default_context(cafile=str(cert))
        assert Downloader(settings, store=False, tls_context=trusted).fetch(url).status == "downloaded"


def test_deadline_starts_when_the_host_slot_is_free(settings: Settings, dev_server: DevServer) -> None:
    for i in range(3):
        dev_server.route(f"/q/{i}.jpg", Response(200, jpeg_bytes((100 + i, 100)), {"Content-Type": "image/jpeg"},
                                                 delay_s=0.5))
    s = settings.replace(per_host_concurrency=1, download_workers=3, download_deadline_s=1.2, read_timeout_s=1.0)
    results = Downloader(s).fetch_many([f"{dev_server.url}/q/{i}.jpg" for i in range(3)])
    # 1.5 s in a queue for one host slot, yet nobody timed out: queueing is not the server's slowness.
    assert [r.status for r in results.values()] == ["downloaded"] * 3
    assert all(r.elapsed_s is not None and r.elapsed_s < 1.2 for r in results.values())
