"""`reach.check_reachable`: a Ray head passes; a port where nothing, or something else,
answers is refused in words at once, where Ray's own join would wait."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from grass_dist.errors import ClusterUnreachableError
from grass_dist.runtime.reach import check_reachable


def test_a_running_ray_head_and_its_ray_client_scheme_pass(ray_session):
    address = ray_session.get_runtime_context().gcs_address
    check_reachable(address)
    check_reachable(f"ray://{address}")  # the probe speaks to the port, whatever the scheme


def test_a_server_that_accepts_and_says_nothing_is_refused_after_the_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        silent_for = r"not a Ray head \(it sent nothing within 0.5 s\)"
        with pytest.raises(ClusterUnreachableError, match=silent_for):
            check_reachable(address, timeout_s=0.5)
        assert time.monotonic() - started < 5


def test_a_server_that_closes_the_connection_is_refused():
    with socket.socket() as closing:
        closing.bind(("127.0.0.1", 0))
        closing.listen()
        address = f"127.0.0.1:{closing.getsockname()[1]}"

        def accept_and_close():
            conn, _ = closing.accept()
            conn.close()

        threading.Thread(target=accept_and_close, daemon=True).start()
        with pytest.raises(ClusterUnreachableError, match=r"not a Ray head \(it (closed|broke)"):
            check_reachable(address, timeout_s=5)


def test_a_tls_head_is_left_to_ray(monkeypatch):
    # Plaintext HTTP/2 gets a TLS alert from a head with RAY_USE_TLS: no protocol check.
    monkeypatch.setenv("RAY_USE_TLS", "1")
    with socket.socket() as tls:
        tls.bind(("127.0.0.1", 0))
        tls.listen()
        check_reachable(f"127.0.0.1:{tls.getsockname()[1]}", timeout_s=0.5)
