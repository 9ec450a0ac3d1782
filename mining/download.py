"""The safe downloader and the download step.

Image URLs come from strangers, so every fetch is treated as hostile: http/https only;
every hop (the first request and each redirect, followed by hand) resolved and refused
when any address is private, loopback, link-local, multicast, reserved or unspecified
(unless ``allowed_hosts`` says otherwise), then connected to *that* address so DNS cannot
be re-bound between check and connect; connect/read timeouts plus a total deadline checked
while streaming; a size cap checked on Content-Length and again while streaming; the format
from magic bytes; Pillow verification with a pixel limit; the real size re-checked.
Politeness: a thread pool, with per-host concurrency and a per-host request rate.

Outcomes are data (``downloaded`` / ``skipped:<why>`` / ``failed:<why>``), never exceptions.
Images are stored by content (``images/ab/cd/<sha256>.<ext>``), written once, atomically.

A URL index under ``state/urls`` records, per URL and per interval, what a download
produced. It makes reruns cheap and identical (a rerun of the same interval reuses the
record and fetches only what is missing) and lets a later interval mark a URL seen in an
earlier one ``skipped:already_downloaded``. One small file per (URL, interval), written
atomically by the interval that owns it, so parallel runs (backfills) never contend.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
import requests

from mining import clock, schemas
from mining.imaging import ImageRejected, verify_image
from mining.lake import Interval, StepResult, atomic_write_bytes, read_partition, write_partition
from mining.links import Candidate, resolve, size_verdict
from mining.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
REDIRECT_CODES = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class DownloadResult:
    """What fetching one URL produced; the candidate row's download columns."""

    url: str
    status: str  # downloaded | skipped:<why> | failed:<why>
    sha256: str | None = None
    path: str | None = None  # relative to MINING_HOME
    format: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    http_status: int | None = None
    elapsed_s: float | None = None
    final_url: str | None = None


class _Failed(Exception):
    def __init__(self, reason: str, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status


# ---- address guard ------------------------------------------------------------------------------
def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or not ip.is_global)


class AddressGuard:
    """Decides whether a host may be connected to; ``allowed`` holds hostnames, IPs or CIDRs."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed:
            entry = entry.strip().lower()
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.rstrip("."))

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to; _Failed('private_address') when any of them is refused."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError):
            raise _Failed("dns") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise _Failed("dns")
        if host.lower().rstrip(".") in self.hosts:
            return addresses
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            if _blocked(ip) and not any(ip in net for net in self.networks):
                raise _Failed("private_address")
        return addresses


# ---- pinned connections (connect to the address we checked) -------------------------------------
class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self._address, self._read_timeout = address, read_timeout

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(self._read_timeout)


class _PinnedHTTPS(_PinnedHTTP):
    default_port = 443

    def __init__(self, *args: object, context: ssl.SSLContext, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self._context = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.sock.settimeout(self._read_timeout)


# ---- politeness ---------------------------------------------------------------------------------
class _HostGate:
    """At most ``concurrency`` requests in flight and ``rate`` request starts per second, per host."""

    def __init__(self, concurrency: int, rate_per_s: float) -> None:
        self.concurrency, self.interval = concurrency, 1.0 / rate_per_s
        self._lock = threading.Lock()
        self._sems: dict[str, threading.BoundedSemaphore] = {}
        self._next: dict[str, float] = {}

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        with self._lock:
            sem = self._sems.setdefault(host, threading.BoundedSemaphore(self.concurrency))
        with sem:
            with self._lock:
                now = clock.monotonic()
                start = max(now, self._next.get(host, now))
                self._next[host] = start + self.interval
            clock.sleep(start - now)
            yield


# ---- the downloader -----------------------------------------------------------------------------
class Downloader:
    """Fetches untrusted image URLs safely, in parallel, politely; stores them by content."""

    def __init__(self, settings: Settings, store: bool = True, tls_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.store = store
        self.guard = AddressGuard(settings.allowed_hosts)
        self.gate = _HostGate(settings.per_host_concurrency, settings.per_host_rate_per_s)
        self._tls = tls_context or ssl.create_default_context()
        self.requests_made = 0
        self._count_lock = threading.Lock()

    # -- many ---------------------------------------------------------------------------
    def fetch_many(self, urls: Iterable[str]) -> dict[str, DownloadResult]:
        """Fetch each distinct URL once on the thread pool; results keyed by URL."""
        distinct = list(dict.fromkeys(urls))
        if not distinct:
            return {}
        workers = max(1, min(self.settings.download_workers, len(distinct)))
        ordered = _round_robin_by_host(distinct)  # workers blocked on one busy host leave others moving
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
            results = dict(zip(ordered, pool.map(self.fetch, ordered), strict=True))
        return {url: results[url] for url in distinct}

    # -- one ----------------------------------------------------------------------------
    def fetch(self, url: str) -> DownloadResult:
        """Download, verify and store one URL; never raises for per-URL problems."""
        # The clock starts when the first hop gets its host slot: waiting behind other
        # downloads from the same host is politeness, not a slow server.
        began: list[float] = []
        try:
            body, final_url, http_status = self._get(url, began)
        except _Failed as exc:
            return DownloadResult(url, f"failed:{exc.reason}", http_status=exc.http_status,
                                  elapsed_s=_since(began))
        except Exception as exc:  # defensive: a bug in one fetch must not fail the run
            log.exception("unexpected error fetching %s", url)
            return DownloadResult(url, f"failed:error:{type(exc).__name__}", elapsed_s=_since(began))
        started = began[0]
        sha = hashlib.sha256(body).hexdigest()
        common = {"sha256": sha, "bytes": len(body), "http_status": http_status, "final_url": final_url}
        try:
            info = verify_image(body, self.settings)
        except ImageRejected as exc:
            return DownloadResult(url, f"failed:{exc.reason}", elapsed_s=round(clock.monotonic() - started, 3),
                                  **common)
        dims = {"format": info.format, "width": info.width, "height": info.height}
        why = size_verdict(info.width, info.height, self.settings)
        if why is None and info.animated and not self.settings.allow_animated:
            why = "animated"
        if why is not None:
            return DownloadResult(url, f"skipped:{why}", elapsed_s=round(clock.monotonic() - started, 3),
                                  **common, **dims)
        rel = image_relpath(sha, info.extension)
        if self.store:
            try:
                store_bytes(self.settings.home / rel, body)
            except OSError as exc:
                raise OSError(f"cannot store image {rel}: {exc}") from exc  # a full disk fails the run
        return DownloadResult(url, "downloaded", path=str(rel), elapsed_s=round(clock.monotonic() - started, 3),
                              **common, **dims)

    def _get(self, url: str, began: list[float]) -> tuple[bytes, str, int]:
        """Follow redirects by hand, checking every hop; the body of the final 200."""
        seen: set[str] = set()
        current = url
        deadline = float("inf")
        for _hop in range(self.settings.max_redirects + 1):
            if current in seen:
                raise _Failed("redirect_loop")
            seen.add(current)
            parts = _split(current)
            with self.gate.slot(f"{parts.host}:{parts.port}"):
                if not began:
                    began.append(clock.monotonic())
                    deadline = began[0] + self.settings.download_deadline_s
                if clock.monotonic() >= deadline:
                    raise _Failed("timeout")
                conn, resp = self._request(parts, deadline)
                try:
                    status = resp.status
                    if status in REDIRECT_CODES:
                        location = resp.getheader("Location")
                        if not location:
                            raise _Failed("bad_redirect", status)
                        current = urljoin(current, location.strip())
                        continue
                    if status != 200:
                        raise _Failed(f"http_{status}", status)
                    return self._read_body(conn, resp, deadline), current, status
                finally:
                    conn.close()
        raise _Failed("too_many_redirects")

    def _request(self, parts: _Url, deadline: float) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        s = self.settings
        addresses = self.guard.resolve(parts.host, parts.port)
        last: Exception | None = None
        for address in addresses:
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                raise _Failed("timeout")
            connect_timeout = min(s.connect_timeout_s, remaining)
            read_timeout = min(s.read_timeout_s, remaining)
            if parts.scheme == "https":
                conn: _PinnedHTTP = _PinnedHTTPS(parts.host, parts.port, address, connect_timeout, read_timeout,
                                                 context=self._tls)
            else:
                conn = _PinnedHTTP(parts.host, parts.port, address, connect_timeout, read_timeout)
            try:
                with self._count_lock:
                    self.requests_made += 1
                conn.request("GET", parts.target, headers={
                    "User-Agent": s.user_agent, "Accept": "image/*", "Accept-Encoding": "identity",
                })
                return conn, conn.getresponse()
            except TimeoutError:
                conn.close()
                raise _Failed("timeout") from None
            except ssl.SSLError:
                conn.close()
                raise _Failed("tls") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                last = exc
        raise _Failed("connection" if not isinstance(last, http.client.HTTPException) else "bad_response")

    def _read_body(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, deadline: float) -> bytes:
        cap = self.settings.max_image_bytes
        length = resp.getheader("Content-Length")
        if length is not None:
            try:
                if int(length) > cap:
                    raise _Failed("too_large", resp.status)
            except ValueError:
                raise _Failed("bad_response", resp.status) from None
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                remaining = deadline - clock.monotonic()
                if remaining <= 0:
                    raise _Failed("timeout", resp.status)
                if conn.sock is not None:
                    conn.sock.settimeout(min(self.settings.read_timeout_s, remaining))
                chunk = resp.read1(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > cap:
                    raise _Failed("too_large", resp.status)
                chunks.append(chunk)
        except TimeoutError:
            raise _Failed("timeout", resp.status) from None
        except http.client.IncompleteRead:
            raise _Failed("incomplete_body", resp.status) from None
        except (OSError, http.client.HTTPException):
            raise _Failed("connection", resp.status) from None
        body = b"".join(chunks)
        if length is not None and len(body) < int(length):
            raise _Failed("incomplete_body", resp.status)
        return body


def _since(began: list[float]) -> float | None:
    return round(clock.monotonic() - began[0], 3) if began else 0.0


def _round_robin_by_host(urls: list[str]) -> list[str]:
    queues: dict[str, list[str]] = {}
    for url in urls:
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        queues.setdefault(host, []).append(url)
    out: list[str] = []
    lists = list(queues.values())
    for i in range(max((len(q) for q in lists), default=0)):
        out.extend(q[i] for q in lists if i < len(q))
    return out


@dataclass(frozen=True)
class _Url:
    scheme: str
    host: str
    port: int
    target: str


def _split(url: str) -> _Url:
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _Failed("bad_scheme")
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise _Failed("bad_url") from None
    if not host:
        raise _Failed("bad_url")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if any(c in target for c in " \r\n\t"):
        target = target.replace(" ", "%20")
        if any(c in target for c in "\r\n\t"):
            raise _Failed("bad_url")
    return _Url(scheme, host, port, target)


def image_relpath(sha256: str, ext: str) -> Path:
    """``images/ab/cd/<sha256>.<ext>``, relative to MINING_HOME."""
    return Path("images") / sha256[:2] / sha256[2:4] / f"{sha256}.{ext}"


def store_bytes(path: Path, data: bytes) -> bool:
    """Write content-addressed bytes once; True when this call created the file."""
    if path.exists():
        return False
    atomic_write_bytes(data, path)
    return True


# ---- the URL index ------------------------------------------------------------------------------
RECORDED = ("downloaded", "skipped:too_small", "skipped:aspect", "skipped:animated")


class UrlIndex:
    """URL -> what its download produced, per interval; files under ``state/urls/ab/<urlhash>/``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, url: str) -> Path:
        key = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
        return self.root / key[:2] / key

    def records(self, url: str) -> dict[str, DownloadResult]:
        """Interval key -> record, for every interval that downloaded ``url``."""
        folder = self._dir(url)
        out: dict[str, DownloadResult] = {}
        try:
            names = sorted(p.name for p in folder.iterdir() if p.suffix == ".json")
        except FileNotFoundError:
            return out
        for name in names:
            try:
                data = json.loads((folder / name).read_text())
                out[name[:-5]] = DownloadResult(**data)
            except (OSError, ValueError, TypeError):
                continue  # a damaged record only costs a re-download
        return out

    def put(self, interval_key: str, result: DownloadResult) -> None:
        path = self._dir(result.url) / f"{interval_key}.json"
        atomic_write_bytes(json.dumps(asdict(result), sort_keys=True).encode(), path)


# ---- the step -----------------------------------------------------------------------------------
def download_interval(settings: Settings, interval: Interval, downloader: Downloader | None = None) -> StepResult:
    """Resolve, pre-filter and download every post of the interval; one candidates partition per hour.

    Raises only for run-level problems (posts partition missing, disk unwritable).
    """
    hours = interval.hours()
    missing = [h.key for h in hours if read_partition(settings.lake_dir, "posts", h) is None]
    if missing:
        raise FileNotFoundError(f"no posts partition for {', '.join(missing)}: run `mining scrape` first")
    downloader = downloader or Downloader(settings)
    index = UrlIndex(settings.state_dir / "urls")
    counts: Counter[str] = Counter()
    path: Path | None = None
    session = requests.Session()
    session.headers["User-Agent"] = settings.user_agent
    try:
        for hour in hours:
            posts = read_partition(settings.lake_dir, "posts", hour, schemas.POSTS)
            assert posts is not None
            rows = _download_hour(settings, hour, posts, downloader, index, session)
            table = pa.Table.from_pylist(rows, schema=schemas.CANDIDATES)
            path = write_partition(settings.lake_dir, "candidates", hour, table)
            counts.update(r["status"] for r in rows)
            counts["candidates"] += len(rows)
    finally:
        session.close()
    return StepResult("download", str(interval), str(path) if len(hours) == 1 and path else None, dict(counts))


def _candidates_of(settings: Settings, posts: pa.Table, session: requests.Session) -> list[Candidate]:
    out: list[Candidate] = []
    ids = posts.column("post_id").to_pylist()
    subs = posts.column("subreddit").to_pylist()
    raws = posts.column("raw_json").to_pylist()
    for post_id, subreddit, raw in zip(ids, subs, raws, strict=True):
        try:
            post = json.loads(raw) if raw else None
            if not isinstance(post, dict):
                raise ValueError("raw_json is not an object")
        except ValueError as exc:
            detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            out.append(Candidate(f"{post_id}:0", post_id or "unknown", subreddit or "", 0, "post", "", None, None,
                                 f"failed:bad_post:malformed_json: {detail}"))
            continue
        post.setdefault("id", post_id)
        if subreddit and not isinstance(post.get("subreddit"), str):
            post["subreddit"] = subreddit
        out.extend(resolve(post, settings, session=session))
    # One row per candidate id even if the lake holds a post twice.
    return list({c.candidate_id: c for c in out}.values())


def _download_hour(settings: Settings, hour: Interval, posts: pa.Table, downloader: Downloader,
                   index: UrlIndex, session: requests.Session) -> list[dict]:
    candidates = _candidates_of(settings, posts, session)
    outcome: dict[str, DownloadResult] = {}
    to_fetch: list[str] = []
    for url in dict.fromkeys(c.url for c in candidates if c.pending):
        records = index.records(url)
        earlier = [k for k in records if k < hour.key]
        if earlier:
            first = records[min(earlier)]
            status = "skipped:already_downloaded" if first.status == "downloaded" else first.status
            outcome[url] = replace(first, status=status, http_status=None, elapsed_s=None)
            continue
        own = records.get(hour.key)
        if own is not None and (own.status != "downloaded" or (own.path and (settings.home / own.path).exists())):
            outcome[url] = own  # a rerun: same row, no fetch
            continue
        to_fetch.append(url)
    for url, result in downloader.fetch_many(to_fetch).items():
        outcome[url] = result
        if result.status in RECORDED:
            index.put(hour.key, result)
    rows = []
    for c in candidates:
        row = {
            "candidate_id": c.candidate_id, "post_id": c.post_id, "subreddit": c.subreddit,
            "position": c.position, "kind": c.kind, "url": c.url, "known_width": c.known_width,
            "known_height": c.known_height, "status": c.status, "sha256": None, "path": None, "format": None,
            "width": None, "height": None, "bytes": None, "http_status": None, "elapsed_s": None,
            "interval_start": hour.start,
        }
        result = outcome.get(c.url) if c.pending else None
        if result is not None:
            row.update(status=result.status, sha256=result.sha256, path=result.path, format=result.format,
                       width=result.width, height=result.height, bytes=result.bytes,
                       http_status=result.http_status, elapsed_s=result.elapsed_s)
        rows.append(row)
    return rows
