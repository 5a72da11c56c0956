"""Real servers and clients in lab namespaces: HTTP over TCP, and UDP echo.

Each server answers with its own name, so a client can tell which backend
served it. Servers run on threads of this process; their sockets live in the
backend's namespace (see nsenter)."""
from __future__ import annotations

import contextlib
import http.client
import http.server
import selectors
import socket
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from netns.nsenter import in_netns, socket_in


class _NamedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one TCP connection, many requests

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET6  # bound to "::": IPv4 and IPv6 clients alike

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves its own name (getfqdn): not in a lab namespace.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "lab", self.server_address[1]


@dataclass
class Servers:
    """HTTP and UDP echo servers, one of each per namespace, answering with a name."""

    http_port: int = 8080
    udp_port: int = 5353
    _threads: list[threading.Thread] = field(default_factory=list)
    _http: dict[str, _HTTPServer] = field(default_factory=dict)  # namespace -> its server
    _udp: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, ns: str, name: str) -> None:
        self.start_http(ns, name)
        with in_netns(ns):
            udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.bind(("::", self.udp_port))
        udp.settimeout(0.2)
        self._udp.append(udp)
        self._thread(self._udp_echo, udp, name)

    def start_http(self, ns: str, name: str) -> None:
        """Start (or start again) the HTTP server of namespace `ns`."""
        with in_netns(ns):
            server = _HTTPServer(("::", self.http_port), _NamedHandler)
        server.name = name  # type: ignore[attr-defined]
        self._http[ns] = server
        self._thread(server.serve_forever, 0.1)

    def stop_http(self, ns: str) -> None:
        """Stop the HTTP server of namespace `ns`: new connections are refused."""
        server = self._http.pop(ns)
        server.shutdown()
        server.server_close()

    def _thread(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _udp_echo(self, sock: socket.socket, name: str) -> None:
        while not self._stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            sock.sendto(name.encode() + b" " + data, peer)

    def stop(self) -> None:
        self._stop.set()
        for ns in list(self._http):
            self.stop_http(ns)
        for t in self._threads:
            t.join(timeout=5)
        for u in self._udp:
            u.close()

    @classmethod
    @contextlib.contextmanager
    def running(cls, hosts: dict[str, str], **ports: int) -> Iterator["Servers"]:
        """hosts: namespace -> name to answer with."""
        servers = cls(**ports)
        try:
            for ns, name in hosts.items():
                servers.start(ns, name)
            yield servers
        finally:
            servers.stop()


class NetnsHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 client connection made from inside namespace `ns`."""

    def __init__(self, ns: str, host: str, port: int, timeout: float = 5.0):
        super().__init__(host, port, timeout=timeout)
        self.ns = ns

    def connect(self) -> None:
        with in_netns(self.ns):
            self.sock = socket.create_connection((self.host, self.port), self.timeout)

    def get_text(self, path: str = "/") -> str:
        self.request("GET", path)
        response = self.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body}")
        return body


def http_get(ns: str, host: str, port: int, timeout: float = 5.0) -> str:
    """One request on a new connection; returns the body (the serving backend's name)."""
    conn = NetnsHTTPConnection(ns, host, port, timeout)
    try:
        return conn.get_text()
    finally:
        conn.close()


def udp_request(ns: str, host: str, port: int, payload: bytes, timeout: float = 2.0, attempts: int = 3) -> bytes:
    """Send a datagram and wait for the answer, retrying a bounded number of times."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in(ns, family, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        for _ in range(attempts):
            sock.sendto(payload, (host, port))
            try:
                return sock.recvfrom(2048)[0]
            except socket.timeout:
                continue
        raise TimeoutError(f"no UDP answer from {host}:{port} after {attempts} attempts")
    finally:
        sock.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value, raises TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0, kill_timeout: float = 15.0) -> None:
    """SIGTERM a lab's child process and reap it; SIGKILL if it is not gone within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=kill_timeout)


class EchoServers:
    """An echo server on `port` in each namespace (IPv4 and IPv6), one thread per connection."""

    def __init__(self, namespaces: list[str], port: int, backlog: int = 256):
        self.stop_event = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        for ns in namespaces:
            listener = socket_in(ns, socket.AF_INET6)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("::", port))
            listener.listen(backlog)
            listener.settimeout(0.2)
            self.sockets.append(listener)
            self._spawn(self._serve, listener)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _serve(self, listener: socket.socket) -> None:
        while not self.stop_event.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            self.sockets.append(conn)
            self._spawn(self._echo, conn)

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self.stop_event.is_set():
            try:
                data = conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            conn.sendall(data)

    def close(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=6)
        for s in self.sockets:
            s.close()


def echo_once(sock: socket.socket, message: bytes) -> None:
    """Send a message on an echo connection and read it back whole, or raise ConnectionError."""
    sock.sendall(message)
    answer = b""
    while len(answer) < len(message):
        chunk = sock.recv(len(message) - len(answer))
        if not chunk:
            raise ConnectionError("the connection was closed")
        answer += chunk
    if answer != message:
        raise ConnectionError(f"echo {answer[:20]!r} differs from {message[:20]!r}")


@dataclass
class EchoStream:
    """One long-lived TCP connection from `client_ns` to host:port, exchanging a numbered message
    every `interval` seconds with echo servers in `server_nss` until stopped (at most `limit`
    seconds). `exchanged` counts the round trips; `error` is why it broke, if it did."""

    client_ns: str
    server_nss: list[str]
    host: str
    port: int
    interval: float = 0.02
    limit: float = 300.0
    exchanged: int = 0
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)
    _servers: EchoServers | None = None

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _talk(self, sock: socket.socket) -> None:
        deadline = time.monotonic() + self.limit
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                echo_once(sock, f"{self.exchanged:010d}".encode() * 10)
                self.exchanged += 1
                self._stop.wait(self.interval)  # pacing, not synchronisation
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        self._servers = EchoServers(self.server_nss, self.port, backlog=8)
        client = socket_in(self.client_ns, socket.AF_INET)
        self._sockets.append(client)
        client.settimeout(5.0)
        client.connect((self.host, self.port))
        self._spawn(self._talk, client)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=6)
        for s in self._sockets:
            s.close()
        if self._servers is not None:
            self._servers.close()

    @classmethod
    @contextlib.contextmanager
    def running(cls, client_ns: str, server_nss: list[str], host: str, port: int, **options) -> Iterator["EchoStream"]:
        stream = cls(client_ns, server_nss, host, port, **options)
        try:
            stream.start()
            yield stream
        finally:
            stream.stop()


class EchoConnections:
    """`n` long-lived TCP connections from `client_ns` to host:port (echo servers behind). Each
    round() sends every connection a numbered message and waits for all the echoes at once;
    `failed` maps a connection's index to why it broke (the first time), so a test sees any
    connection that broke at any moment, not only at the end."""

    def __init__(self, client_ns: str, host: str, port: int, n: int, timeout: float = 5.0):
        self.client_ns, self.host, self.port, self.timeout = client_ns, host, port, timeout
        self.socks: list[socket.socket] = []
        self.failed: dict[int, str] = {}
        self.rounds = 0
        self._serial = 0
        try:
            for _ in range(n):
                sock = socket_in(client_ns, socket.AF_INET6 if ":" in host else socket.AF_INET)
                self.socks.append(sock)
                sock.settimeout(timeout)
                sock.connect((host, port))
        except BaseException:
            self.close()
            raise

    def local_ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self.socks]

    def round(self) -> int:
        """One message on every connection still up; returns how many echoed it back in time."""
        self._serial += 1
        message = f"{self._serial:010d}".encode() * 4
        pending: dict[int, bytes] = {}
        for i, sock in enumerate(self.socks):
            if i in self.failed:
                continue
            try:
                sock.sendall(message)
                pending[i] = b""
            except OSError as e:
                self.failed[i] = f"send: {e}"
        with selectors.DefaultSelector() as sel:
            for i in pending:
                sel.register(self.socks[i], selectors.EVENT_READ, i)
            deadline = time.monotonic() + self.timeout
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=max(deadline - time.monotonic(), 0)):
                    i = key.data
                    try:
                        chunk = self.socks[i].recv(len(message) - len(pending[i]))
                    except OSError as e:
                        chunk, error = b"", f"recv: {e}"
                    else:
                        error = "closed by the peer"
                    if not chunk:
                        self.failed[i] = error
                        del pending[i]
                        sel.unregister(self.socks[i])
                        continue
                    pending[i] += chunk
                    if len(pending[i]) == len(message):
                        if pending[i] != message:
                            self.failed[i] = f"echo {pending[i][:20]!r} differs"
                        del pending[i]
                        sel.unregister(self.socks[i])
        for i in pending:
            self.failed[i] = f"no echo within {self.timeout}s"
        self.rounds += 1
        return len(self.socks) - len(self.failed)

    @contextlib.contextmanager
    def flowing(self, interval: float = 0.1) -> Iterator["EchoConnections"]:
        """Rounds on a thread, one every `interval`, until the block ends (traffic during a change)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                self.round()

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join(timeout=self.timeout + 5)

    def close(self) -> None:
        for s in self.socks:
            s.close()
