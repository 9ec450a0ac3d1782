"""Link resolution and pre-filters: hand-made posts, then every recorded post in ../shared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mining.devserver import DevServer, Request, Response
from mining.links import Candidate, resolve
from mining.settings import Secret, Settings, load_settings


def post(pid: str = "abc", url: str = "https://i.redd.it/abc.jpg", **extra: Any) -> dict:
    p = {"id": pid, "name": f"t3_{pid}", "subreddit": "EarthPorn", "url": url, "over_18": False,
         "is_self": False, "is_video": False, "removed_by_category": None, "author": "someone"}
    p.update(extra)
    return p


def preview(url: str, w: int, h: int) -> dict:
    return {"images": [{"source": {"url": url, "width": w, "height": h}, "resolutions": []}]}


def one(cands: list[Candidate]) -> Candidate:
    assert len(cands) == 1, cands
    return cands[0]


@pytest.fixture
def offline(tmp_path: Path) -> Settings:
    """Settings for pure resolution tests: no server needed (small minimum size)."""
    return load_settings(env={}, home=tmp_path, min_width=64, min_height=64)


@pytest.fixture
def big(offline: Settings) -> Settings:
    """The production size limits (1280x1024, w/h <= 3, h/w <= 2)."""
    return offline.replace(min_width=1280, min_height=1024)


# ---- kinds ---------------------------------------------------------------------------------------
def test_ireddit_with_known_size(big: Settings) -> None:
    c = one(resolve(post(preview=preview("https://preview.redd.it/abc.jpg?a=1&amp;b=2", 4000, 3000)), big))
    assert (c.candidate_id, c.kind, c.url, c.known_width, c.known_height, c.status) == (
        "abc:0", "ireddit", "https://i.redd.it/abc.jpg", 4000, 3000, "pending")
    assert c.post_id == "abc" and c.subreddit == "EarthPorn" and c.position == 0


def test_direct_by_extension_and_by_post_hint(offline: Settings) -> None:
    assert one(resolve(post(url="https://example.org/p/x.PNG"), offline)).kind == "direct"
    c = one(resolve(post(url="https://i.reddituploads.com/7df9?fit=max&amp;h=1536", post_hint="image"), offline))
    assert (c.kind, c.url, c.status) == ("direct", "https://i.reddituploads.com/7df9?fit=max&h=1536", "pending")


def test_imgur_direct_and_page_links(offline: Settings) -> None:
    assert one(resolve(post(url="http://i.imgur.com/iym2tUu.jpg"), offline)).url == "http://i.imgur.com/iym2tUu.jpg"
    c = one(resolve(post(url="http://imgur.com/dvuHnNU"), offline))
    assert (c.kind, c.url) == ("imgur", "https://i.imgur.com/dvuHnNU.jpg")
    assert one(resolve(post(url="http://i.imgur.com/coZnjAL"), offline)).url == "https://i.imgur.com/coZnjAL.jpg"
    assert one(resolve(post(url="https://i.imgur.com/zmdA2j7.gifv"), offline)).status == "skipped:gifv"


def _gallery_post(**extra: Any) -> dict:
    meta = {
        "m1": {"status": "valid", "e": "Image", "s": {"u": "https://i.redd.it/m1.jpg?x=1&amp;y=2", "x": 2000, "y": 1500}},
        "m2": {"status": "failed"},
        "m3": {"status": "valid", "e": "AnimatedImage", "s": {"gif": "https://i.redd.it/m3.gif", "x": 1600, "y": 1200}},
        "m4": {"status": "valid", "e": "Image", "s": {"u": "https://i.redd.it/m4.jpg", "x": 300, "y": 200}},
        "m5": {"status": "unprocessed"},
    }
    order = ["m4", "m1", "m2", "m3", "m5"]
    return post("gal", "https://www.reddit.com/gallery/gal", is_gallery=True, media_metadata=meta,
                gallery_data={"items": [{"media_id": m, "id": i} for i, m in enumerate(order)]}, **extra)


def test_gallery_order_status_and_sizes(big: Settings) -> None:
    cands = resolve(_gallery_post(), big)
    assert [(c.candidate_id, c.kind, c.status) for c in cands] == [
        ("gal:0", "gallery", "skipped:too_small"),
        ("gal:1", "gallery", "pending"),
        ("gal:2", "gallery", "skipped:gallery_item_failed"),
        ("gal:3", "gallery", "skipped:animated"),
        ("gal:4", "gallery", "skipped:gallery_item_unprocessed"),
    ]
    assert cands[1].url == "https://i.redd.it/m1.jpg?x=1&y=2"  # &amp; undone
    assert (cands[1].known_width, cands[1].known_height) == (2000, 1500)
    animated = resolve(_gallery_post(), big.replace(allow_animated=True))[3]
    assert (animated.status, animated.url) == ("pending", "https://i.redd.it/m3.gif")


def test_gallery_without_gallery_data_uses_metadata_order(offline: Settings) -> None:
    p = _gallery_post()
    p["gallery_data"] = None
    cands = resolve(p, offline)
    assert [c.url for c in cands if c.pending] == ["https://i.redd.it/m1.jpg?x=1&y=2", "https://i.redd.it/m4.jpg"]
    assert [c.position for c in cands] == [0, 1, 2, 3, 4]
    assert resolve(p, offline) == cands  # deterministic


def test_crosspost_resolves_parent_gallery(offline: Settings) -> None:
    parent = _gallery_post()
    child = post("kid", "https://www.reddit.com/gallery/gal", crosspost_parent_list=[parent], subreddit="pics")
    cands = resolve(child, offline)
    assert {c.kind for c in cands} == {"crosspost:gallery"}
    assert [c.candidate_id for c in cands][:2] == ["kid:0", "kid:1"]
    assert all(c.post_id == "kid" and c.subreddit == "pics" for c in cands)
    deleted = dict(parent, removed_by_category="deleted", url="")
    assert one(resolve(post("kid", crosspost_parent_list=[deleted]), offline)).status == "skipped:deleted"


def test_preview_fallback_for_other_links(offline: Settings) -> None:
    p = post(url="https://news.example.com/story", post_hint="link",
             preview=preview("https://external-preview.redd.it/x.jpg?auto=webp&amp;s=1", 1200, 800))
    c = one(resolve(p, offline))
    assert (c.kind, c.url, c.known_width) == ("preview", "https://external-preview.redd.it/x.jpg?auto=webp&s=1", 1200)
    bare = one(resolve(post(url="https://news.example.com/story"), offline))
    assert bare.status == "skipped:unsupported_host"


# ---- pre-filters ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "status"), [
    ({"over_18": True}, "skipped:over_18"),
    ({"is_video": True, "url": "https://v.redd.it/xyz"}, "skipped:video"),
    ({"url": "https://v.redd.it/xyz"}, "skipped:video"),
    ({"url": "https://i.imgur.com/G7K3xO4.gifv"}, "skipped:gifv"),
    ({"url": "https://i.redd.it/anim.gif"}, "skipped:gif"),
    ({"is_self": True, "url": "https://www.reddit.com/r/x/comments/abc/"}, "skipped:self"),
    ({"removed_by_category": "moderator"}, "skipped:removed"),
    ({"removed_by_category": "deleted"}, "skipped:deleted"),
    ({"author": "[deleted]", "selftext": "[deleted]"}, "skipped:deleted"),
    ({"preview": preview("https://i.redd.it/abc.jpg", 1000, 900)}, "skipped:too_small"),
    ({"preview": preview("https://i.redd.it/abc.jpg", 4000, 1100)}, "skipped:aspect"),
    ({"preview": preview("https://i.redd.it/abc.jpg", 1300, 3000)}, "skipped:aspect"),
    ({"preview": preview("https://i.redd.it/abc.jpg", 3000, 1024)}, "pending"),
    ({"url": "ftp://example.org/x.jpg"}, "failed:bad_scheme"),
    ({"url": "file:///etc/passwd"}, "failed:bad_scheme"),
    ({"url": "https://www.flickr.com/photos/u/28308258436/"}, "skipped:flickr_no_api_key"),
    ({"url": "http://m.imgur.com/a/3a3rJ"}, "skipped:imgur_album_no_api_key"),
    ({"url": "http://imgur.com/gallery/ZW7TgjO"}, "skipped:imgur_album_no_api_key"),
])
def test_prefilters(big: Settings, extra: dict, status: str) -> None:
    assert one(resolve(post(**extra), big)).status == status


def test_nsfw_allowed_by_setting(offline: Settings) -> None:
    assert one(resolve(post(over_18=True), offline.replace(allow_nsfw=True))).status == "pending"


@pytest.mark.parametrize("bad", [
    None, [], "text", {"url": "https://i.redd.it/x.jpg"}, {"id": "p1", "over_18": "yes"},
    {"id": "p1", "is_gallery": True, "media_metadata": "oops"},
    {"id": "p1", "crosspost_parent_list": ["nope"]}, {"id": "p1", "url": 12},
])
def test_broken_posts_are_failed_rows_not_exceptions(offline: Settings, bad: Any) -> None:
    c = one(resolve(bad, offline))
    assert c.status.startswith("failed:bad_post:"), c


# ---- imgur and flickr APIs against a local fake ---------------------------------------------------
def test_imgur_album_through_api(settings: Settings, dev_server: DevServer) -> None:
    seen: list[Request] = []

    def album(req: Request) -> Response:
        seen.append(req)
        return Response.json({"success": True, "data": [
            {"link": "https://i.imgur.com/a1.jpg", "width": 2000, "height": 1500, "animated": False},
            {"link": "https://i.imgur.com/a2.gif", "width": 2000, "height": 1500, "animated": True},
            {"link": "https://i.imgur.com/a3.png", "width": 100, "height": 100, "animated": False},
        ]})

    dev_server.route("/3/album/3a3rJ/images", album)
    s = settings.replace(imgur_client_id=Secret("cid123"), imgur_api_url=f"{dev_server.url}/3", min_width=200)
    cands = resolve(post(url="http://m.imgur.com/a/3a3rJ"), s)
    assert [(c.candidate_id, c.kind, c.url, c.status) for c in cands] == [
        ("abc:0", "imgur_album", "https://i.imgur.com/a1.jpg", "pending"),
        ("abc:1", "imgur_album", "https://i.imgur.com/a2.gif", "skipped:animated"),
        ("abc:2", "imgur_album", "https://i.imgur.com/a3.png", "skipped:too_small"),
    ]
    assert seen[0].headers["authorization"] == "Client-ID cid123"
    missing = one(resolve(post(url="https://imgur.com/a/gone1"), s))
    assert missing.status == "failed:imgur_api:not_found"


def test_flickr_through_api(settings: Settings, dev_server: DevServer) -> None:
    def sizes(req: Request) -> Response:
        assert req.query["method"] == "flickr.photos.getSizes" and req.query["api_key"] == "fk"
        if req.query["photo_id"] != "8378201253":
            return Response.json({"stat": "fail", "code": 1, "message": "Photo not found"})
        return Response.json({"stat": "ok", "sizes": {"size": [
            {"label": "Large", "width": 1024, "height": 683, "source": "https://live.staticflickr.com/l.jpg",
             "media": "photo"},
            {"label": "Original", "width": 4000, "height": 2667, "source": "https://live.staticflickr.com/o.jpg",
             "media": "photo"},
        ]}})

    dev_server.route("/services/rest/", sizes)
    s = settings.replace(flickr_api_key=Secret("fk"), flickr_api_url=f"{dev_server.url}/services/rest/")
    c = one(resolve(post(url="https://www.flickr.com/photos/chucksutherland/8378201253/sizes/l"), s))
    assert (c.kind, c.url, c.known_width, c.status) == ("flickr", "https://live.staticflickr.com/o.jpg", 4000,
                                                        "pending")
    gone = one(resolve(post(url="https://www.flickr.com/photos/u/1/"), s))
    assert gone.status == "failed:flickr_api:fail"


# ---- the recorded responses --------------------------------------------------------------------
def _load_all(folder: Path) -> dict[str, dict]:
    posts: dict[str, dict] = {}
    for path in sorted(folder.glob("*.json")):
        body = json.loads(path.read_text())
        for child in body["data"]["children"]:
            posts[child["data"]["id"]] = child["data"]
    return posts


@pytest.mark.shared
def test_every_recorded_post_resolves(shared_reddit: Path, big: Settings) -> None:
    posts = _load_all(shared_reddit)
    assert len(posts) > 500
    by_id = {pid: resolve(p, big) for pid, p in posts.items()}
    for pid, cands in by_id.items():
        assert cands, pid
        for c in cands:
            assert c.status == "pending" or c.status.startswith(("skipped:", "failed:")), c
            assert not c.status.startswith("failed:bad_post"), c
            assert "&amp;" not in c.url, c
            assert c.candidate_id == f"{pid}:{c.position}"
        assert len({c.candidate_id for c in cands}) == len(cands)

    def statuses(pid: str) -> list[tuple[str, str]]:
        return [(c.kind, c.status) for c in by_id[pid]]

    # galleries with failed items and null gallery_data
    for pid in ("kzj67b", "kzj66m", "kzj666", "kzj64v"):
        assert posts[pid]["gallery_data"] is None
        assert {k for k, _ in statuses(pid)} == {"gallery"}
        assert "skipped:gallery_item_failed" in {s for _, s in statuses(pid)}
    assert [s for _, s in statuses("kzj66m")][:4] == ["skipped:gallery_item_failed"] * 4
    assert {s for _, s in statuses("kzj66y")} == {"skipped:over_18"}
    assert statuses("1skbrmr").count(("gallery", "skipped:animated")) == 1
    assert {s for _, s in statuses("1khu9tf")} == {"skipped:gallery_item_unprocessed"}
    # crossposts, galleries too; crossposts of videos and of deleted posts
    assert {k for k, _ in statuses("evf9ly")} == {"crosspost:ireddit"}
    assert statuses("evf9iy") == [("crosspost:imgur", "skipped:gifv")]
    assert statuses("kzj669") == [("ireddit", "skipped:over_18")]
    xgal = by_id["10ifyr0"]
    assert len(xgal) == 20 and {c.kind for c in xgal} == {"crosspost:gallery"}
    assert all("&amp;" not in c.url and c.url.startswith("https://") for c in xgal)
    assert statuses("116yyx6") == [("crosspost:link", "skipped:video")]
    assert statuses("xxp051") == [("crosspost:post", "skipped:deleted")]
    assert statuses("151unk5") == [("link", "skipped:removed")]
    # flickr/imgur without keys, imgur single images, gifv
    assert statuses("4t9uw7") == [("flickr", "skipped:flickr_no_api_key")]
    assert statuses("4t8fw1") == [("imgur_album", "skipped:imgur_album_no_api_key")]
    assert statuses("4t9jun") == [("imgur_album", "skipped:imgur_album_no_api_key")]
    assert by_id["4t9xg5"][0].url == "https://i.imgur.com/dvuHnNU.jpg"
    assert statuses("4t8m4s") == [("imgur", "skipped:gifv")]
    assert statuses("w9bomy") == [("imgur", "skipped:gifv")]
    assert statuses("1ski1ai")[0][0] == "imgur"
    # removed posts
    assert statuses("hknd1q") == statuses("gqslxv") == [("link", "skipped:deleted")]  # removed by author
    removed = [pid for pid, p in posts.items() if p.get("removed_by_category")]
    assert len(removed) >= 60
    assert all(statuses(pid)[0][1] in ("skipped:removed", "skipped:deleted") for pid in removed)
    # videos never reach the downloader
    for pid, p in posts.items():
        if p.get("is_video"):
            assert all(c.status != "pending" for c in by_id[pid]), pid


@pytest.mark.shared
def test_recorded_flickr_and_imgur_with_keys(shared_reddit: Path, settings: Settings, dev_server: DevServer) -> None:
    posts = _load_all(shared_reddit)
    dev_server.route("/3/album/", lambda req: Response.json({"data": [
        {"link": f"https://i.imgur.com/{req.path.split('/')[3]}_{i}.jpg", "width": 2000, "height": 1500}
        for i in range(2)]}), prefix=True)
    dev_server.route("/rest", lambda req: Response.json({"stat": "ok", "sizes": {"size": [
        {"label": "Original", "width": 3000, "height": 2000, "source": f"https://live.staticflickr.com/{req.query['photo_id']}.jpg"}]}}))
    s = settings.replace(imgur_client_id=Secret("c"), flickr_api_key=Secret("f"),
                         imgur_api_url=f"{dev_server.url}/3", flickr_api_url=f"{dev_server.url}/rest")
    flickr = [pid for pid, p in posts.items() if "flickr.com/photos/" in p.get("url", "")]
    assert len(flickr) >= 8
    for pid in flickr:
        c = one(resolve(posts[pid], s))
        assert c.status == "pending" and c.url.startswith("https://live.staticflickr.com/"), c
    album = resolve(posts["4t8fw1"], s)
    assert [c.url for c in album] == ["https://i.imgur.com/3a3rJ_0.jpg", "https://i.imgur.com/3a3rJ_1.jpg"]
    assert resolve(posts["4t9jun"], s)[0].url == "https://i.imgur.com/ZW7TgjO_0.jpg"
