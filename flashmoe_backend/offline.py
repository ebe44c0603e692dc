"""A privacy guard: any attempt to reach a non-loopback address raises ``NetworkBlockedError``.

``block_network()`` installs the guard for the rest of the process (what a notebook over private
documents does in its first cell); ``NetworkGuard()`` is the same as a context manager. The guard
patches the Python socket layer that every HTTP client, DNS lookup and telemetry library goes
through: ``socket.getaddrinfo`` / ``gethostbyname`` / ``gethostbyname_ex`` (so a host name is
never even resolved) and ``socket.socket.connect`` / ``connect_ex`` / ``sendto`` (so a literal IP
address is never reached; ``socket.create_connection``, ``ssl`` and ``asyncio`` use these).
Loopback (``localhost``, 127.0.0.0/8, ``::1``), unspecified addresses (bind-all) and Unix sockets
stay allowed: local kernels and services keep working. Native code that opens its own sockets is
not covered.

``NetworkBlockedError`` is a ``RuntimeError``, not an ``OSError``: code that treats connection
failures as "offline, carry on" does not swallow it; every blocked attempt is also recorded in
``NetworkGuard.blocked``.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

_INET = (socket.AF_INET, socket.AF_INET6)
_RESOLVERS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex")  # functions of the socket module
_CONNECTORS = ("connect", "connect_ex", "sendto")  # methods of socket.socket


class NetworkBlockedError(RuntimeError):
    """A connection to (or a lookup of) a non-loopback host was attempted under the guard."""


def is_local(host: object) -> bool:
    """Whether ``host`` (a name, an address, or None) stays on this machine."""
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host).strip("[]").split("%")[0].rstrip(".").lower()  # [::1], fe80::1%eth0, name.
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other name needs a DNS lookup: that already leaves the machine
    address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1
    return address.is_loopback or address.is_unspecified


class NetworkGuard:
    """Blocks non-loopback network access while installed (``with NetworkGuard(): ...``)."""

    _lock = threading.Lock()
    _active: NetworkGuard | None = None

    def __init__(self) -> None:
        self.blocked: list[str] = []  # what was refused, e.g. "connect 1.1.1.1:443"
        self._saved: dict[tuple[object, str], object] = {}

    def _refuse(self, what: str, host: object, port: object = None) -> None:
        target = f"{host}:{port}" if port is not None else f"{host}"
        self.blocked.append(f"{what} {target}")
        raise NetworkBlockedError(
            f"network access blocked by flashmoe's privacy guard: {what} {target} "
            "(only loopback is allowed)"
        )

    def _patches(self) -> dict[tuple[object, str], object]:
        guard = self

        def resolver(name: str):
            original = getattr(socket, name)

            def guarded(host, *args, **kwargs):
                if not is_local(host):
                    guard._refuse(name, host, args[0] if args and name == "getaddrinfo" else None)
                return original(host, *args, **kwargs)

            return guarded

        def connector(name: str):
            original = getattr(socket.socket, name)

            def guarded(sock, *args, **kwargs):
                # connect(address), connect_ex(address), sendto(data[, flags], address)
                address = args[-1] if args else None
                if sock.family in _INET and isinstance(address, tuple) and not is_local(address[0]):
                    guard._refuse(name, address[0], address[1] if len(address) > 1 else None)
                return original(sock, *args, **kwargs)

            return guarded

        patches = {(socket, name): resolver(name) for name in _RESOLVERS}
        patches.update({(socket.socket, name): connector(name) for name in _CONNECTORS})
        return patches

    def install(self) -> NetworkGuard:
        """Start blocking. Only one guard can be installed at a time."""
        with NetworkGuard._lock:
            if NetworkGuard._active is not None:
                raise RuntimeError("a network guard is already installed")
            patches = self._patches()
            for (owner, name), replacement in patches.items():
                self._saved[(owner, name)] = getattr(owner, name)
                setattr(owner, name, replacement)
            NetworkGuard._active = self
        return self

    def uninstall(self) -> None:
        """Stop blocking (restores the original socket functions)."""
        with NetworkGuard._lock:
            if NetworkGuard._active is not self:
                return
            for (owner, name), original in self._saved.items():
                setattr(owner, name, original)
            self._saved.clear()
            NetworkGuard._active = None

    @property
    def installed(self) -> bool:
        return NetworkGuard._active is self

    def __enter__(self) -> NetworkGuard:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def block_network() -> NetworkGuard:
    """Block non-loopback network access for the rest of the process; returns the guard (the
    one already installed, if any)."""
    active = NetworkGuard._active
    return active if active is not None else NetworkGuard().install()
