"""Whether a Ray cluster to join is there: `check_reachable` probes its head before Ray's
own join, which waits minutes on an address where nothing listens and for good on one where
another server does, and refuses another process's embedded Ray that 'auto' would join."""

from __future__ import annotations

import os
import socket

from grass_dist.errors import ClusterUnreachableError

REACH_TIMEOUT_S = 10.0  # how long a joined cluster's head may take to accept a connection
# HTTP/2's client preface and an empty SETTINGS frame: a Ray head (its GCS, or the Ray
# client server behind ray://) is a gRPC server, which answers with a SETTINGS frame.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x04


def unreachable(address: str, why: str) -> ClusterUnreachableError:
    return ClusterUnreachableError(
        f"no Ray cluster to join at cluster.address={address} ({why}): start one "
        'first (`ray start --head`; README: "On this machine with `ray start`"), '
        "give the head's address, or drop cluster=ray (cluster.address=null) to run "
        "on an embedded Ray"
    )


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """ClusterUnreachableError unless a Ray head answers at its address (for 'auto', the
    cluster Ray would join) within `timeout_s`: something accepts connections there and
    speaks gRPC (HTTP/2) as Ray's head does. Ray's own join waits minutes on an address
    where nothing listens, and for good on one where another server does (the dashboard's
    port, say). Addresses of other schemes are left to Ray, as is a head that uses TLS.
    """
    target: str | None = address
    if address == "auto":
        try:
            target = _auto_address()
        except ConnectionError as e:
            raise unreachable(address, str(e)) from None
        except ClusterUnreachableError:
            raise  # another process's embedded Ray
        except Exception:  # noqa: BLE001 - a Ray without it: ray.init resolves 'auto' itself
            return
    target = str(target).removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if "://" in target or not sep or not port.isdigit():
        return
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as e:
        why = f"nothing accepted a connection at {target} within {timeout_s:g} s: {e}"
        raise unreachable(address, why) from None
    with connection:
        if _tls():  # a TLS head answers our plaintext with an alert: leave it to Ray
            return
        answer = _first_frame(connection, timeout_s)
    if answer is not None:
        raise ClusterUnreachableError(
            f"no Ray cluster to join at cluster.address={address}: something at {target} "
            f"accepted a connection but is not a Ray head ({answer}), and Ray would wait "
            f"for it for good. Fix: give the address `ray start --head` printed (port 6379 "
            f"by default; the dashboard's 8265 is not it), or ray://HOST:10001 for the Ray "
            f"client; or drop cluster=ray (cluster.address=null) to run on an embedded Ray"
        )


def _auto_address() -> str:
    """The cluster `ray.init(address="auto")` joins: RAY_ADDRESS, else the one `ray start`
    recorded on this machine. Ray's 'auto' then falls back to any Ray whose processes run
    here: another process's embedded Ray (another job's, a notebook's), which a job that
    joins it shares the CPUs of (its workers wait for them) and dies with. That one is
    refused, naming it; its address, given as cluster.address, still joins it."""
    from ray._private import services  # Ray's own resolution of 'auto'

    recorded = services.canonicalize_bootstrap_address(None)  # RAY_ADDRESS, `ray start`'s
    if recorded is not None:
        return recorded
    others = sorted(services.find_gcs_addresses())
    if others:
        raise unreachable(
            "auto",
            "none was started with `ray start` on this machine, and RAY_ADDRESS is unset; "
            f"the Ray running at {', '.join(others)} is not one `ray start` recorded (under "
            "this RAY_TMPDIR): another process's own embedded Ray, whose CPUs its job holds "
            "and which ends with it; to join it all the same, give its address",
        )
    return services.canonicalize_bootstrap_address_or_die("auto")  # raises: none is running


def _tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true")


def _first_frame(connection: socket.socket, timeout_s: float) -> str | None:
    """None when the server at `connection` answers HTTP/2's preface with a SETTINGS frame,
    as a gRPC server (Ray's head) does; else what it did instead, in words."""
    received = b""
    try:
        connection.sendall(_H2_PREFACE)
        while len(received) < 9:  # a frame header: length (3), type, flags, stream (4)
            chunk = connection.recv(9 - len(received))
            if not chunk:
                break
            received += chunk
    except TimeoutError:
        return f"it sent nothing within {timeout_s:g} s" if not received else "it stopped"
    except OSError as e:
        return f"it broke the connection ({e})"
    if len(received) == 9 and received[3] == _H2_SETTINGS:
        return None
    if received.startswith(b"HTTP/") or received.lstrip().lower().startswith(b"<"):
        return "it answered as an HTTP/1 server"  # a status line, or an HTML error page
    return "it closed the connection" if not received else "it answered in another protocol"
