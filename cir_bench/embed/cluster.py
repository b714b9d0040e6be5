"""Connecting to Ray: a local instance, or an existing cluster given by ``--address``.

Ray starts clusters with token authentication; ``ray.init("auto")`` turns it on by itself when a
token is at hand, an explicit address does not, and a client without it retries for ~20 s and
ends in a bare ``ConnectionError``. Here: an address that does not answer fails at once with the
address named; with a token available (``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, or
``~/.ray/auth_token``, where ``ray start`` writes it) token mode is switched on as Ray does for
"auto"; without one, a short probe in a subprocess tells a cluster that wants a token apart and
the error says what to set.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping

PROBE_TIMEOUT_S = 5.0  # a client that is let in connects in ~2 s here


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


def _probe(address: str) -> bool:
    """Can a client connect within PROBE_TIMEOUT_S (in a subprocess, so a retry loop is cut)?"""
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
            "ray.shutdown()")
    try:
        done = subprocess.run([sys.executable, "-c", code, address], capture_output=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """``ray.init`` on a cluster (``address``) or a local instance; reuses a running one."""
    import ray

    if ray.is_initialized():
        return
    if not address:
        ray.init(num_cpus=num_cpus, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        return
    check_reachable(address)
    if not os.environ.get("RAY_AUTH_MODE"):
        if token_source() is not None:
            _enable_token_auth()
        elif address != "auto" and not _probe(address):
            raise ClusterConnectError(
                f"--address {address}: the cluster answers but refuses this client within {PROBE_TIMEOUT_S:.0f} s; "
                "Ray clusters use token authentication by default: set RAY_AUTH_MODE=token and give the "
                "cluster's token (the head node's ~/.ray/auth_token) as $RAY_AUTH_TOKEN or in ~/.ray/auth_token")
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
