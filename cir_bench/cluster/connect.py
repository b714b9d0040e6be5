"""Connecting to Ray: a local instance, or an existing cluster given by ``--address``.

Ray starts clusters with token authentication; ``ray.init("auto")`` turns it on by itself when a
token is at hand, an explicit address does not, and a client without it retries for ~20 s and
ends in a bare ``ConnectionError``. Here: an address that does not answer fails at once with the
address named; with a token available (``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``, where ``ray start`` writes it) token mode is switched on as Ray does for
"auto"; then one handshake with the cluster's GCS in a subprocess tells a refused client at
once, and the error says what to set.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

PROBE_TIMEOUT_S = 5.0  # the handshake takes ~0.5 s here, interpreter start included


class ClusterConnectError(ConnectionError):
    """The Ray cluster at ``--address`` cannot be used; the message says what to do."""


def token_source(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str | None:
    """Where Ray would read an authentication token from, or None when there is none."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).expanduser().is_file():
        return path
    default = (home or Path.home()) / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def private_token_file(home: Path | None = None) -> Path | None:
    """Ray writes the token it generates for a local cluster (~/.ray/auth_token) readable by
    every user: whoever reads it may run code on the cluster. Make ours 0600 (and its folder
    0700)."""
    path = (home or Path.home()) / ".ray" / "auth_token"
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_uid == os.geteuid():
        if st.st_mode & 0o077:
            path.chmod(0o600)
        if path.parent.stat().st_mode & 0o077:
            path.parent.chmod(0o700)
    return path


def _host_port(address: str) -> tuple[str, int] | None:
    bare = address.split("://", 1)[-1]
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A TCP connection to the address's port, so a wrong address fails in seconds."""
    hp = _host_port(address)
    if hp is None:
        if address != "auto":
            raise ClusterConnectError(f"--address {address!r}: expected HOST:PORT of the head node (e.g. "
                                      "127.0.0.1:6379) or 'auto'")
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as err:
        raise ClusterConnectError(
            f"--address {address}: no Ray cluster answers there ({err.strerror or err}); start one with "
            f"`ray start --head --port={hp[1]}` on {hp[0]}, or check the host and port") from None


def _enable_token_auth() -> None:
    """What ``ray.init("auto")`` does when a token is at hand: token mode for this process and
    its children, Ray's cached config refreshed (reading the environment alone is too late once
    Ray is imported)."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # another Ray layout: the environment variable, then Ray's config refresh
        os.environ["RAY_AUTH_MODE"] = "token"
        try:
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):
            pass
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


_PROBE = """
import sys
try:
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError
except ImportError:
    sys.exit(4)
try:
    GcsClient(address=sys.argv[1])
except AuthenticationError:
    sys.exit(3)
"""


def _probe(address: str) -> str:
    """Does the cluster let this client in? One handshake with its GCS in a subprocess (bounded:
    a refused client is told at once, ~0.5 s; ``ray.init`` would retry for ~20 s): "ok", "auth"
    (refused: no token or another cluster's), or "unknown"."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True,
                              timeout=PROBE_TIMEOUT_S, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return "unknown"
    return {0: "ok", 3: "auth"}.get(done.returncode, "unknown")


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """``ray.init`` on a cluster (``address``) or a local instance; reuses a running one."""
    import ray

    if ray.is_initialized():
        return
    if not address:
        ray.init(num_cpus=num_cpus, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        private_token_file()
        return
    check_reachable(address)
    if not os.environ.get("RAY_AUTH_MODE") and token_source() is not None:
        _enable_token_auth()  # as ray.init("auto") does: a token at hand means token mode
    if address != "auto" and _probe(address) == "auth":
        where = token_source()
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and where:
            raise ClusterConnectError(
                f"--address {address}: the cluster refuses the token from {where}; it must be the cluster's "
                "token (the head node's ~/.ray/auth_token), given as $RAY_AUTH_TOKEN or in ~/.ray/auth_token")
        raise ClusterConnectError(
            f"--address {address}: the cluster answers but refuses this client: Ray clusters use token "
            "authentication by default; set RAY_AUTH_MODE=token and give the cluster's token (the head node's "
            "~/.ray/auth_token) as $RAY_AUTH_TOKEN or in ~/.ray/auth_token")
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except ConnectionError as err:
        if address == "auto":
            raise ClusterConnectError(f"no running Ray instance to join ({err})") from None
        where = token_source()
        raise ClusterConnectError(
            f"--address {address}: cannot join the cluster ({err}); with token authentication "
            f"(RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}, token from {where or 'nowhere'}) the token "
            "must be the head node's ~/.ray/auth_token") from None


class SharedCacheError(ClusterConnectError):
    """A node of the cluster cannot read or write the cache folder the driver uses."""


MARKER_DIR = ".cluster-check"


def _node_check(marker: str, token: str, reply: str, must_exist: list[str]) -> dict[str, str]:
    """Runs on one node: read the driver's marker, write a reply beside it, look for paths."""
    import os
    import socket

    seen = {"host": socket.gethostname()}
    try:
        content = Path(marker).read_text()
    except OSError as err:
        return {**seen, "problem": f"cannot read {marker} ({err.strerror or err})"}
    if content != token:
        return {**seen, "problem": f"reads another {marker} than the driver wrote (a different folder at that path)"}
    try:
        Path(reply).write_text(token)
    except OSError as err:
        return {**seen, "problem": f"cannot write in {Path(reply).parent} ({err.strerror or err})"}
    missing = [p for p in must_exist if not os.path.exists(p)]
    if missing:
        return {**seen, "problem": f"has no {', '.join(missing)}"}
    return seen


def check_shared_folder(path: str | Path, must_exist: Sequence[str | Path] = (), timeout_s: float = 60.0,
                        what: str = "cache folder", flag: str = "--cache-dir (or $CIR_BENCH_CACHE)") -> list[str]:
    """Every alive node of the connected cluster reads a marker this process wrote in the folder
    and writes one back, which this process then reads: checkpoints, embeddings and students
    (the cache), trial results (Tune's storage) are files there, read and written by whichever
    node a task lands on. ``must_exist``: other paths every node needs (a dataset root). Returns
    the ids of the nodes checked; raises SharedCacheError naming the first node that cannot see
    the folder."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(path).expanduser().resolve() / MARKER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    marker = folder / f"{token}.driver"
    marker.write_text(token)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    remote = ray.remote(num_cpus=0, max_retries=0)(_node_check)
    replies = {n["NodeID"]: folder / f"{token}.{n['NodeID']}" for n in nodes}
    try:
        refs = {n["NodeID"]: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                                            ).remote(str(marker), token, str(replies[n["NodeID"]]),
                                                     [str(Path(p).expanduser()) for p in must_exist])
                for n in nodes}
        ips = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        if pending:
            late = [node for node, ref in refs.items() if ref in pending]
            raise SharedCacheError(f"cache check: node {late[0][:12]} ({ips[late[0]]}) did not answer within "
                                   f"{timeout_s:.0f} s; is it busy or gone? (`ray status`)")
        for node, ref in refs.items():
            seen = ray.get(ref)
            problem = seen.get("problem")
            if problem is None:
                try:
                    if replies[node].read_text() != token:
                        problem = f"wrote {replies[node]}, but this process reads something else there"
                except OSError:
                    problem = f"wrote its reply in its own {folder}, which this process does not see"
            if problem:
                raise SharedCacheError(
                    f"{what} {folder.parent} is not shared with node {node[:12]} ({ips[node]}, host "
                    f"{seen['host']}): it {problem}. Every node reads and writes files there: mount one shared "
                    f"filesystem at the same path on every node and pass that path as {flag}")
        return list(refs)
    finally:
        for written in [marker, *replies.values()]:
            written.unlink(missing_ok=True)


def join(address: str, cache_dir: str | Path, must_exist: Sequence[str | Path] = ()) -> dict[str, object]:
    """Connect to the cluster at ``address`` and check that every node shares the cache folder;
    returns what a manifest records of it (address, node ids)."""
    connect(address)
    nodes = check_shared_folder(cache_dir, must_exist)
    return {"address": address, "nodes": nodes}
