"""The daemon's local API: JSON over HTTP on a Unix socket, root only.

POST /v1/command with {"command": ..., "params": {...}} runs one lbctl command through
control.commands.dispatch, one at a time (a lock serialises them, so concurrent callers
are applied one after another, each whole). The answer is {"result": ...}, or
{"error": "one line", "exit_code": 2|1} with the same message lbctl direct prints.
GET /v1/daemon describes the daemon itself. The client is control/apiclient.py."""
from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable

from control.apiclient import ENV_SOCKET, RUN_DIR, ApiClient, NoDaemon, default_socket_path  # noqa: F401
from control.errors import EXIT_ERROR, EXIT_USAGE, InputError, LbError
from lb.private import private_dir


# --- server -------------------------------------------------------------------------------

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "ApiServer"

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/v1/daemon":
            self._send(404, {"error": f"no such path {self.path}", "exit_code": EXIT_USAGE})
            return
        self._send(200, {"result": self.server.describe()})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/v1/command":
            self._send(404, {"error": f"no such path {self.path}", "exit_code": EXIT_USAGE})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            command, params = body["command"], body.get("params") or {}
            if not isinstance(command, str) or not isinstance(params, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._send(400, {"error": "expected a JSON object {\"command\": NAME, \"params\": {...}}",
                             "exit_code": EXIT_USAGE})
            return
        try:
            result = self.server.run_command(command, params)
        except InputError as e:
            self._send(200, {"error": str(e), "exit_code": EXIT_USAGE})
        except (LbError, OSError, RuntimeError) as e:
            self._send(200, {"error": str(e), "exit_code": EXIT_ERROR})
        except Exception as e:  # a bug: the daemon goes on, the caller learns what happened
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}", "exit_code": EXIT_ERROR})
        else:
            self._send(200, {"result": result})

    def log_message(self, *args: Any) -> None:
        pass  # the daemon logs each command itself, structured


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves the API on a Unix socket of mode 0600; only root's connections are answered."""

    daemon_threads = True
    request_queue_size = 128  # many lbctl at once wait in the backlog rather than fail with EAGAIN

    def __init__(self, path: str, handler: Handler, describe: Callable[[], dict[str, Any]]):
        self.path = path
        self._handler = handler
        self.describe = describe
        self._lock = threading.Lock()
        self._closed = False
        self._serving: threading.Thread | None = None
        directory = os.path.dirname(os.path.abspath(path))
        private_dir(directory, own=directory == RUN_DIR)
        if os.path.exists(path):
            _refuse_if_live(path)
            os.unlink(path)  # a socket left by a daemon that died
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            super().__init__(path, _RequestHandler)
        finally:
            os.umask(old_umask)

    def run_command(self, command: str, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise LbError("the daemon is stopping; nothing was changed")
            return self._handler(command, params)

    def verify_request(self, request: socket.socket, client_address: Any) -> bool:
        uid = struct.unpack("3i", request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[2]
        return uid == 0

    def serve_in_thread(self) -> threading.Thread:
        """Answer from now on; the socket listens from construction, so callers wait until then."""
        self._serving = threading.Thread(target=self.serve_forever, args=(0.2,), name="api", daemon=True)
        self._serving.start()
        return self._serving

    def close(self) -> None:
        """Stop serving; a command under way finishes first, none starts after."""
        if self._serving is not None:  # shutdown() waits for serve_forever, which may never have run
            self.shutdown()
        with self._lock:
            self._closed = True
        self.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _refuse_if_live(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return
    finally:
        probe.close()
    raise LbError(f"another daemon already answers on {path}")
