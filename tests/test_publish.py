"""Publishers: sanitised, atomic, idempotent folder publishing; multipart HTTP against a real server."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import pytest

from mining.devserver import DevServer, Request, Response
from mining.publish import (
    MAX_NAME,
    FolderPublisher,
    HttpPublisher,
    NullPublisher,
    PublishItem,
    PublishResult,
    make_publisher,
    publish_pending,
)
from mining.settings import Secret, Settings

SECRET = "planted-s3cret-7f3a9c"  # must never appear in logs, errors or reprs
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.[a-z0-9]+$")


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "image.jpg"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg, but bytes with a sha256 " + os.urandom(64))
    return path


def make_item(path: Path, **changes: object) -> PublishItem:
    if "sha256" not in changes:
        changes["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    fields: dict[str, object] = dict(
        path=path, ext="jpg", candidate_id="abc123:2",
        post_id="abc123", subreddit="EarthPorn", title="Sunrise over the lake [OC] [4000x3000]",
        author="someone", permalink="https://www.reddit.com/r/EarthPorn/comments/abc123/sunrise/",
        image_url="https://i.redd.it/xyz.jpg", scores={"novelty_score": 0.81, "watermark_prob": 0.02},
        decision="accepted", reason="accepted: novelty 0.81 >= 0.7")
    fields.update(changes)
    return PublishItem(**fields)  # type: ignore[arg-type]


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---- folder publisher --------------------------------------------------------------------------
def test_folder_publish_writes_image_and_sidecar(tmp_path: Path, image_file: Path) -> None:
    gallery = tmp_path / "gallery"
    pub = FolderPublisher(gallery)
    item = make_item(image_file, scores={"novelty_score": 0.81, "watermark_prob": float("nan")})
    result = pub.publish(item)
    assert result.status == "published" and result.error is None and result.ok
    assert result.target == f"folder:{gallery.resolve()}" == pub.target
    dest = Path(result.location)
    assert dest.name == f"EarthPorn_abc123_2_{item.sha256[:8]}.jpg"
    assert dest.parent == gallery.resolve() and dest.read_bytes() == image_file.read_bytes()
    meta = json.loads(dest.with_suffix(".json").read_text())
    assert meta["permalink"] == item.permalink and meta["title"] == item.title
    assert meta["subreddit"] == "EarthPorn" and meta["author"] == "someone" and meta["sha256"] == item.sha256
    assert meta["source_url"] == item.image_url and meta["decision"] == "accepted" and meta["reason"] == item.reason
    assert meta["scores"] == {"novelty_score": 0.81, "watermark_prob": None}  # NaN is not JSON
    assert meta["published_at"].endswith("+00:00")
    assert sorted(p.name for p in gallery.iterdir()) == sorted([dest.name, dest.with_suffix(".json").name])


HOSTILE = [
    {"subreddit": "../../../etc", "post_id": "../passwd"},
    {"subreddit": "/etc/cron.d", "post_id": "/root/.ssh/authorized_keys", "ext": "/../../x"},
    {"subreddit": "a\x00b", "post_id": "c\x00/../d", "candidate_id": "c:../../1"},
    {"subreddit": "ＥａｒｔｈＰｏｒｎ", "post_id": "．．／．．／x"},  # fullwidth letters, dots and slash
    {"subreddit": "\u202egpj.exe", "post_id": "\u2215etc\u2215passwd"},  # RTL override, division slash
    {"subreddit": "..", "post_id": ".", "ext": ".."},
    {"subreddit": "", "post_id": "", "ext": "", "candidate_id": ""},
    {"subreddit": "S" * 5000, "post_id": "P" * 5000, "ext": "jpeg" * 50, "candidate_id": "x:" + "9" * 400},
    {"subreddit": "C:\\Windows\\System32", "post_id": "con", "ext": "png\n"},
    {"title": "../../../../tmp/pwned", "author": "/etc/passwd\x00"},
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_stranger_controlled_values_cannot_steer_the_file_name(tmp_path: Path, image_file: Path,
                                                              hostile: dict[str, str]) -> None:
    gallery = tmp_path / "deep" / "gallery"
    before = set(all_files(tmp_path))
    pub = FolderPublisher(gallery)
    item = make_item(image_file, **hostile)
    result = pub.publish(item)
    assert result.status == "published", result.error
    dest = Path(result.location)
    assert NAME_RE.match(dest.name), dest.name
    assert len(dest.name) <= MAX_NAME and dest.name.count(".") == 1
    assert dest.resolve().parent == gallery.resolve()
    created = set(all_files(tmp_path)) - before
    assert created == {dest, dest.with_suffix(".json")}  # nothing anywhere else
    assert pub.file_name(item) == dest.name  # deterministic
    meta = json.loads(dest.with_suffix(".json").read_text())
    assert meta["title"] == item.title and meta["subreddit"] == item.subreddit  # kept verbatim, as data


def test_title_never_reaches_the_file_name(tmp_path: Path, image_file: Path) -> None:
    pub = FolderPublisher(tmp_path / "g")
    a = pub.file_name(make_item(image_file, title="one"))
    b = pub.file_name(make_item(image_file, title="../../two"))
    assert a == b


def test_folder_publish_is_idempotent_per_sha256(tmp_path: Path, image_file: Path,
                                                 virtual_clock: object) -> None:
    gallery = tmp_path / "gallery"
    pub = FolderPublisher(gallery)
    first = pub.publish(make_item(image_file))
    sidecar = Path(first.location).with_suffix(".json")
    stamp = sidecar.read_text()
    virtual_clock.sleep(3600)  # type: ignore[attr-defined]
    again = pub.publish(make_item(image_file))
    repost = pub.publish(make_item(image_file, subreddit="pics", post_id="zzz999", candidate_id="zzz999:0"))
    assert again == first and repost == first
    assert sidecar.read_text() == stamp  # untouched
    assert len(list(gallery.iterdir())) == 2
    # a fresh publisher (next run) finds it too
    assert FolderPublisher(gallery).publish(make_item(image_file)).location == first.location


def test_folder_publish_finishes_a_half_done_publication(tmp_path: Path, image_file: Path) -> None:
    pub = FolderPublisher(tmp_path / "gallery")
    first = pub.publish(make_item(image_file))
    sidecar = Path(first.location).with_suffix(".json")
    sidecar.unlink()  # as if the run died between the image and its sidecar
    assert pub.publish(make_item(image_file)) == first
    assert json.loads(sidecar.read_text())["sha256"] == make_item(image_file).sha256


def test_a_different_image_with_the_same_sha_prefix_is_not_taken_for_it(tmp_path: Path, image_file: Path) -> None:
    gallery = tmp_path / "gallery"
    pub = FolderPublisher(gallery)
    item = make_item(image_file)
    gallery.mkdir()
    (gallery / f"other_post_0_{item.sha256[:8]}.jpg").write_bytes(b"someone else's bytes")
    result = pub.publish(item)
    assert result.status == "published" and Path(result.location).read_bytes() == image_file.read_bytes()


def test_folder_publish_writes_atomically(tmp_path: Path, image_file: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    gallery = tmp_path / "gallery"
    pub = FolderPublisher(gallery)
    real_replace = os.replace

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    result = pub.publish(make_item(image_file))
    assert result.status == "failed" and "No space left" in result.error and not result.ok
    assert list(gallery.iterdir()) == []  # no temp file, no partial image
    monkeypatch.setattr(os, "replace", real_replace)
    assert pub.publish(make_item(image_file)).status == "published"  # the next run retries
    assert not [p for p in gallery.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_folder_publish_reports_missing_or_changed_sources(tmp_path: Path, image_file: Path) -> None:
    pub = FolderPublisher(tmp_path / "gallery")
    missing = pub.publish(make_item(tmp_path / "gone.jpg", sha256=make_item(image_file).sha256))
    assert missing.status == "failed" and "missing" in missing.error
    wrong = pub.publish(make_item(image_file, sha256="0" * 64))
    assert wrong.status == "failed" and "sha256" in wrong.error
    bad = pub.publish(make_item(image_file, sha256="../../x"))
    assert bad.status == "failed"
    assert not (tmp_path / "gallery").exists() or list((tmp_path / "gallery").iterdir()) == []


# ---- http publisher --------------------------------------------------------------------------------
def parse_multipart(req: Request) -> dict[str, tuple[str | None, bytes]]:
    """Server side: the form's fields as name -> (filename, bytes)."""
    head = f"Content-Type: {req.headers['content-type']}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + req.body)
    assert msg.is_multipart()
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[name] = (part.get_filename(), part.get_payload(decode=True))
    return out


def test_http_publish_posts_multipart_with_bearer_and_idempotency_key(dev_server: DevServer,
                                                                      image_file: Path) -> None:
    seen: list[dict] = []

    def gallery_import(req: Request) -> Response:
        seen.append(parse_multipart(req))
        return Response.json({"id": 41, "url": f"{dev_server.url}/images/41"}, status=201)

    dev_server.route("/api/import", gallery_import)
    pub = HttpPublisher(f"{dev_server.url}/api/import", Secret(SECRET), timeout=(2, 5))
    item = make_item(image_file)
    result = pub.publish(item)
    assert result == PublishResult(item.sha256, f"http:{dev_server.url}/api/import", "published",
                                   f"{dev_server.url}/images/41")
    (req,) = dev_server.requests_to("/api/import")
    assert req.method == "POST"
    assert req.headers["authorization"] == f"Bearer {SECRET}"
    assert req.headers["idempotency-key"] == item.sha256
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    fields = seen[0]
    assert fields["image"] == (f"{item.sha256}.jpg", image_file.read_bytes())
    assert fields["source_url"][1].decode() == item.permalink
    tags = fields["tags"][1].decode().split(",")
    assert "subreddit:EarthPorn" in tags and "author:someone" in tags and "reddit" in tags
    assert fields["title"][1].decode() == item.title


def test_http_publish_non_2xx_is_a_failed_result(dev_server: DevServer, image_file: Path) -> None:
    dev_server.route("/api/import", Response(500, b"internal error", {"Content-Type": "text/plain"}))
    result = HttpPublisher(f"{dev_server.url}/api/import", SECRET).publish(make_item(image_file))
    assert result.status == "failed" and result.error.startswith("HTTP 500") and "internal error" in result.error
    dev_server.route("/api/import", Response(302, b"", {"Location": "https://elsewhere.example/login"}))
    redirected = HttpPublisher(f"{dev_server.url}/api/import", SECRET).publish(make_item(image_file))
    assert redirected.status == "failed" and "302" in redirected.error  # the secret is not followed anywhere
    assert len(dev_server.requests_to("/")) == 2


def test_http_publish_slow_server_times_out_as_failed(dev_server: DevServer, image_file: Path) -> None:
    dev_server.route("/api/import", Response(201, b"{}", {"Content-Type": "application/json"}, delay_s=2.0))
    result = HttpPublisher(f"{dev_server.url}/api/import", SECRET, timeout=(2.0, 0.3)).publish(make_item(image_file))
    assert result.status == "failed" and "timed out" in result.error.lower()


def test_http_publish_unreachable_server_is_failed(image_file: Path) -> None:
    with DevServer() as server:
        url = f"{server.url}/api/import"
    result = HttpPublisher(url, SECRET, timeout=(1.0, 1.0)).publish(make_item(image_file))
    assert result.status == "failed" and "ConnectionError" in result.error


def test_secret_never_leaks(dev_server: DevServer, image_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    def echo(req: Request) -> Response:  # a careless server echoing the credentials back
        return Response(403, f"bad token {req.headers.get('authorization')}".encode(), {"Content-Type": "text/plain"})

    dev_server.route("/api/import", echo)
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's included
    url = f"{dev_server.url.replace('http://', f'http://user:{SECRET}@')}/api/import"
    pub = HttpPublisher(url, Secret(SECRET), timeout=(1.0, 1.0))
    results = [pub.publish(make_item(image_file))]
    dev_server.route("/api/import", Response(200, b"", delay_s=1.5))
    results.append(pub.publish(make_item(image_file)))
    results += publish_pending([make_item(image_file, sha256="f" * 64)], pub, lambda s, t: False)
    assert [r.status for r in results] == ["failed", "failed", "failed"]
    assert dev_server.requests_to("/api/import")[0].headers["authorization"] == f"Bearer {SECRET}"
    text = caplog.text + repr(pub) + pub.target + "".join(repr(r) for r in results)
    assert "403" in text and "bad token Bearer ***" in text
    assert SECRET not in text


# ---- null publisher, factory, publish_pending -----------------------------------------------
def test_null_publisher_publishes_nothing(tmp_path: Path, image_file: Path) -> None:
    result = NullPublisher().publish(make_item(image_file))
    assert result.status == "skipped" and result.location is None and result.target == "none"
    assert all_files(tmp_path) == [image_file]


def test_make_publisher_from_settings(settings: Settings, dev_server: DevServer) -> None:
    folder = make_publisher(settings)
    assert isinstance(folder, FolderPublisher) and folder.gallery_dir == settings.gallery_path.resolve()
    assert folder.name == "folder"
    http = make_publisher(settings.replace(publisher="http", publish_url=f"{dev_server.url}/import",
                                           publish_secret=Secret(SECRET)))
    assert isinstance(http, HttpPublisher) and http.name == "http"
    assert http.timeout == (settings.connect_timeout_s, settings.read_timeout_s)
    assert SECRET not in repr(http)
    assert isinstance(make_publisher(settings.replace(publisher="none")), NullPublisher)


def test_publish_pending_skips_published_and_survives_failures(tmp_path: Path, image_file: Path) -> None:
    other = tmp_path / "store" / "other.png"
    other.write_bytes(b"\x89PNG other image bytes")
    pub = FolderPublisher(tmp_path / "gallery")
    done = {(make_item(other, ext="png").sha256, pub.target)}
    asked: list[tuple[str, str]] = []

    def already(sha: str, target: str) -> bool:
        asked.append((sha, target))
        if sha == "e" * 64:
            raise RuntimeError("warehouse hiccup")
        return (sha, target) in done

    items = [
        make_item(tmp_path / "missing.jpg", sha256="d" * 64),  # fails: source gone
        make_item(other, ext="png"),                          # already published: skipped
        make_item(image_file, sha256="e" * 64),                # the lookup raises: failed, not fatal
        make_item(image_file),                                 # published
        make_item(image_file, candidate_id="abc123:3"),       # same image again in the batch
    ]
    results = publish_pending(items, pub, already)
    assert [r.status for r in results] == ["failed", "already_published", "failed", "published",
                                           "already_published"]
    assert "warehouse hiccup" in results[2].error
    assert all(t == pub.target for _, t in asked)
    assert len(list((tmp_path / "gallery").glob("*.jpg"))) == 1 and not list((tmp_path / "gallery").glob("*.png"))


def test_publish_pending_turns_a_raising_publisher_into_failed_results(image_file: Path) -> None:
    class Broken:
        name = "broken"
        target = "broken:1"

        def publish(self, item: PublishItem) -> PublishResult:
            raise RuntimeError("boom")

    results = publish_pending([make_item(image_file), make_item(image_file, sha256="a" * 64)], Broken(),
                              lambda s, t: False)
    assert [(r.status, r.error) for r in results] == [("failed", "RuntimeError: boom")] * 2
