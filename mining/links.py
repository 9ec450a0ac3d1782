"""Link resolution: one Reddit post -> its image candidates, pre-filtered before any download.

Most of an hour's posts are not images we could use (self posts, videos, NSFW, news links,
thumbnails too small to be wallpapers). Deciding that from the post's JSON costs nothing,
while downloading costs bandwidth and politeness budget, so every cheap reason to skip is
applied here and recorded as ``skipped:<why>``: a skip is data the weekly report counts,
never a silent drop. A malformed post yields ``failed:bad_post:<detail>``, never an
exception, so one odd post cannot fail an hour.

imgur albums and flickr pages need their APIs (keys are optional settings); the API base
URLs are settings too, so tests point them at the local server.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import requests

from mining.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("ireddit", "direct", "gallery", "crosspost", "imgur", "imgur_album", "flickr", "preview")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
VIDEO_HOSTS = ("v.redd.it", "youtube.com", "youtu.be", "gfycat.com", "redgifs.com", "streamable.com",
               "vimeo.com", "twitch.tv", "clips.twitch.tv", "tiktok.com", "dailymotion.com")
MAX_CROSSPOST_DEPTH = 3
_IMGUR_ID = re.compile(r"^[A-Za-z0-9]{5,10}$")
_FLICKR_PHOTO = re.compile(r"^/photos/[^/]+/(\d+)(?:/|$)")


@dataclass(frozen=True)
class Candidate:
    """One image a post offers, with where it came from and what the pre-filters decided."""

    candidate_id: str  # "<post_id>:<position>"
    post_id: str
    subreddit: str
    position: int
    kind: str
    url: str
    known_width: int | None = None
    known_height: int | None = None
    status: str = "pending"  # pending | skipped:<why> | failed:<why>

    @property
    def pending(self) -> bool:
        return self.status == "pending"


def unescape(url: Any) -> str:
    """Undo Reddit's HTML escaping (``&amp;``) when the listing was fetched without raw_json=1."""
    if not isinstance(url, str):
        return ""
    return html.unescape(url) if "&" in url else url


def host_of(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _host_is(host: str, *domains: str) -> bool:
    return any(host == d or host.endswith("." + d) for d in domains)


def _ext(url: str) -> str:
    try:
        path = urlsplit(url).path.lower()
    except ValueError:
        return ""
    dot = path.rfind(".")
    return path[dot:] if dot > path.rfind("/") else ""


# ---- the public entry point ----------------------------------------------------------------------
def resolve(post: Any, settings: Settings, session: requests.Session | None = None) -> list[Candidate]:
    """Every image candidate of ``post`` in a stable order, each pending or with its skip reason.

    ``session`` is used only for the imgur/flickr APIs (and only when their keys are set).
    """
    post_id = _post_id(post)
    subreddit = post.get("subreddit") if isinstance(post, dict) else None
    subreddit = subreddit if isinstance(subreddit, str) else ""
    try:
        if not isinstance(post, dict):
            raise _BadPost(f"post is {type(post).__name__}, not an object")
        if not post_id:
            raise _BadPost("missing id")
        ctx = _Context(settings, session, post_id, subreddit)
        cands = _resolve_post(post, ctx, depth=0)
        return [_apply_size_filters(c, settings) for c in cands]
    except _BadPost as exc:
        return [_bad(post_id, subreddit, str(exc), post)]
    except Exception as exc:  # wrong types deep inside a post: data, not a crash
        return [_bad(post_id, subreddit, f"{type(exc).__name__}: {exc}", post)]


class _BadPost(ValueError):
    pass


def _post_id(post: Any) -> str:
    if not isinstance(post, dict):
        return ""
    pid = post.get("id")
    if isinstance(pid, str) and pid:
        return pid
    name = post.get("name")
    if isinstance(name, str) and name.startswith("t3_"):
        return name[3:]
    return ""


def _bad(post_id: str, subreddit: str, detail: str, post: Any) -> Candidate:
    pid = post_id or "unknown"
    url = post.get("url") if isinstance(post, dict) and isinstance(post.get("url"), str) else ""
    detail = re.sub(r"\s+", " ", detail)[:200]
    return Candidate(f"{pid}:0", pid, subreddit, 0, "post", unescape(url), None, None, f"failed:bad_post:{detail}")


@dataclass
class _Context:
    settings: Settings
    session: requests.Session | None
    post_id: str
    subreddit: str

    def cand(self, position: int, kind: str, url: str, w: Any = None, h: Any = None,
             status: str = "pending") -> Candidate:
        return Candidate(f"{self.post_id}:{position}", self.post_id, self.subreddit, position, kind,
                         unescape(url), _int_or_none(w), _int_or_none(h), status)

    def http(self) -> requests.Session:
        if self.session is None:
            self.session = requests.Session()
            self.session.headers["User-Agent"] = self.settings.user_agent
        return self.session


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _flag(post: dict, key: str) -> bool:
    value = post.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _BadPost(f"{key} is {type(value).__name__}, not a boolean")
    return value


def _str(post: dict, key: str) -> str:
    value = post.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadPost(f"{key} is {type(value).__name__}, not a string")
    return value


def _skip(ctx: _Context, post: dict, why: str) -> list[Candidate]:
    url = _str(post, "url")
    return [ctx.cand(0, _link_kind(url), url, status=f"skipped:{why}")]


def _removed_reason(post: dict) -> str | None:
    category = post.get("removed_by_category")
    if category:
        return "deleted" if category in ("deleted", "author") else "removed"  # "author": deleted by its author
    if _str(post, "author") == "[deleted]" and _str(post, "selftext") in ("[deleted]", "[removed]"):
        return "deleted"
    if _str(post, "selftext") == "[removed]" and _flag(post, "is_self"):
        return "removed"
    return None


def _resolve_post(post: dict, ctx: _Context, depth: int) -> list[Candidate]:
    """Post-level filters first (cheapest, and they apply to every image of the post)."""
    settings = ctx.settings
    reason = _removed_reason(post)
    if reason:
        return _skip(ctx, post, reason)
    if _flag(post, "over_18") and not settings.allow_nsfw:
        return _skip(ctx, post, "over_18")
    parents = post.get("crosspost_parent_list")
    if parents:
        if not isinstance(parents, list) or not isinstance(parents[0], dict):
            raise _BadPost("crosspost_parent_list is not a list of posts")
        if depth >= MAX_CROSSPOST_DEPTH:
            return _skip(ctx, post, "crosspost_too_deep")
        inner = _resolve_post(parents[0], ctx, depth + 1)
        return [replace(c, kind=c.kind if c.kind.startswith("crosspost:") else f"crosspost:{c.kind}")
                for c in inner]
    if _flag(post, "is_self"):
        return _skip(ctx, post, "self")
    url = unescape(_str(post, "url"))
    host = host_of(url)
    if _flag(post, "is_video") or _host_is(host, *VIDEO_HOSTS) or post.get("post_hint") in ("hosted:video",
                                                                                           "rich:video"):
        return _skip(ctx, post, "video")
    if _flag(post, "is_gallery") or (
        isinstance(post.get("gallery_data"), dict) and isinstance(post.get("media_metadata"), dict)
    ):
        return _gallery(post, ctx)
    return _link(post, url, host, ctx)


# ---- galleries ----------------------------------------------------------------------------------
def _gallery(post: dict, ctx: _Context) -> list[Candidate]:
    meta = post.get("media_metadata")
    if meta is None:
        return _skip(ctx, post, "gallery_unavailable")
    if not isinstance(meta, dict):
        raise _BadPost("media_metadata is not an object")
    gallery = post.get("gallery_data")
    if isinstance(gallery, dict) and isinstance(gallery.get("items"), list):
        order = [item.get("media_id") if isinstance(item, dict) else None for item in gallery["items"]]
    elif gallery is None:
        order = list(meta)  # Reddit's JSON order: the upload order, and stable across fetches
    else:
        raise _BadPost("gallery_data is not an object with items")
    if not order:
        return _skip(ctx, post, "gallery_empty")
    out = []
    for position, media_id in enumerate(order):
        item = meta.get(media_id) if isinstance(media_id, str) else None
        out.append(_gallery_item(ctx, position, media_id, item))
    return out


def _gallery_item(ctx: _Context, position: int, media_id: Any, item: Any) -> Candidate:
    if not isinstance(item, dict):
        return ctx.cand(position, "gallery", "", status=f"skipped:gallery_item_missing:{media_id}")
    status = item.get("status")
    if status != "valid":
        return ctx.cand(position, "gallery", "", status=f"skipped:gallery_item_{status or 'unknown'}")
    kind = item.get("e")
    source = item.get("s") if isinstance(item.get("s"), dict) else {}
    w, h = source.get("x"), source.get("y")
    if kind == "AnimatedImage":
        url = source.get("gif") or source.get("u") or ""
        if not ctx.settings.allow_animated:
            return ctx.cand(position, "gallery", url, w, h, status="skipped:animated")
        return ctx.cand(position, "gallery", url, w, h)
    if kind not in (None, "Image"):
        return ctx.cand(position, "gallery", "", status=f"skipped:gallery_item_{str(kind).lower()}")
    url = source.get("u")
    if not url:  # no source: fall back to the largest preview of the item
        previews = [p for p in item.get("p") or [] if isinstance(p, dict) and p.get("u")]
        if not previews:
            return ctx.cand(position, "gallery", "", status="skipped:gallery_item_no_url")
        best = max(previews, key=lambda p: (_int_or_none(p.get("x")) or 0) * (_int_or_none(p.get("y")) or 0))
        url, w, h = best["u"], best.get("x"), best.get("y")
    return ctx.cand(position, "gallery", url, w, h)


# ---- single links -------------------------------------------------------------------------------
def _link_kind(url: str) -> str:
    """Best-effort kind of a link for rows that were skipped before resolution."""
    host = host_of(url)
    if not host:
        return "post"
    if host == "i.redd.it":
        return "ireddit"
    if _host_is(host, "imgur.com"):
        return "imgur"
    if _host_is(host, "flickr.com"):
        return "flickr"
    if host == "preview.redd.it":
        return "preview"
    return "link"


def _preview_source(post: dict) -> tuple[str, Any, Any] | None:
    preview = post.get("preview")
    if not isinstance(preview, dict):
        return None
    images = preview.get("images")
    if not isinstance(images, list) or not images or not isinstance(images[0], dict):
        return None
    source = images[0].get("source")
    if not isinstance(source, dict) or not source.get("url"):
        return None
    return unescape(source["url"]), source.get("width"), source.get("height")


def _known_size(post: dict) -> tuple[Any, Any]:
    """The preview's source size is the original's for image posts (Reddit renders it from them)."""
    src = _preview_source(post)
    return (src[1], src[2]) if src else (None, None)


def _link(post: dict, url: str, host: str, ctx: _Context) -> list[Candidate]:
    scheme = urlsplit(url).scheme.lower() if url else ""
    if scheme and scheme not in ("http", "https"):
        return [ctx.cand(0, "direct", url, status="failed:bad_scheme")]
    if not url or not host:
        return _fallback(post, ctx, "unsupported_host", url)
    ext = _ext(url)
    if ext == ".gifv":
        return [ctx.cand(0, _link_kind(url) if host != "i.redd.it" else "ireddit", url, status="skipped:gifv")]
    if ext in VIDEO_EXTENSIONS:
        return [ctx.cand(0, _link_kind(url), url, status="skipped:video")]
    if ext == ".gif" and not ctx.settings.allow_animated:
        return [ctx.cand(0, "ireddit" if host == "i.redd.it" else _link_kind(url), url, status="skipped:gif")]
    w, h = _known_size(post)
    if host == "i.redd.it":
        return [ctx.cand(0, "ireddit", url, w, h)]
    if host == "preview.redd.it":
        return [ctx.cand(0, "preview", url, w, h)]
    if _host_is(host, "imgur.com"):
        return _imgur(post, url, host, ctx)
    if _host_is(host, "flickr.com") and _FLICKR_PHOTO.match(urlsplit(url).path):
        return _flickr(post, url, ctx)
    if ext in IMAGE_EXTENSIONS or ext == ".gif" or post.get("post_hint") == "image":
        return [ctx.cand(0, "direct", url, w, h)]
    if _host_is(host, "reddit.com") and "/gallery/" in urlsplit(url).path:
        return _skip(ctx, post, "gallery_unavailable")
    return _fallback(post, ctx, "unsupported_host", url)


def _fallback(post: dict, ctx: _Context, why: str, url: str) -> list[Candidate]:
    """Reddit's own preview of a link post beats nothing (it is often the article's photo)."""
    src = _preview_source(post)
    if src is not None:
        return [ctx.cand(0, "preview", src[0], src[1], src[2])]
    return [ctx.cand(0, _link_kind(url), url, status=f"skipped:{why}")]


def _imgur(post: dict, url: str, host: str, ctx: _Context) -> list[Candidate]:
    parts = [p for p in urlsplit(url).path.split("/") if p]
    w, h = _known_size(post)
    if host == "i.imgur.com":
        if not parts:
            return _fallback(post, ctx, "unsupported_host", url)
        name = parts[-1]
        stem, dot, ext = name.partition(".")
        direct = url if dot and f".{ext.lower()}" in (*IMAGE_EXTENSIONS, ".gif") else f"https://i.imgur.com/{stem}.jpg"
        return [ctx.cand(0, "imgur", direct, w, h)]
    if parts and parts[0] in ("a", "gallery") and len(parts) >= 2:
        return _imgur_album(post, parts[1], parts[0], url, ctx)
    if parts and parts[0] == "r" and len(parts) >= 3:
        parts = parts[2:]  # imgur.com/r/<sub>/<id>
    if len(parts) == 1:
        stem, _, ext = parts[0].partition(".")
        if _IMGUR_ID.match(stem):
            suffix = f".{ext.lower()}" if ext and f".{ext.lower()}" in (*IMAGE_EXTENSIONS, ".gif") else ".jpg"
            return [ctx.cand(0, "imgur", f"https://i.imgur.com/{stem}{suffix}", w, h)]
    return _fallback(post, ctx, "unsupported_host", url)


def _imgur_album(post: dict, album_id: str, form: str, url: str, ctx: _Context) -> list[Candidate]:
    settings = ctx.settings
    if not settings.imgur_client_id:
        return [ctx.cand(0, "imgur_album", url, status="skipped:imgur_album_no_api_key")]
    base = settings.imgur_api_url.rstrip("/")
    headers = {"Authorization": f"Client-ID {settings.imgur_client_id.value}"}
    try:
        data = _api_json(ctx, f"{base}/album/{album_id}/images", headers)
        if data is None and form == "gallery":  # /gallery/<id> can be a single image
            one = _api_json(ctx, f"{base}/image/{album_id}", headers)
            data = [one] if isinstance(one, dict) else None
    except _ApiError as exc:
        return [ctx.cand(0, "imgur_album", url, status=f"failed:imgur_api:{exc}")]
    if not isinstance(data, list):
        return [ctx.cand(0, "imgur_album", url, status="failed:imgur_api:not_found")]
    out = []
    for position, image in enumerate(data):
        if not isinstance(image, dict) or not isinstance(image.get("link"), str):
            out.append(ctx.cand(position, "imgur_album", "", status="skipped:album_item_no_url"))
            continue
        link, w, h = image["link"], image.get("width"), image.get("height")
        if image.get("animated") and not settings.allow_animated:
            out.append(ctx.cand(position, "imgur_album", link, w, h, status="skipped:animated"))
        else:
            out.append(ctx.cand(position, "imgur_album", link, w, h))
    return out or [ctx.cand(0, "imgur_album", url, status="skipped:album_empty")]


def _flickr(post: dict, url: str, ctx: _Context) -> list[Candidate]:
    settings = ctx.settings
    match = _FLICKR_PHOTO.match(urlsplit(url).path)
    if not settings.flickr_api_key:
        return [ctx.cand(0, "flickr", url, status="skipped:flickr_no_api_key")]
    assert match is not None
    params = (f"?method=flickr.photos.getSizes&api_key={settings.flickr_api_key.value}"
              f"&photo_id={match.group(1)}&format=json&nojsoncallback=1")
    try:
        data = _api_json(ctx, settings.flickr_api_url + params, {})
    except _ApiError as exc:
        return [ctx.cand(0, "flickr", url, status=f"failed:flickr_api:{exc}")]
    sizes = (data or {}).get("sizes", {}).get("size") if isinstance(data, dict) else None
    if not isinstance(sizes, list) or not sizes:
        stat = data.get("stat") if isinstance(data, dict) else None
        return [ctx.cand(0, "flickr", url, status=f"failed:flickr_api:{stat or 'no_sizes'}")]
    usable = [s for s in sizes if isinstance(s, dict) and s.get("source") and s.get("media", "photo") == "photo"]
    if not usable:
        return [ctx.cand(0, "flickr", url, status="failed:flickr_api:no_photo_sizes")]
    best = max(usable, key=lambda s: (_int_or_none(s.get("width")) or 0) * (_int_or_none(s.get("height")) or 0))
    return [ctx.cand(0, "flickr", best["source"], best.get("width"), best.get("height"))]


class _ApiError(Exception):
    pass


def _api_json(ctx: _Context, url: str, headers: dict[str, str]) -> Any:
    """GET an API document; None on 404 (no such album), _ApiError on anything else."""
    s = ctx.settings
    try:
        resp = ctx.http().get(url, headers=headers, timeout=(s.connect_timeout_s, s.read_timeout_s),
                              allow_redirects=False)
    except requests.Timeout:
        raise _ApiError("timeout") from None
    except requests.RequestException as exc:
        raise _ApiError(type(exc).__name__.lower()) from None
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise _ApiError(f"http_{resp.status_code}")
    try:
        payload = resp.json()
    except ValueError:
        raise _ApiError("bad_json") from None
    if isinstance(payload, dict) and "data" in payload and "stat" not in payload:
        return payload["data"]  # imgur wraps everything in {"data": ..., "success": ...}
    return payload


# ---- known-size pre-filters ---------------------------------------------------------------------
def size_verdict(width: int | None, height: int | None, settings: Settings) -> str | None:
    """``too_small`` / ``aspect`` for a known size, None when it passes or is unknown."""
    if not width or not height or width <= 0 or height <= 0:
        return None
    if width < settings.min_width or height < settings.min_height:
        return "too_small"
    if width / height > settings.max_aspect_wh or height / width > settings.max_aspect_hw:
        return "aspect"
    return None


def _apply_size_filters(c: Candidate, settings: Settings) -> Candidate:
    if not c.pending:
        return c
    if not c.url:
        return replace(c, status="skipped:no_url")
    why = size_verdict(c.known_width, c.known_height, settings)
    return replace(c, status=f"skipped:{why}") if why else c
