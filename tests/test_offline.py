"""The privacy guard: non-loopback connections and lookups raise, loopback keeps working, and the
socket functions are restored afterwards. No test here reaches the network: the guarded calls
raise before any packet is sent."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request

import pytest

from flashmoe_backend.offline import NetworkBlockedError, NetworkGuard, block_network, is_local


@pytest.mark.parametrize("host", [None, "", "localhost", "LOCALHOST.", "app.localhost", "127.0.0.1",
                                  "127.8.9.10", "::1", "[::1]", "::ffff:127.0.0.1", "0.0.0.0", "::",
                                  b"127.0.0.1"])
def test_local_hosts(host):
    assert is_local(host)


@pytest.mark.parametrize("host", ["example.com", "1.1.1.1", "10.0.0.1", "192.168.1.1", "2001:db8::1",
                                  "fe80::1%eth0", "::ffff:8.8.8.8", "localhost.example.com",
                                  b"8.8.8.8"])
def test_remote_hosts(host):
    assert not is_local(host)


def _listener() -> tuple[socket.socket, int]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    return server, server.getsockname()[1]


def test_blocks_remote_and_allows_loopback():
    originals = (socket.getaddrinfo, socket.socket.connect, socket.socket.sendto)
    with NetworkGuard() as guard:
        with pytest.raises(NetworkBlockedError, match="example.com"):
            socket.getaddrinfo("example.com", 443)
        with pytest.raises(NetworkBlockedError, match="example.com"):
            socket.gethostbyname("example.com")
        with pytest.raises(NetworkBlockedError, match=r"1\.1\.1\.1:443"):
            socket.create_connection(("1.1.1.1", 443), timeout=1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkBlockedError):
            s.connect_ex(("93.184.216.34", 80))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(NetworkBlockedError):
            s.sendto(b"x", ("8.8.8.8", 53))
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s, pytest.raises(NetworkBlockedError):
            s.connect(("2001:db8::1", 443, 0, 0))
        with pytest.raises(NetworkBlockedError):  # HTTP clients go through the same calls
            urllib.request.urlopen("http://example.com/", timeout=1)

        server, port = _listener()
        with server, socket.create_connection(("localhost", port), timeout=5) as client:
            conn, _ = server.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()
        assert len(guard.blocked) == 7 and guard.blocked[0] == "getaddrinfo example.com:443"
    assert (socket.getaddrinfo, socket.socket.connect, socket.socket.sendto) == originals
    assert not guard.installed


def test_guard_covers_other_threads_and_asyncio():
    errors: list[Exception] = []

    def worker() -> None:
        try:
            socket.create_connection(("1.1.1.1", 443), timeout=1)
        except Exception as e:  # recorded for the assertion below
            errors.append(e)

    async def remote() -> None:
        await asyncio.open_connection("example.com", 443)

    with NetworkGuard():
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        with pytest.raises(NetworkBlockedError):
            asyncio.run(remote())
    assert len(errors) == 1 and isinstance(errors[0], NetworkBlockedError)


def test_not_an_oserror_and_one_guard_at_a_time():
    assert not issubclass(NetworkBlockedError, OSError)  # "except OSError: offline" cannot hide it
    with NetworkGuard() as guard:
        assert block_network() is guard  # already installed: the same guard
        with pytest.raises(RuntimeError, match="already installed"):
            NetworkGuard().install()
    guard = block_network()
    try:
        assert guard.installed
        with pytest.raises(NetworkBlockedError):
            socket.getaddrinfo("example.org", 80)
    finally:
        guard.uninstall()
    guard.uninstall()  # idempotent
    assert not guard.installed
