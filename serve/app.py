"""Ray Serve application: a FastAPI ingress in front of a batched search deployment.

    POST /search      {"item_id" | "image", "conditions", "method", "k", "lambda"}
    GET  /healthz     liveness
    GET  /properties  the properties and the labels a condition may use
    GET  /stats       batch sizes seen by the search deployment (to check batching)

Concurrent requests reaching the search deployment within ``batch_wait_timeout_s`` share
one ``search_many`` call (``@serve.batch``): one batched Backward Search inversion per
group. Bad requests get a 4xx naming the field; the service keeps serving.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

api = FastAPI(title="cir-bench conditional search")


@serve.deployment
class Searcher:
    """Holds the model, the index and the students (one copy per replica)."""

    def __init__(self, config: dict, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005,
                 max_image_bytes: int = 5 * 1024 * 1024) -> None:
        from cir_bench.config import config_from_dict
        from cir_bench.pipeline import distil_or_load, prepare
        from cir_bench.service import SearchService, ServiceLimits

        cfg = config_from_dict(config)
        prepared = prepare(cfg, progress=False)
        students = {}
        for props in cfg.queries.sets or prepared.dataset.default_query_sets():
            student, _ = distil_or_load(cfg, prepared.dataset, prepared.trained, prepared.store, list(props),
                                        prepared.device, progress=False)
            students[tuple(props)] = student
        self.service = SearchService(prepared, cfg, students, ServiceLimits(max_image_bytes=max_image_bytes))
        self.search.set_max_batch_size(max_batch_size)
        self.search.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def search(self, requests: list[Any]) -> list[dict[str, Any]]:
        self.batch_sizes.append(len(requests))
        return self.service.search_many(requests)

    def properties(self) -> dict[str, list[str]]:
        return self.service.properties()

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": self.batch_sizes[-1000:]}

    def examples(self, n: int) -> list[dict[str, Any]]:
        return self.service.examples(n)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, searcher: DeploymentHandle) -> None:
        self.searcher = searcher

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/properties")
    async def properties(self) -> dict[str, list[str]]:
        return await self.searcher.properties.remote()

    @api.get("/examples")
    async def examples(self, n: int = 32) -> list:
        return await self.searcher.examples.remote(max(1, min(int(n), 1000)))

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        return await self.searcher.stats.remote()

    @api.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except Exception:
            return JSONResponse({"error": "body: not valid JSON", "field": "body"}, status_code=400)
        result = await self.searcher.search.remote(body)
        if "error" in result:
            return JSONResponse(result, status_code=422)
        return JSONResponse(result)


def build_app(config: dict, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005,
              max_image_bytes: int = 5 * 1024 * 1024, searcher_options: dict | None = None,
              ingress_options: dict | None = None):
    """``config``: a cir-bench run config as a dict (``RunConfig.to_dict()``); the search
    deployment trains or loads the model it names (the cache makes that a load)."""
    searcher = Searcher.options(**(searcher_options or {})).bind(config, max_batch_size, batch_wait_timeout_s,
                                                                 max_image_bytes)
    # the ingress only awaits the searcher: let it hold many requests so that they can meet
    # in one batch (Serve's default of 5 ongoing requests per replica would cap the batch)
    return Ingress.options(**{"max_ongoing_requests": 256, **(ingress_options or {})}).bind(searcher)


def load_serve_config(path: str | None) -> dict:
    """serve/config.yaml: replicas, ongoing-request limit, actor resources, batching, limits, HTTP."""
    from pathlib import Path

    import yaml

    path = path or str(Path(__file__).with_name("config.yaml"))
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    known = {"searcher", "ingress", "batching", "limits", "http"}
    if set(data) - known:
        raise ValueError(f"{path}: unknown section(s) {sorted(set(data) - known)}; known: {sorted(known)}")
    return data
