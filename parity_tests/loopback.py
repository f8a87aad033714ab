"""A hostile HTTP server on 127.0.0.1 for the download tests: each path is one way a
server can misbehave. Every handler's loop is bounded in bytes and time and ends when
the client goes away or the server stops; nothing listens beyond the test."""
from __future__ import annotations

import contextlib
import http.server
import threading
import time

BOUND_S = 5.0  # no handler runs longer than this, whatever the client does


def _body(handler, data: bytes, content_type="application/octet-stream", length: int | None = None):
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data) if length is None else length))
    handler.end_headers()
    handler.wfile.write(data)


def _until_stopped(handler, step, interval: float, max_steps: int):
    """Call step() every `interval` s until the client leaves, the server stops, or the bound."""
    end = time.monotonic() + BOUND_S
    for _ in range(max_steps):
        if handler.server.stopping.wait(interval) or time.monotonic() > end:
            return
        try:
            step()
            handler.wfile.flush()
        except OSError:  # the client closed the connection: it gave up, as it should
            return


def endless(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.end_headers()
    chunk = b"PK\x03\x04" + bytes(64 * 1024 - 4)
    _until_stopped(handler, lambda: handler.wfile.write(chunk), 0, 2048)  # at most 128 MiB


def drip(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    handler.wfile.write(b"PK\x03\x04")
    _until_stopped(handler, lambda: handler.wfile.write(b"\0"), 0.05, 100)


def drip_headers(handler):
    handler.wfile.write(b"HTTP/1.0 200 OK\r\n")
    _until_stopped(handler, lambda: handler.wfile.write(b"X"), 0.05, 100)


def stall(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b"PK\x03\x04")
    handler.wfile.flush()
    handler.server.stopping.wait(BOUND_S)


def html(handler):
    _body(handler, b"<!DOCTYPE html><html><body>Please sign in</body></html>", "text/html; charset=utf-8")


def html_as_file(handler):  # an HTML page with a binary content type: only its bytes tell
    _body(handler, b"<!DOCTYPE html><html><body>Quota exceeded</body></html>")


def short(handler):
    _body(handler, b"PK\x03\x04" + bytes(4000), length=100_000)


def long(handler):
    _body(handler, b"PK\x03\x04" + bytes(4000), length=1000)


def too_large_declared(handler):
    _body(handler, b"PK\x03\x04", length=10 << 30)


def wrong_magic(handler):
    _body(handler, b"this is not any checkpoint container")


def serve_bytes(data: bytes):
    return lambda handler: _body(handler, data)


ATTACKS = {f.__name__: f for f in (endless, drip, drip_headers, stall, html, html_as_file, short, long,
                                   too_large_declared, wrong_magic)}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        route = self.server.routes.get(self.path.split("?")[0].lstrip("/"))
        if route is None:
            self.send_error(404)
            return
        with contextlib.suppress(OSError):
            route(self)

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def hostile_server(**extra_routes):
    """(base URL, routes dict): every attack in ATTACKS under its name, plus `extra_routes`."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.routes = {**ATTACKS, **extra_routes}
    server.stopping = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.routes
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
