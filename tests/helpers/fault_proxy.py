"""A fault-injecting HTTP proxy in front of the test S3 server: what an object store does at scale, on demand.

Each request is forwarded to the real (moto) server, except a chosen share of them, which instead gets one of the
faults object stores really give: `503 SlowDown`, `500 InternalError`, a reset connection (before or after the
server handled the request, so a PUT may have landed although its caller saw an error), or a delayed answer.
The faults are drawn from a seeded generator; `counts` says what was injected.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              '<RequestId>fault-proxy</RequestId></Error>')
ERRORS = {503: ("SlowDown", "Please reduce your request rate."),
          500: ("InternalError", "We encountered an internal error. Please try again.")}
FAULTS = ("503", "500", "reset", "reset_after", "delay")


class FaultProxy:
    """`FaultProxy(upstream, share=0.2)`: `.endpoint` is its URL; `share` (0..1) and `faults` may change at any
    time; use as a context manager (or `close()`)."""

    def __init__(self, upstream: str, share: float = 0.0, faults: tuple[str, ...] = FAULTS, seed: int = 0,
                 delay_s: float = 0.3) -> None:
        self.upstream = urlparse(upstream)
        self.share, self.faults, self.delay_s = share, faults, delay_s
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real clients use it

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _draw(self) -> str | None:
        with self._lock:
            if not self.faults or self._rng.random() >= self.share:
                return None
            fault = self._rng.choice(self.faults)
            self.counts[fault] += 1
            return fault

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault = self._draw()
        if fault in ("503", "500"):
            code, message = ERRORS[int(fault)]
            data = b"" if h.command == "HEAD" else ERROR_BODY.format(code=code, message=message).encode()
            h.send_response(int(fault))
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        if fault == "reset":
            return self._reset(h)
        if fault == "delay":
            time.sleep(self.delay_s)
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:  # the server is gone (the tests are over)
            return self._reset(h)
        finally:
            conn.close()
        if fault == "reset_after":  # the server did it (a PUT landed), the client never hears so
            return self._reset(h)
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "server",
                                 "date"):
                h.send_header(k, v)
        # A HEAD answers the object's length without its bytes.
        h.send_header("Content-Length", resp.getheader("Content-Length", "0") if h.command == "HEAD" else
                      str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a dropped load balancer connection does."""
        h.close_connection = True
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
