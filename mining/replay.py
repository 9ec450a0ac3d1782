"""A Reddit-compatible API on a :class:`~mining.devserver.DevServer`, for tests, benchmarks and the demo.

It behaves like the parts of Reddit that mining depends on, so the client is exercised over
real sockets instead of mocks: ``/r/<sub>/new[.json]`` newest first with ``limit``,
``after``/``before`` fullnames and a depth cap (Reddit stops near 1000); URLs HTML-escaped
unless ``raw_json=1``; ``X-Ratelimit-*`` headers from a per-window budget (429 when it is
overspent); ``/api/v1/access_token`` checking basic auth; and a queue of injected faults
(429 with ``Retry-After``, 5xx, malformed JSON) served before normal answers.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from mining import clock
from mining.devserver import DevServer, Request, Response
from mining.reddit import URL_FIELDS

DEFAULT_CLIENT_ID = "replay-client"
DEFAULT_CLIENT_SECRET = "replay-secret"  # a test credential for the local server only


# ---- faults ------------------------------------------------------------------------
def fault_429(retry_after: float = 5) -> Response:
    """Reddit's rate-limit answer."""
    return Response(429, b'{"message": "Too Many Requests", "error": 429}',
                    {"Content-Type": "application/json", "Retry-After": f"{retry_after:g}"})


def fault_5xx(status: int = 500) -> Response:
    return Response(status, b"<html><body>Our CDN was unable to reach our servers</body></html>",
                    {"Content-Type": "text/html"})


def fault_malformed() -> Response:
    """A 200 whose body is cut off mid-JSON (proxies and overloaded servers do this)."""
    return Response(200, b'{"kind": "Listing", "data": {"children": [{"kind": "t3", "da',
                    {"Content-Type": "application/json"})


# ---- helpers -----------------------------------------------------------------------
def load_recorded_listing(path: Path | str) -> list[dict]:
    """The post dicts of a recorded ``Listing`` file (or of a thread's first listing)."""
    body = json.loads(Path(path).read_text())
    if isinstance(body, list):  # /comments/<id>: [submission listing, comment listing]
        body = body[0]
    return [c["data"] for c in body["data"]["children"] if c.get("kind") == "t3"]


def make_post(post_id: str, created_utc: float, subreddit: str = "pics", *, url: str | None = None,
              title: str | None = None, **extra: Any) -> dict:
    """A minimal but realistic t3 post dict (what tests, the bench and the demo feed the replay)."""
    url = url if url is not None else f"https://i.redd.it/{post_id}.jpg"
    domain = url.split("/")[2] if "://" in url else f"self.{subreddit}"
    post = {
        "id": post_id, "name": f"t3_{post_id}", "subreddit": subreddit, "subreddit_name_prefixed": f"r/{subreddit}",
        "title": title if title is not None else f"post {post_id}", "author": "replay_user",
        "permalink": f"/r/{subreddit}/comments/{post_id}/post_{post_id}/", "url": url, "domain": domain,
        "created_utc": float(created_utc), "over_18": False, "is_self": False, "is_video": False,
        "score": 1, "num_comments": 0, "removed_by_category": None,
    }
    if url.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp"):
        post["post_hint"] = "image"
    post.update(extra)
    return post


def _escape(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("&", "&amp;")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def escape_post(post: dict) -> dict:
    """What Reddit serves without ``raw_json=1``: ``&`` in URL fields becomes ``&amp;``."""
    out = dict(post)
    for key in URL_FIELDS:
        if key in out:
            out[key] = _escape(out[key])
    if isinstance(out.get("crosspost_parent_list"), list):
        out["crosspost_parent_list"] = [escape_post(p) for p in out["crosspost_parent_list"]]
    return out


def _sort_key(post: dict) -> tuple[float, int]:
    pid = str(post.get("id", "0"))
    try:
        num = int(pid, 36)
    except ValueError:
        num = 0
    return (float(post.get("created_utc") or 0.0), num)


# ---- the server ----------------------------------------------------------------------
class RedditReplay:
    """Serve ``posts_by_source`` like Reddit's API on ``server`` (routes ``/r/`` and the token URL).

    ``oauth=True`` requires a bearer token from ``/api/v1/access_token`` (basic auth
    ``client_id``/``client_secret``); ``token_ttl_s`` None means tokens never expire.
    ``ratelimit_budget`` requests per ``ratelimit_window_s`` are allowed (Reddit: 1000 per
    600 s); beyond it listings answer 429 unless ``enforce_ratelimit`` is False.
    """

    def __init__(self, server: DevServer, posts_by_source: dict[str, list[dict]] | None = None,
                 oauth: bool = True, *, client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET, depth_cap: int = 1000,
                 ratelimit_budget: int = 1000, ratelimit_window_s: float = 600.0,
                 enforce_ratelimit: bool = True, token_ttl_s: float | None = 3600.0,
                 faults: Iterable[Response] = ()) -> None:
        self.server = server
        self.oauth = oauth
        self.client_id = client_id
        self.client_secret = client_secret
        self.depth_cap = depth_cap
        self.ratelimit_budget = ratelimit_budget
        self.ratelimit_window_s = ratelimit_window_s
        self.enforce_ratelimit = enforce_ratelimit
        self.token_ttl_s = token_ttl_s
        self.tokens_issued = 0
        self.token_requests = 0
        self.listing_requests = 0
        self.throttled = 0  # 429s answered because the rate-limit window was overspent
        self._tokens: dict[str, float] = {}
        self._posts: dict[str, list[dict]] = {}
        self._faults: list[tuple[str | None, Response]] = [(None, f) for f in faults]
        self._window_start = -math.inf
        self._window_used = 0
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        for source, posts in (posts_by_source or {}).items():
            self.add_posts(source, posts)
        server.route("/r/", self._listing, prefix=True)
        server.route("/api/v1/access_token", self._token)

    # -- content -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token_url(self) -> str:
        return f"{self.server.url}/api/v1/access_token"

    def add_posts(self, source: str, posts: Iterable[dict], keep_order: bool = False) -> None:
        """Add (or replace, by id) posts of ``source``; the listing is kept newest first.

        ``keep_order=True`` serves new posts after the existing ones in the order given, as a
        recorded listing had them (real listings are not always strictly by time).
        """
        with self._lock:
            current = {p["id"]: p for p in self._posts.get(source.lower(), [])}
            for post in posts:
                current[post["id"]] = dict(post)
            values = list(current.values())
            self._posts[source.lower()] = values if keep_order else sorted(values, key=_sort_key, reverse=True)

    def remove_post(self, source: str, post_id: str) -> None:
        with self._lock:
            self._posts[source.lower()] = [p for p in self._posts.get(source.lower(), []) if p["id"] != post_id]

    def posts(self, source: str) -> list[dict]:
        with self._lock:
            return list(self._posts.get(source.lower(), []))

    def inject(self, *responses: Response, source: str | None = None) -> None:
        """Serve these responses (in order) before normal answers; ``source`` limits them to one listing."""
        with self._lock:
            self._faults.extend((source.lower() if source else None, r) for r in responses)

    def expire_tokens(self) -> None:
        """Forget every issued token, so the next API call answers 401 (a revoked/expired token)."""
        with self._lock:
            self._tokens.clear()

    # -- handlers ------------------------------------------------------------------------
    def _token(self, req: Request) -> Response:
        with self._lock:
            self.token_requests += 1
        if req.method != "POST":
            return Response(405, b"method not allowed")
        auth = req.headers.get("authorization", "")
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if auth != f"Basic {expected}":
            return Response.json({"message": "Unauthorized", "error": 401}, status=401)
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "client_credentials":
            return Response.json({"error": "unsupported_grant_type"}, status=400)
        with self._lock:
            self.tokens_issued += 1
            token = f"replay-token-{next(self._seq)}"
            ttl = self.token_ttl_s
            self._tokens[token] = math.inf if ttl is None else clock.now() + ttl
        return Response.json({"access_token": token, "token_type": "bearer",
                              "expires_in": int(ttl) if ttl is not None else 86400, "scope": "*"})

    def _ratelimit(self) -> tuple[dict[str, str], bool]:
        now = clock.now()
        with self._lock:
            start = math.floor(now / self.ratelimit_window_s) * self.ratelimit_window_s
            if start != self._window_start:
                self._window_start, self._window_used = start, 0
            self._window_used += 1
            used = self._window_used
        reset = max(0, math.ceil(self._window_start + self.ratelimit_window_s - now))
        headers = {"X-Ratelimit-Used": str(used),
                   "X-Ratelimit-Remaining": f"{max(0, self.ratelimit_budget - used):.1f}",
                   "X-Ratelimit-Reset": str(reset)}
        return headers, self.enforce_ratelimit and used > self.ratelimit_budget

    def _listing(self, req: Request) -> Response:
        parts = req.path.strip("/").split("/")  # r, <sub>, new[.json]
        if len(parts) != 3 or parts[2] not in ("new", "new.json"):
            return Response(404, b'{"message": "Not Found", "error": 404}', {"Content-Type": "application/json"})
        source = parts[1].lower()
        with self._lock:
            self.listing_requests += 1
        if self.oauth:
            token = req.headers.get("authorization", "").removeprefix("bearer ").removeprefix("Bearer ")
            with self._lock:
                expires = self._tokens.get(token)
            if expires is None or clock.now() >= expires:
                return Response.json({"message": "Unauthorized", "error": 401}, status=401)
        headers, over = self._ratelimit()
        with self._lock:
            fault = next((i for i, (src, _) in enumerate(self._faults) if src in (None, source)), None)
            injected = self._faults.pop(fault)[1] if fault is not None else None
        if injected is not None:
            return Response(injected.status, injected.body, {**headers, **injected.headers}, injected.delay_s)
        if over:
            with self._lock:
                self.throttled += 1
            return Response(429, b'{"message": "Too Many Requests", "error": 429}',
                            {**headers, "Content-Type": "application/json", "Retry-After": headers["X-Ratelimit-Reset"]})
        return Response.json(self._page(source, req.query), headers=headers)

    def _page(self, source: str, query: dict[str, str]) -> dict:
        try:
            limit = int(query.get("limit", 25))
        except ValueError:
            limit = 25
        limit = min(100, max(1, limit))
        with self._lock:
            visible = self._posts.get(source, [])[: self.depth_cap]
        names = [p.get("name") or f"t3_{p['id']}" for p in visible]
        if query.get("after"):
            idx = names.index(query["after"]) + 1 if query["after"] in names else len(names)
            lo, hi = idx, idx + limit
        elif query.get("before"):
            idx = names.index(query["before"]) if query["before"] in names else 0
            lo, hi = max(0, idx - limit), idx
        else:
            lo, hi = 0, limit
        page = visible[lo:hi]
        raw = query.get("raw_json") == "1"
        children = [{"kind": "t3", "data": p if raw else escape_post(p)} for p in page]
        return {"kind": "Listing", "data": {
            "after": names[hi - 1] if page and hi < len(visible) else None,
            "before": names[lo] if page and lo > 0 else None,
            "dist": len(children), "modhash": "", "geo_filter": None, "children": children,
        }}
