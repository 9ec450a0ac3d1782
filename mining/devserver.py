"""A small, real HTTP server on 127.0.0.1 that plays Reddit and image hosts.

Tests, benchmarks and the offline demo all point mining at it (``MINING_REDDIT_BASE_URL``),
so every byte crosses a real socket: no network mocks. Routes are plain callables; every
request is logged so tests can assert politeness (e.g. the per-minute budget).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mining import clock


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Response:
    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # sleep before answering (slow servers)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Response:
        return cls(status, b"", {"Location": location})


Handler = Callable[[Request], Response]


class DevServer:
    """Threaded HTTP server with a route table and a request log.

    ``routes`` maps a path (no query) to a Response or a handler; a handler registered with
    ``prefix=True`` answers every path under it. Unknown paths answer 404.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes: dict[str, Response | Handler] = {}
        self.prefixes: list[tuple[str, Handler]] = []
        self.log: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(
                    self.command, parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()},
                    {k.lower(): v for k, v in self.headers.items()}, body, clock.now(),
                )
                with server._lock:
                    server.log.append(req)
                resp = server._dispatch(req)
                if resp.delay_s:
                    time.sleep(resp.delay_s)
                chunks: Iterator[bytes] | None = None
                if isinstance(resp.body, bytes):
                    payload = resp.body
                else:
                    payload, chunks = b"", iter(resp.body)
                try:
                    self.send_response(resp.status)
                    for k, v in resp.headers.items():
                        self.send_header(k, v)
                    if chunks is None:
                        if "Content-Length" not in resp.headers:
                            self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        if self.command != "HEAD":
                            self.wfile.write(payload)
                    else:
                        self.send_header("Connection", "close")
                        self.end_headers()
                        for chunk in chunks:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_HEAD = do_PUT = _serve

        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- routing -----------------------------------------------------------------------
    def route(self, path: str, response: Response | Handler, prefix: bool = False) -> None:
        if prefix:
            assert callable(response), "prefix routes need a handler"
            self.prefixes.append((path, response))
            self.prefixes.sort(key=lambda p: -len(p[0]))
        else:
            self.routes[path] = response

    def _dispatch(self, req: Request) -> Response:
        target = self.routes.get(req.path)
        if target is None:
            for pfx, handler in self.prefixes:
                if req.path.startswith(pfx):
                    target = handler
                    break
        if target is None:
            return Response(404, b"not found", {"Content-Type": "text/plain"})
        try:
            return target(req) if callable(target) else target
        except Exception as exc:  # a broken handler is a 500, like a real server
            return Response(500, f"handler error: {exc}".encode(), {"Content-Type": "text/plain"})

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests_to(self, path_prefix: str) -> list[Request]:
        with self._lock:
            return [r for r in self.log if r.path.startswith(path_prefix)]

    def start(self) -> DevServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="devserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
