"""The bootstrap server a prefill server runs on --disaggregation-bootstrap-port (the
port the router's `--prefill URL PORT` names), and the decode side's client of it.

The router sends each request to a prefill and a decode server at once, both carrying
the same bootstrap_room. The decode server pairs with the prefill half through here:

  GET  /pd/info    the prefill side's transfer-engine session and KV layout
  POST /pd/claim   {room, session_id, ptrs, row_bytes, buffer_bytes, page_size, pages}:
                   where the decode side pre-allocated the room's KV; the prefill side
                   writes the pages there once its prefill is done
  POST /pd/status  {rooms, wait_s}: the rooms that are done (with the first token) or
                   failed (with why); waits up to wait_s for one to end
  POST /pd/abort   {room}: the decode side gave up; the prefill side frees the pages

JSON over HTTP keeps the pairing debuggable with curl; the pages themselves go through
the transfer engine, never through here.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# A request to a bootstrap server that takes longer than this failed.
CLIENT_TIMEOUT_S = 5.0


class BootstrapError(RuntimeError):
    """The bootstrap server refused a call (message from it) or could not be reached."""


class RoomRegistry(Protocol):
    """What the bootstrap server serves from (the prefill role's rooms)."""

    def info(self) -> dict[str, Any]: ...
    def claim(self, body: dict[str, Any]) -> None: ...  # ValueError: refused
    def status(self, rooms: list[int], wait_s: float) -> dict[str, dict[str, Any]]: ...
    def abort(self, room: int, reason: str) -> None: ...


class BootstrapServer:
    """A threaded HTTP server in the prefill scheduler's process."""

    def __init__(self, registry: RoomRegistry, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"registry": registry})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       name="pd-bootstrap", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    registry: RoomRegistry

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        logger.debug("bootstrap: " + format, *args)

    def do_GET(self) -> None:
        if self.path == "/pd/info":
            self._reply(200, self.registry.info())
        elif self.path == "/health":
            self._reply(200, {})
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            if self.path == "/pd/claim":
                self.registry.claim(body)
                self._reply(200, {})
            elif self.path == "/pd/status":
                rooms = [int(r) for r in body.get("rooms", [])]
                wait_s = min(max(float(body.get("wait_s", 0.0)), 0.0), 2.0)
                self._reply(200, {"rooms": self.registry.status(rooms, wait_s)})
            elif self.path == "/pd/abort":
                self.registry.abort(int(body["room"]), str(body.get("reason", "")))
                self._reply(200, {})
            else:
                self._reply(404, {"error": f"no route {self.path}"})
        except (ValueError, KeyError, TypeError) as exc:
            self._reply(400, {"error": str(exc)})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# --- the decode side's client ------------------------------------------------------

def call(host: str, port: int, path: str, body: dict[str, Any] | None = None,
         timeout_s: float = CLIENT_TIMEOUT_S) -> dict[str, Any]:
    """GET (no body) or POST a bootstrap route; BootstrapError on any failure."""
    url = f"http://{_url_host(host)}:{port}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except ValueError:
            message = ""
        raise BootstrapError(f"bootstrap server {host}:{port} refused {path}: "
                             f"{message or exc}") from None
    except (OSError, ValueError) as exc:  # refused, reset, timed out, not JSON
        raise BootstrapError(f"bootstrap server {host}:{port} unreachable ({path}): "
                             f"{exc}") from None


def tell_abort(host: object, port: object, room: object, reason: str) -> None:
    """Best effort: tell a prefill server that the decode half of `room` is refused, so
    that it frees the room's KV now rather than when its claim wait runs out."""
    if not (isinstance(host, str) and isinstance(port, int) and isinstance(room, int)):
        return
    try:
        call(host, port, "/pd/abort", {"room": room, "reason": reason}, timeout_s=2.0)
    except BootstrapError as exc:
        logger.info("could not tell %s:%s to drop room %s: %s", host, port, room, exc)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
