"""A TCP proxy on 127.0.0.1 that a test can cut (close every connection, refuse new ones) and
restore, to simulate a database outage without touching the database server; or freeze (keep
every connection open and accept new ones, but forward nothing) and thaw, to simulate a peer
that stops answering while its kernel still acknowledges packets (a hung proxy or pooler, a
partition behind a load balancer)."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``(host, port)`` with two threads per connection."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thawed = threading.Event()
        self._thawed.set()
        self._accepter: threading.Thread | None = None
        self.port = 0
        self._listen()

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accepter = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._accepter.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed: cut() or close()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._thawed.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> None:
        """Refuse new connections and break every open one (the database "goes away")."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            self._listener.close()
            self._listener = None
        if self._accepter is not None:
            self._accepter.join(5)
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            self._close(sock)

    def freeze(self) -> None:
        """Forward nothing more, in either direction, while keeping every connection open."""
        self._thawed.clear()

    def thaw(self) -> None:
        """Forward again, starting with what arrived while frozen."""
        self._thawed.set()

    def restore(self) -> None:
        """Accept connections again on the same port."""
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.cut()
        self._thawed.set()  # lets frozen pumps find their sockets closed and exit
