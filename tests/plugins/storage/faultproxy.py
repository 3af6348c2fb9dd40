"""A small threaded HTTP proxy that sits in front of moto and injects faults per rule.

Each :class:`Rule` matches requests by method and a path regex and fires ``times`` times (``-1``:
always). Actions:

* ``"503"``      answer ``503 SlowDown`` without forwarding (S3 throttling);
* ``"429"``      answer ``429 TooManyRequests`` without forwarding;
* ``"reset"``    close the client socket with a TCP reset, no answer;
* ``"truncate"`` forward, then send the full headers but only ``fraction`` of the body and close;
* ``"slow"``     forward, then dribble the body in ``pieces`` pieces ``delay_s`` apart.

Every request is logged (method, path, headers) so tests can assert HEAD-before-GET, ranges and
``If-Match`` pinning.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Action = Literal["503", "429", "reset", "truncate", "slow"]

_THROTTLE_BODY = {
    "503": (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
        b"<Message>Please reduce your request rate.</Message></Error>"
    ),
    "429": (
        b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>TooManyRequests</Code>"
        b"<Message>Too many requests.</Message></Error>"
    ),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"}


@dataclass
class Rule:
    action: Action
    method: str | None = None
    path: str | None = None  # regex searched in the request path (bucket/key + query)
    times: int = 1
    fraction: float = 0.5
    pieces: int = 10
    delay_s: float = 0.2
    fired: int = field(default=0, init=False)

    def matches(self, method: str, path: str) -> bool:
        if self.times >= 0 and self.fired >= self.times:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.path is None or re.search(self.path, path) is not None


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    action: str | None


class FaultProxy:
    """``with FaultProxy(host, port) as proxy: proxy.url ...``"""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # silence
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.seen.clear()

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------

    def _pick(self, method: str, path: str, headers: dict[str, str]) -> Rule | None:
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, path)), None)
            if rule is not None:
                rule.fired += 1
            self.seen.append(Seen(method, path, headers, rule.action if rule else None))
            return rule

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        headers = {k: v for k, v in h.headers.items()}
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        rule = self._pick(method, path, headers)
        action = rule.action if rule else None
        if action in ("503", "429"):
            payload = _THROTTLE_BODY[action]
            h.send_response(int(action))
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(payload)
            return
        if action == "reset":
            h.close_connection = True
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reason, up_headers = resp.status, resp.reason, resp.getheaders()
        finally:
            conn.close()
        h.send_response(status, reason)
        for name, value in up_headers:
            if name.lower() not in _HOP:
                h.send_header(name, value)
        announced = int(
            dict((k.lower(), v) for k, v in up_headers).get("content-length", len(data))
        )
        h.send_header("Content-Length", str(announced if method == "HEAD" else len(data)))
        h.end_headers()
        if method == "HEAD" or not data:
            return
        if action == "truncate":
            h.wfile.write(data[: int(len(data) * rule.fraction)])  # type: ignore[union-attr]
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "slow":
            assert rule is not None
            step = max(1, len(data) // rule.pieces)
            for i in range(0, len(data), step):
                h.wfile.write(data[i : i + step])
                h.wfile.flush()
                time.sleep(rule.delay_s)
            return
        h.wfile.write(data)
