"""Publishers: where accepted images go (a gallery folder, a gallery's HTTP import, or nowhere).

Every publisher is idempotent for a given sha256 and reports per-item failures as a
:class:`PublishResult` instead of raising: exactly-once bookkeeping (the publications
table keyed by sha256 and target) lives with the pipeline, which records each result and
retries failures on the next run. Everything in a :class:`PublishItem` except the sha256
comes from strangers on Reddit, so nothing of it may steer a file name, and the HTTP
publisher's secret never appears in a log line, an error or a repr.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import requests

from mining import clock
from mining.lake import atomic_write_bytes, sha256_file
from mining.settings import Secret, Settings

log = logging.getLogger(__name__)

PUBLISHED, FAILED, SKIPPED, ALREADY = "published", "failed", "skipped", "already_published"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic"}
MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
        "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff", "avif": "image/avif", "heic": "image/heic"}
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_NAME = 100  # characters in a published file name, extension included


@dataclass(frozen=True)
class PublishItem:
    """One accepted image and what the gallery should know about it."""

    sha256: str
    path: Path  # the image file to publish (the content-addressed original)
    ext: str
    candidate_id: str
    post_id: str
    subreddit: str
    title: str = ""
    author: str = ""
    permalink: str = ""
    image_url: str = ""
    scores: dict[str, Any] = field(default_factory=dict)
    decision: str = "accepted"
    reason: str = ""


@dataclass(frozen=True)
class PublishResult:
    """What happened to one item: published (location), failed (error), skipped or already published."""

    sha256: str
    target: str
    status: str
    location: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in (PUBLISHED, ALREADY, SKIPPED)


class Publisher(Protocol):
    """``name`` is the kind (folder, http, none); ``target`` identifies where (the publications key)."""

    name: str

    @property
    def target(self) -> str: ...

    def publish(self, item: PublishItem) -> PublishResult: ...


# ---- helpers ------------------------------------------------------------------------------
def safe_component(text: object, limit: int) -> str:
    """ASCII letters, digits, '-' and '_' only: no separators, dots, NULs or look-alikes survive."""
    folded = unicodedata.normalize("NFKD", str(text or "")).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE.sub("-", folded).strip("-_")
    return cleaned[:limit].strip("-_") or "x"


def safe_ext(ext: str) -> str:
    ext = safe_component(ext.lower().lstrip("."), 5).lower()
    return "jpg" if ext == "jpeg" else ext if ext in IMAGE_EXTS else "img"


def _position(candidate_id: str) -> str:
    tail = str(candidate_id or "").rpartition(":")[2]
    return tail if tail.isdigit() else "0"


def _jsonable(value: Any) -> Any:
    """Scores as JSON: non-finite floats become null (json.dumps would write invalid NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or not _SHA_RE.match(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")


# ---- folder ---------------------------------------------------------------------------------
class FolderPublisher:
    """Copy images into a gallery folder under deterministic, sanitised names, with a JSON sidecar.

    ``<subreddit>_<post_id>_<position>_<sha8>.<ext>`` plus ``<same stem>.json``; both are
    written atomically (temp file + rename, image first). Publishing a sha256 that the folder
    already holds is a no-op that returns the existing file, whatever post it came from.
    """

    name = "folder"

    def __init__(self, gallery_dir: Path | str) -> None:
        self.gallery_dir = Path(gallery_dir).expanduser().resolve()

    @property
    def target(self) -> str:
        return f"folder:{self.gallery_dir}"

    def __repr__(self) -> str:
        return f"FolderPublisher({str(self.gallery_dir)!r})"

    def file_name(self, item: PublishItem) -> str:
        """The deterministic file name for an item (only [A-Za-z0-9_.-], at most MAX_NAME chars)."""
        _check_sha(item.sha256)
        ext = safe_ext(item.ext)
        tail = f"_{safe_component(_position(item.candidate_id), 6)}_{item.sha256[:8]}.{ext}"
        room = MAX_NAME - len(tail)
        sub = safe_component(item.subreddit, min(40, room // 2))
        post = safe_component(item.post_id, max(1, room - len(sub) - 1))
        return f"{sub}_{post}{tail}"

    def existing(self, sha256: str) -> Path | None:
        """The file in the folder whose content has this sha256, if any (names carry sha[:8])."""
        if not self.gallery_dir.is_dir():
            return None
        for path in sorted(self.gallery_dir.glob(f"*_{sha256[:8]}.*")):
            if path.suffix == ".json" or path.name.startswith(".") or not path.is_file():
                continue
            if sha256_file(path) == sha256:
                return path
        return None

    def _inside(self, path: Path) -> bool:
        return path.parent == self.gallery_dir and not path.name.startswith(".")

    def publish(self, item: PublishItem) -> PublishResult:
        try:
            _check_sha(item.sha256)
            found = self.existing(item.sha256)
            if found is not None:
                sidecar = found.with_suffix(".json")
                if not sidecar.exists():  # a crash between image and sidecar: finish the job
                    atomic_write_bytes(self._sidecar(item, found.name), sidecar)
                return PublishResult(item.sha256, self.target, PUBLISHED, str(found))
            source = Path(item.path)
            if not source.is_file():
                return PublishResult(item.sha256, self.target, FAILED, error=f"source image missing: {source}")
            data = source.read_bytes()
            if hashlib.sha256(data).hexdigest() != item.sha256:
                return PublishResult(item.sha256, self.target, FAILED,
                                     error=f"source image {source} does not have sha256 {item.sha256[:12]}")
            dest = self.gallery_dir / self.file_name(item)
            if not self._inside(dest):  # defence in depth: the name is built from a whitelist
                return PublishResult(item.sha256, self.target, FAILED, error="unsafe file name refused")
            atomic_write_bytes(data, dest)
            atomic_write_bytes(self._sidecar(item, dest.name), dest.with_suffix(".json"))
            log.info("published %s to %s", item.sha256[:12], dest)
            return PublishResult(item.sha256, self.target, PUBLISHED, str(dest))
        except (OSError, ValueError) as exc:
            return PublishResult(item.sha256, self.target, FAILED, error=f"{type(exc).__name__}: {exc}")

    def _sidecar(self, item: PublishItem, file_name: str) -> bytes:
        meta = {
            "file": file_name, "sha256": item.sha256, "permalink": item.permalink, "subreddit": item.subreddit,
            "title": item.title, "author": item.author, "post_id": item.post_id, "candidate_id": item.candidate_id,
            "source_url": item.image_url, "scores": _jsonable(item.scores), "decision": item.decision,
            "reason": item.reason, "published_at": datetime.fromtimestamp(clock.now(), UTC).isoformat(),
        }
        return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


# ---- http -------------------------------------------------------------------------------------
def _public_url(url: str) -> str:
    """The URL without user info or query: safe to log and to use as a target id."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class HttpPublisher:
    """POST each image as multipart (``image``, ``source_url``, ``tags``) to a gallery's import endpoint.

    The secret goes in an ``Authorization: Bearer`` header and nowhere else; the sha256 is sent
    as ``Idempotency-Key`` so a retried POST cannot create a second copy on a server that
    honours it. Non-2xx answers, timeouts and connection errors are failed results.
    """

    name = "http"

    def __init__(self, url: str, secret: Secret | str = "", *, timeout: tuple[float, float] = (5.0, 30.0),
                 user_agent: str = "mining-publisher", session: requests.Session | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"publish URL is not http(s): {_public_url(url)!r}")
        secret = secret if isinstance(secret, Secret) else Secret(secret)
        parts = urlsplit(url)
        # Credentials in the URL would make requests send Basic auth instead of our bearer
        # header: post to the URL without them, and use the password only if no secret is set.
        self._url_password = parts.password or ""
        if parts.username is not None or parts.password is not None:
            netloc = parts.netloc.rpartition("@")[2]
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
            if not secret and self._url_password:
                secret = Secret(self._url_password)
        self.url = url
        self._secret = secret
        self.timeout = timeout
        self.user_agent = user_agent
        self._session = session or requests.Session()
        self._session.trust_env = False  # no proxy or netrc surprises for a credentialed POST

    @property
    def target(self) -> str:
        return f"http:{_public_url(self.url)}"

    def __repr__(self) -> str:
        return f"HttpPublisher({_public_url(self.url)!r}, secret={self._secret!r})"

    def _redact(self, text: str) -> str:
        for value in (self._secret.value, self._url_password):
            if value:
                text = text.replace(value, "***")
        return text

    @staticmethod
    def tags(item: PublishItem) -> str:
        """Comma-separated tags: where it came from (values stripped of separators)."""
        tags = ["reddit", f"subreddit:{safe_component(item.subreddit, 50)}"]
        if item.author:
            tags.append(f"author:{safe_component(item.author, 40)}")
        if item.post_id:
            tags.append(f"post:{safe_component(item.post_id, 20)}")
        return ",".join(tags)

    def publish(self, item: PublishItem) -> PublishResult:
        try:
            _check_sha(item.sha256)
            data = Path(item.path).read_bytes()
        except (OSError, ValueError) as exc:
            return PublishResult(item.sha256, self.target, FAILED, error=f"{type(exc).__name__}: {exc}")
        ext = safe_ext(item.ext)
        headers = {"Idempotency-Key": item.sha256, "User-Agent": self.user_agent, "Accept": "application/json"}
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret.value}"
        fields = {"source_url": item.permalink or item.image_url, "tags": self.tags(item), "title": item.title,
                  "sha256": item.sha256, "image_url": item.image_url}
        files = {"image": (f"{item.sha256}.{ext}", data, MIME.get(ext, "application/octet-stream"))}
        try:
            resp = self._session.post(self.url, data=fields, files=files, headers=headers, timeout=self.timeout,
                                      allow_redirects=False)
        except requests.RequestException as exc:
            error = self._redact(f"{type(exc).__name__}: {exc}")
            log.warning("publish %s to %s failed: %s", item.sha256[:12], self.target, error)
            return PublishResult(item.sha256, self.target, FAILED, error=error)
        if not 200 <= resp.status_code < 300:
            body = self._redact(resp.text[:200].strip())
            error = f"HTTP {resp.status_code}: {body}" if body else f"HTTP {resp.status_code}"
            log.warning("publish %s to %s failed: %s", item.sha256[:12], self.target, error)
            return PublishResult(item.sha256, self.target, FAILED, error=error)
        location = resp.headers.get("Location")
        try:
            payload = resp.json()
            if isinstance(payload, dict):
                location = str(payload.get("url") or payload.get("location") or payload.get("id") or location or "")
        except ValueError:
            pass
        log.info("published %s to %s", item.sha256[:12], self.target)
        return PublishResult(item.sha256, self.target, PUBLISHED, self._redact(location) if location else None)


# ---- none ---------------------------------------------------------------------------------------
class NullPublisher:
    """Dry runs: publishes nothing and says so (its own target, so nothing counts as published)."""

    name = "none"
    target = "none"

    def publish(self, item: PublishItem) -> PublishResult:
        return PublishResult(item.sha256, self.target, SKIPPED, error="dry run: nothing published")


def make_publisher(settings: Settings) -> Publisher:
    """The publisher ``settings.publisher`` names (folder | http | none)."""
    if settings.publisher == "folder":
        return FolderPublisher(settings.gallery_path)
    if settings.publisher == "http":
        return HttpPublisher(settings.publish_url, settings.publish_secret,
                             timeout=(settings.connect_timeout_s, settings.read_timeout_s),
                             user_agent=settings.user_agent)
    if settings.publisher == "none":
        return NullPublisher()
    raise ValueError(f"unknown publisher {settings.publisher!r} (folder, http, none)")


def publish_pending(items: Iterable[PublishItem], publisher: Publisher,
                    already_published: Callable[[str, str], bool]) -> list[PublishResult]:
    """Publish what (sha256, target) has not seen yet; one item's failure never stops the rest."""
    results: list[PublishResult] = []
    done: set[str] = set()
    target = publisher.target
    for item in items:
        if item.sha256 in done:
            results.append(PublishResult(item.sha256, target, ALREADY))
            continue
        try:
            if already_published(item.sha256, target):
                results.append(PublishResult(item.sha256, target, ALREADY))
                done.add(item.sha256)
                continue
            result = publisher.publish(item)
        except Exception as exc:  # a broken publisher or lookup is this item's failure, not the run's
            secret = getattr(publisher, "_redact", None)
            error = f"{type(exc).__name__}: {exc}"
            result = PublishResult(item.sha256, target, FAILED, error=secret(error) if secret else error)
        if result.status == PUBLISHED:
            done.add(item.sha256)
        results.append(result)
    return results
