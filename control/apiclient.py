"""The client of the daemon's API (control/api.py): what lbctl does first, to find whether a daemon
answers. It imports http.client only once a daemon has accepted the connection: without a daemon,
lbctl goes on to work on the maps itself and needs none of it."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from control.errors import EXIT_USAGE, InputError, LbError

RUN_DIR = "/run/lb"
ENV_SOCKET = "LBCTL_API_SOCKET"


def default_socket_path(instance_name: str) -> str:
    return os.path.join(RUN_DIR, f"{instance_name}.sock")


class NoDaemon(Exception):
    """No daemon listens on the socket (nothing was sent): lbctl works on the maps itself."""


@dataclass
class ApiClient:
    path: str
    timeout: float = 300.0  # an attach compiles the program

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise NoDaemon(self.path) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            sock = self._connect()
        except OSError as e:
            raise LbError(f"the daemon at {self.path} did not answer: {e}") from None
        import http.client

        conn = http.client.HTTPConnection("localhost", timeout=self.timeout)
        conn.sock = sock  # connected above: the connection uses it as it is
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise LbError(f"the daemon at {self.path} did not answer: {e}") from None
        finally:
            conn.close()
        if "error" in answer:  # the same exception lbctl direct would have raised: same line, same exit code
            error = InputError if answer.get("exit_code") == EXIT_USAGE else LbError
            raise error(answer["error"])
        return answer["result"]

    def command(self, command: str, params: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/v1/command", {"command": command, "params": params})

    def describe(self) -> dict[str, Any]:
        return self._request("GET", "/v1/daemon")
