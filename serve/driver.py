"""The serving driver: start the Ray Serve app for a run config and hold it until Ctrl+C,
SIGTERM or ``cir-bench serve --stop`` (``run_server``), or stop one (``stop_server``). The
CLI parses and checks the arguments, then calls these."""
from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import time
import urllib.request

from cir_bench.config import ConfigError, RunConfig

APP_NAME = "cir-bench"
# Serve kills a proxy that is not ready within 5 s (its default); a small, busy machine can take
# longer to start one. Ray's processes inherit this from the one that starts Ray.
PROXY_READY_TIMEOUT_S = "30"


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: Serve's proxy shares a port with another
    proxy (SO_REUSEPORT), and two apps would then answer in turn. Connections of a server
    stopped moments ago (TIME_WAIT, thousands after a load test) do not count: the proxy
    binds past them too (SO_REUSEADDR), and so does this probe."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"--port {port}: {host}:{port} is not free ({err.strerror}); another cir-bench serve? "
                              "Stop it (Ctrl+C, or `cir-bench serve --stop --address ADDR`) or pick another "
                              "--port", key="port") from None


def stop_server(address: str | None) -> None:
    """Remove the app from the Ray at ``address``; without one, this user's only local server."""
    from cir_bench_serve.runtime import LOCAL_RAY, is_loopback, local_servers

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_TIMEOUT_S)
    if not address:  # Ray's "auto" may find another user's cluster: only this user's servers
        mine = local_servers()
        if len(mine) != 1:
            raise ConfigError("serve --stop: " + ("no `cir-bench serve` of yours is running on this machine"
                                                  if not mine else "several of your servers run: " +
                                                  ", ".join(f"pid {pid} (Ray at {addr})" for pid, addr in mine))
                              + "; name one with --address HOST:PORT (the server printed it)")
        address = mine[0][1]
    if is_loopback(address):
        os.environ[LOCAL_RAY] = "0"  # a local server's Ray is on 127.0.0.1: join it as a driver there
    from ray import serve

    from cir_bench.cluster import connect

    connect(address or "auto")
    serve.shutdown()


def check_gpus(settings) -> None:
    """On a local Ray, a serve config that gives a deployment a GPU needs a CUDA device here:
    without one its replicas would wait for a GPU forever."""
    names = [name for name, d in settings.deployments.items() if d.ray_actor_options.num_gpus > 0]
    if not names:
        return
    import torch

    if torch.cuda.device_count() == 0:
        key = f"deployments.{names[0]}.ray_actor_options.num_gpus"
        raise ConfigError(f"the serve config gives {', '.join(names)} a GPU ({key}), but this machine has no CUDA "
                          "device: serve with the CPU layout (serve/config.yaml) or set num_gpus to 0", key=key)


def run_server(cfg: RunConfig, settings, host: str, port: int, address: str | None, progress: bool = True) -> None:
    """Build (or load from the cache) what the run config names, deploy the app with the serve
    config ``settings`` on ``host:port`` and, on a local Ray, block until stopped; on a cluster
    (``address``) return once deployed."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", PROXY_READY_TIMEOUT_S)
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}", key="port")
    if not address:
        check_gpus(settings)
        check_port_free(host, port)
        # Serve's switches (serve/runtime.py) are read from the environment when a process
        # imports Serve: set before ray is imported here and before the local Ray starts, and
        # only once the arguments are known to be good (a refused call leaves the environment
        # as it was: callers in the same process, e.g. tests, would otherwise inherit them)
        from cir_bench_serve.runtime import serve_environment

        os.environ.update(serve_environment(settings.ray_serve.haproxy, settings.ray_serve.throughput_optimized,
                                            http_port=port))
    else:  # before any work: the replicas load the bundle's files from the cache on their nodes
        from cir_bench.cluster import join
        from cir_bench.pipeline import cache_dir_for

        join(address, cache_dir_for(cfg), [cfg.dataset.root] if cfg.dataset.root else [])
    import ray
    from ray import serve

    from cir_bench.cluster import connect
    from cir_bench.serving import build_bundle
    from cir_bench_serve.app import build_app, with_index

    # train or load the model, embeddings and students once, here; the deployments load the files
    bundle = with_index(build_bundle(cfg, progress=progress), settings, cfg.eval.search_batch)
    connect(address)
    if not address:
        check_port_free(host, port)  # again: another server may have started meanwhile
    try:
        serve.start(http_options={"host": host, "port": int(port)})
        served = settings.model_copy(update={"http": settings.http.model_copy(update={"host": host, "port": int(port)})})
        serve.run(build_app(bundle, served), route_prefix="/", name=APP_NAME)
    except RuntimeError as err:
        if "HAProxy" not in str(err):
            raise
        alerts = [line.split(":", 1)[-1].strip() for line in str(err).splitlines() if "[ALERT]" in line]
        raise ConfigError(f"Ray's HAProxy (ray_serve.haproxy) did not start: {'; '.join(alerts[:2]) or err}. "
                          "Set ray_serve.haproxy: false in the serve config to use Ray's Python proxy",
                          key="ray_serve.haproxy") from None
    url = f"http://{host}:{port}"
    print(f"cir-bench serve: {url}  (POST /search, GET /healthz, GET /properties, GET /stats, OpenAPI at /docs)",
          flush=True)
    _print_teacher(url)
    if address:
        if settings.ray_serve.haproxy or settings.ray_serve.throughput_optimized:
            print("cir-bench serve: on a cluster Serve's switches (ray_serve in the serve config) are the ones "
                  "`ray start` was given on each node: RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
                  "ray start ... (README, Running on a Ray cluster)", flush=True)
        return  # deployed on the cluster; `cir-bench serve --stop --address ...` removes it
    from cir_bench_serve.runtime import runtime_dir, runtime_folder_root

    gcs = ray.get_runtime_context().gcs_address
    (runtime_dir() / "ray-address").write_text(gcs)  # for serve --stop
    print(f"cir-bench serve: Ray at {gcs}; stop with Ctrl+C or `cir-bench serve --stop --address {gcs}`", flush=True)
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ray installs its own handlers; ours decide
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    checked = time.monotonic()
    while not stop:
        time.sleep(0.2)
        if time.monotonic() - checked > 1.0:
            checked = time.monotonic()
            if not _app_running(APP_NAME):  # removed by `serve --stop` from another process
                break
    if stop:
        serve.shutdown()
    ray.shutdown()
    shutil.rmtree(runtime_folder_root() / str(os.getpid()), ignore_errors=True)  # HAProxy's files, the address


def _app_running(name: str) -> bool:
    from ray import serve

    try:
        return name in serve.status().applications
    except Exception:  # noqa: BLE001 -- the controller is gone: Serve was shut down
        return False


def _print_teacher(url: str) -> None:
    """Whether the served teacher compiled its search step (teacher.compile), from /stats."""
    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
            teacher = json.loads(response.read()).get("teacher", {})
    except (OSError, ValueError):
        return  # e.g. a cluster's HTTP proxy this machine cannot reach: the server is up anyway
    if "compile" in teacher:
        print(f"cir-bench serve: teacher torch.compile {teacher['compile']}", flush=True)
