"""Typed settings of the Ray Serve app (serve/config.yaml), checked when read, before Ray
starts: unknown sections, deployments or keys, wrong types and out-of-range values fail with
the file and the key named."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from cir_bench.config import ConfigError, Section, merge, parse, read_yaml
from cir_bench.serving.requests import ServiceLimits

STAGES = ("encoder", "teacher", "student", "index")
DEPLOYMENTS = ("ingress", *STAGES)


class ActorOptions(Section):
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)  # a replica uses CUDA exactly when it was given a GPU
    # environment of the replica's process (Ray's runtime_env env_vars), e.g. Serve's own
    # RAY_SERVE_* switches for that deployment only
    env: dict[str, str] = Field(default_factory=dict)


class Deployment(Section):
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)  # also bounds a batch
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    # on stop, a replica finishes its requests in flight (for at most the timeout), checking
    # every wait_loop seconds: Serve's 2 s loop made every stop take ~5 s with nothing in flight
    graceful_shutdown_wait_loop_s: float = Field(0.1, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)


class Batching(Section):
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)


class Limits(ServiceLimits):
    """The service's limits (one definition, cir_bench.serving.ServiceLimits) and where the store is held."""

    ingress_store_mb: float = Field(256.0, ge=0)  # stores up to this size are also held by the ingress


class IndexSection(Section):
    backend: str | None = None  # None: the run config's eval.index
    options: dict[str, Any] = Field(default_factory=dict)


class IngressSection(Section):
    # stages the ingress answers itself instead of calling their deployment: each hop through
    # a handle costs milliseconds of Serve's queueing and CPU, while the student (one MLP pass)
    # and the exact index over a small in-memory store take well under a millisecond. The
    # teacher here is still batched (batching.teacher), on a worker thread of the ingress's
    # process: on CPUs it is faster and serves more requests/s than its own deployment (README,
    # serving); on a GPU machine it gets a GPU replica of its own instead (not listed here).
    # The encoder always keeps its deployment. "index" stays remote when the store is larger
    # than limits.ingress_store_mb.
    local: list[Literal["student", "index", "teacher"]] = Field(
        default_factory=lambda: ["student", "index", "teacher"])


class TeacherSection(Section):
    # torch.compile of the served Backward Search step (cir_bench.serving.components:
    # compile_decision): "auto" compiles on the CPU when a C++ compiler is there (the buckets a
    # batch can reach, when the replica starts: seconds, cached on disk by torch) and serves
    # uncompiled when not, saying so in /stats; true must compile; false leaves it to the run
    # config's search.compile (its effect on latency: docs/performance.md).
    compile: Literal["auto", True, False] = "auto"


class Http(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)


class RayServeSection(Section):
    """Ray Serve's two switches for fast serving (serve/runtime.py), applied as the environment
    of the Ray that ``cir-bench serve`` starts; on a cluster, ``ray start``'s environment decides."""

    # RAY_SERVE_ENABLE_HA_PROXY: HAProxy on host:port forwards each request to the ingress
    # replica's own HTTP server, instead of Ray's Python proxy passing it on as an actor call
    haproxy: bool = True
    # RAY_SERVE_THROUGHPUT_OPTIMIZED: handle calls between replicas over gRPC, user code and
    # router on the replica's event loop, access log buffered, GC frozen after start-up
    throughput_optimized: bool = True


# Each deployment's and each stage's batching defaults. The shipped config.yaml sets only what
# its layout deploys (the ingress, the encoder, the teacher's in-ingress batching): a stage moved
# out of ingress.local gets these unless the file sets its own.
DEPLOYMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    # the ingress only awaits the others: let it hold many requests so that they can meet in
    # one batch downstream (Serve's default of 5 ongoing requests per replica caps the batch)
    "ingress": {"max_ongoing_requests": 256},
    "encoder": {"ray_actor_options": {"num_cpus": 0.25}},
    "teacher": {"ray_actor_options": {"num_cpus": 0.5}},
    "student": {"ray_actor_options": {"num_cpus": 0.25}},
    "index": {"ray_actor_options": {"num_cpus": 0.5}},
}
BATCHING_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
    # concurrent requests share one inversion; requests queue while one runs, so a long wait
    # only adds latency
    "teacher": {"max_batch_size": 16, "batch_wait_timeout_s": 0.001},
    "student": {"max_batch_size": 16, "batch_wait_timeout_s": 0.002},
    "index": {"max_batch_size": 32, "batch_wait_timeout_s": 0.002},
}


class ServeSettings(Section):
    deployments: dict[str, Deployment] = Field(default_factory=dict)
    batching: dict[str, Batching] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    index: IndexSection = Field(default_factory=IndexSection)
    ingress: IngressSection = Field(default_factory=IngressSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    http: Http = Field(default_factory=Http)
    ray_serve: RayServeSection = Field(default_factory=RayServeSection)

    def deployment(self, name: str) -> dict[str, Any]:
        """Ray Serve ``.options(...)`` of one deployment."""
        options = self.deployments[name].model_dump()
        env = options["ray_actor_options"].pop("env")
        if env:
            options["ray_actor_options"]["runtime_env"] = {"env_vars": {k: str(v) for k, v in env.items()}}
        return options

    def batch(self, name: str) -> Batching:
        return self.batching[name]


def settings_from_dict(data: dict[str, Any]) -> ServeSettings:
    for section, known in (("deployments", DEPLOYMENTS), ("batching", STAGES)):
        value = data.get(section) or {}
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ConfigError(f"{section}: unknown deployment(s) {unknown}; known: {list(known)}")
    data = {k: v for k, v in data.items() if v is not None}
    given = {section: data.get(section) or {} for section in ("deployments", "batching")}
    for section, value in given.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a mapping, got {type(value).__name__}", key=section)
    data["deployments"] = {name: merge(Deployment, DEPLOYMENT_DEFAULTS[name], given["deployments"].get(name) or {},
                                       f"deployments.{name}") for name in DEPLOYMENTS}
    data["batching"] = {name: merge(Batching, BATCHING_DEFAULTS[name], given["batching"].get(name) or {},
                                    f"batching.{name}") for name in STAGES}
    settings = parse(ServeSettings, data)
    for name in settings.ingress.local:
        gpus = settings.deployments[name].ray_actor_options.num_gpus if name in settings.deployments else 0
        if gpus > 0:  # a stage answered in the ingress has no replica of its own to put on a GPU
            raise ConfigError(f"deployments.{name} asks for num_gpus {gpus:g}, but ingress.local answers {name} "
                              f"inside the ingress, which deploys no {name} replica: remove {name} from ingress.local "
                              f"to give it its own GPU replica (or give the ingress the GPU)")
    if settings.index.backend is not None:
        from cir_bench.index import INDEXES
        from cir_bench.registry import UnknownNameError

        try:
            INDEXES.get(settings.index.backend)
        except UnknownNameError as err:
            raise ConfigError(f"config key 'index.backend': {err}") from None
    return settings


def default_path() -> Path:
    return Path(__file__).with_name("config.yaml")


def load_serve_config(path: str | Path | None = None) -> ServeSettings:
    """serve/config.yaml (or ``path``): per-deployment replicas, ongoing limit and actor
    resources, batching, limits, the index backend, HTTP host and port."""
    path = Path(path) if path else default_path()
    try:
        return settings_from_dict(read_yaml(path, "serve config"))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
