"""A real multi-node Ray cluster on this machine for the cluster tests: one `ray start --block`
per node (head + workers), token authentication with a token in an isolated HOME, ports picked
free, its own temp folder.

Teardown stops exactly these processes: `ray stop` would kill every Ray on the machine (the test
session's own local Ray included), so each node is one `ray start --block` process whose
descendants are the node's processes (raylet, GCS, agents, workers); it gets SIGTERM (Ray drains
and stops the node, which can take up to 30 s), and whatever of its tree is left after a 5 s
grace gets SIGKILL: nothing of a throw-away test cluster needs a clean drain.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """An ephemeral port (above Ray's default worker port range 10002-19999)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalCluster:
    """``start()`` the head, ``add_node()`` workers, ``stop()`` everything it started."""

    def __init__(self, home: Path, cpus_per_node: int = 1) -> None:
        self.home = home
        self.cpus = cpus_per_node
        # a short path: Ray's sockets live under it and AF_UNIX paths are limited to 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="cirr", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[tuple[subprocess.Popen, Path]] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that talks to this cluster: the isolated HOME (where the
        token is), no inherited RAY_ADDRESS / auth settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        return {**env, "HOME": str(self.home), **extra}

    def _launch(self, args: list[str], name: str, env: dict[str, str], wrap: list[str] | None = None) -> None:
        log_path = self.temp_dir / f"{name}.log"
        log = open(log_path, "w")
        cmd = [*(wrap or []), RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
               "--object-store-memory=150000000", f"--dashboard-agent-listen-port={free_port()}",
               "--disable-usage-stats", *args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.nodes.append((proc, log_path))
        deadline = time.time() + 90
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start ({name}) failed:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)

    def start(self) -> "LocalCluster":
        (self.home / ".ray").mkdir(parents=True, exist_ok=True)
        # a token before the head starts: `ray start --head` then runs with token authentication
        subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env(), check=True, capture_output=True)
        self._launch(["--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                      f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"],
                     "head", self.env())
        return self

    def add_node(self, name: str = "worker", wrap: list[str] | None = None) -> None:
        """A worker node; ``wrap`` prefixes the command (e.g. to start it in its own mount namespace).
        A joining node must be told to use token authentication (RAY_AUTH_MODE=token)."""
        self._launch([f"--address={self.address}"], name, self.env(RAY_AUTH_MODE="token"), wrap)

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        code = ("import ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
                "print(sum(1 for x in ray.nodes() if x['Alive']))" % self.address)
        deadline = time.time() + timeout
        while True:
            done = subprocess.run([sys.executable, "-c", code], env=self.env(RAY_AUTH_MODE="token"),
                                  capture_output=True, text=True, timeout=60)
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            if time.time() > deadline:
                raise RuntimeError(f"cluster did not reach {n} nodes: {done.stdout[-500:]} {done.stderr[-2000:]}")
            time.sleep(1)

    def stop_node(self, index: int) -> None:
        proc, _ = self.nodes[index]
        _stop_tree(proc)

    def stop(self) -> None:
        for proc, _ in reversed(self.nodes):  # workers first, the head last
            _stop_tree(proc)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for _, p in self.nodes if p.exists())


def _stop_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.terminate()  # Ray starts draining the node and stopping its processes
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=1)
    for p in alive:  # what the drain left behind
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
