"""Ray Serve application: a FastAPI ingress composing four deployments through handles.

    Ingress  validates (cir_bench.service.RequestParser), then per request:
             z0 <- Encoder (uploads) or Index.vectors (item ids)
             z  <- Teacher (Backward Search) | Student | z0 (knn)
             top-k <- Index
    Encoder  image bytes -> z0                 @serve.batch
    Teacher  batched Backward Search inversion @serve.batch: concurrent requests share one
    Student  distilled one-pass search         @serve.batch
    Index    top-k over the embedding store    @serve.batch (exact torch, or FAISS)

Routes: POST /search (JSON, image as base64; or multipart/form-data with an ``image`` file part
and the other fields as form fields, ``conditions`` as a JSON object), GET /healthz,
/properties, /examples, /stats (batch sizes per deployment), OpenAPI at /docs.
Bad requests get a 4xx naming the field; the service keeps serving.
"""

import json
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

api = FastAPI(title="cir-bench conditional search",
              description="Backward Search (teacher), its distilled student and kNN over one embedding store.")

STAGES = ("encoder", "teacher", "student", "index")


class _Batched:
    """Shared by the four deployments: batch settings applied at start, batch sizes kept."""

    def _setup_batching(self, method, batching: dict[str, Any]) -> None:
        method.set_max_batch_size(int(batching.get("max_batch_size", 16)))
        method.set_batch_wait_timeout_s(float(batching.get("batch_wait_timeout_s", 0.005)))
        self.batch_sizes: list[int] = []

    def _seen(self, n: int) -> None:
        self.batch_sizes.append(n)
        del self.batch_sizes[:-1000]

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes)}


@serve.deployment
class Encoder(_Batched):
    def __init__(self, bundle, batching: dict[str, Any]) -> None:
        from cir_bench.service import ImageEncoder

        self.encoder = ImageEncoder(bundle, _device(bundle))
        self._setup_batching(self.embed, batching)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, images: list[bytes]) -> list[np.ndarray]:
        self._seen(len(images))
        return list(self.encoder.embed(images))


@serve.deployment
class Teacher(_Batched):
    def __init__(self, bundle, batching: dict[str, Any]) -> None:
        from cir_bench.service import TeacherSearch

        self.teacher = TeacherSearch(bundle, _device(bundle))
        self._setup_batching(self.invert, batching)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def invert(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._seen(len(jobs))
        return self.teacher.invert_many(jobs)


@serve.deployment
class Student(_Batched):
    def __init__(self, bundle, batching: dict[str, Any]) -> None:
        from cir_bench.service import StudentSearch

        self.student = StudentSearch(bundle, _device(bundle))
        self._setup_batching(self.transform, batching)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def transform(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._seen(len(jobs))
        return self.student.transform_many(jobs)


@serve.deployment
class Index(_Batched):
    def __init__(self, bundle, batching: dict[str, Any]) -> None:
        from cir_bench.service import IndexSearch

        self.index = IndexSearch(bundle, _device(bundle))
        self._setup_batching(self.search, batching)

    def vector(self, position: int) -> np.ndarray:
        return self.index.vectors([position])[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def search(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._seen(len(jobs))
        return self.index.search_many(jobs)


def _device(bundle) -> str:
    """The bundle was built where the driver ran; a replica uses CUDA only if it got a GPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _error(field: str, message: str, status: int = 422) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field}, status_code=status)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, bundle, encoder: DeploymentHandle, teacher: DeploymentHandle, student: DeploymentHandle,
                 index: DeploymentHandle, limits: dict[str, Any]) -> None:
        from cir_bench.service import RequestParser, ServiceLimits

        limits = dict(limits)
        ingress_store_mb = float(limits.pop("ingress_store_mb", 256))
        self.catalog = bundle.catalog
        self.limits = ServiceLimits(**limits)
        self.parser = RequestParser(self.catalog, list(bundle.students), self.limits)
        self.handles = {"encoder": encoder, "teacher": teacher, "student": student, "index": index}
        # a small store is also kept here, so an item-id query skips the hop to the Index for
        # its z0 (one hop of three; measured in the issue note). Large stores stay in Index only.
        self.z0 = None
        if ingress_store_mb > 0:
            import os

            if os.path.getsize(bundle.store) <= ingress_store_mb * 2 ** 20:
                from pathlib import Path

                from cir_bench.store import EmbeddingStore

                self.z0 = EmbeddingStore.load(Path(bundle.store)).z.numpy()
        # a JSON body holds the image as base64 (4/3 of its size) plus small fields
        self.max_body = self.limits.max_image_bytes * 4 // 3 + 64 * 1024

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/properties")
    async def properties(self) -> dict[str, list[str]]:
        return self.catalog.properties()

    @api.get("/examples")
    async def examples(self, n: int = 32) -> list:
        from cir_bench.service import example_requests

        return example_requests(self.catalog, max(1, min(int(n), 1000)))

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        return {name: await self.handles[name].stats.remote() for name in STAGES}

    @api.post("/search")
    async def search(self, request: Request) -> JSONResponse:
        from cir_bench.service import RequestError

        t0 = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            return _error("body", f"{size} bytes; the limit is {self.max_body}", 413)
        try:
            body = await self._body(request)
        except RequestError as err:
            return _error(err.field, str(err).split(": ", 1)[1], 400 if err.field == "body" else 422)
        try:
            parsed = self.parser.parse(body)
        except RequestError as err:
            return _error(err.field, str(err).split(": ", 1)[1])
        return JSONResponse(await self._run(parsed, t0))

    async def _body(self, request: Request) -> Any:
        from cir_bench.service import RequestError

        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
            except Exception as err:  # malformed multipart, too many parts
                raise RequestError("body", f"not valid multipart/form-data ({err})") from None
            body: dict[str, Any] = {}
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # the file part
                    data = await value.read(self.limits.max_image_bytes + 1)
                    if len(data) > self.limits.max_image_bytes:
                        raise RequestError(key, f"larger than {self.limits.max_image_bytes} bytes")
                    body[key] = data
                elif key == "conditions":
                    try:
                        body[key] = json.loads(value)
                    except ValueError:
                        raise RequestError("conditions", "form field must hold a JSON object") from None
                elif key in ("k",):
                    body[key] = int(value) if value.strip().lstrip("-").isdigit() else value
                elif key == "lambda":
                    try:
                        body[key] = float(value)
                    except ValueError:
                        body[key] = value
                else:
                    body[key] = value
            return body
        try:
            return await request.json()
        except Exception:
            raise RequestError("body", "not valid JSON") from None

    async def _run(self, parsed: dict[str, Any], t0: float) -> dict[str, Any]:
        from cir_bench.service import format_answer, rank_job, search_job

        t_parse = time.perf_counter()
        if "image_bytes" in parsed:
            z0 = await self.handles["encoder"].embed.remote(parsed["image_bytes"])
        elif self.z0 is not None:
            z0 = self.z0[parsed["position"]]
        else:
            z0 = await self.handles["index"].vector.remote(parsed["position"])
        t_embed = time.perf_counter()
        method = parsed["method"]
        if method == "teacher":
            searched = await self.handles["teacher"].invert.remote(search_job(parsed, z0))
        elif method == "student":
            searched = await self.handles["student"].transform.remote(search_job(parsed, z0))
        else:
            searched = {"z": z0, "batch_size": 1}
        t_search = time.perf_counter()
        ranked = await self.handles["index"].search.remote(rank_job(self.catalog, parsed, searched["z"]))
        t_rank = time.perf_counter()
        res = format_answer(self.catalog, parsed, ranked, searched)
        res["timing_ms"] = {"parse": 1000 * (t_parse - t0), "embed": 1000 * (t_embed - t_parse),
                            "search": 1000 * (t_search - t_embed), "rank": 1000 * (t_rank - t_search),
                            "total": 1000 * (time.perf_counter() - t0)}
        return res


DEFAULT_DEPLOYMENT = {"num_replicas": 1, "max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.25}}


def build_app(bundle, settings: dict[str, Any] | None = None):
    """The application for a ``ServeBundle`` (cir_bench.service.build_bundle); ``settings`` is
    the parsed serve config (serve/config.yaml): deployments, batching, limits."""
    settings = settings or {}
    deployments = settings.get("deployments", {})
    batching = settings.get("batching", {})

    def options(name: str, default: dict[str, Any]) -> dict[str, Any]:
        return {**default, **deployments.get(name, {})}

    encoder = Encoder.options(**options("encoder", DEFAULT_DEPLOYMENT)).bind(bundle, batching.get("encoder", {}))
    teacher = Teacher.options(**options("teacher", DEFAULT_DEPLOYMENT)).bind(bundle, batching.get("teacher", {}))
    student = Student.options(**options("student", DEFAULT_DEPLOYMENT)).bind(bundle, batching.get("student", {}))
    index = Index.options(**options("index", DEFAULT_DEPLOYMENT)).bind(bundle, batching.get("index", {}))
    # the ingress only awaits the others: let it hold many requests so that they can meet in
    # one batch downstream (Serve's default of 5 ongoing requests per replica caps the batch)
    ingress = options("ingress", {"max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.25}})
    return Ingress.options(**ingress).bind(bundle, encoder, teacher, student, index, settings.get("limits", {}))


def with_index(bundle, settings: dict[str, Any], chunk: int = 1024):
    """The bundle with the serve config's index backend, when the config names one."""
    import dataclasses

    index = settings.get("index") or {}
    if not index.get("backend"):
        return bundle
    from cir_bench.indexes import INDEXES

    INDEXES.get(index["backend"])  # unknown backend: fail before Serve starts
    return dataclasses.replace(bundle, index=index["backend"],
                               index_options={"chunk": chunk, **(index.get("options") or {})})


SECTIONS = {"deployments", "batching", "limits", "index", "http"}


def load_serve_config(path: str | None) -> dict[str, Any]:
    """serve/config.yaml: per-deployment replicas, ongoing limit and actor resources, batching,
    limits, the index backend, HTTP host and port."""
    from pathlib import Path

    import yaml

    path = path or str(Path(__file__).with_name("config.yaml"))
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or set(data) - SECTIONS:
        raise ValueError(f"{path}: unknown section(s) {sorted(set(data) - SECTIONS) if isinstance(data, dict) else data}; "
                         f"known: {sorted(SECTIONS)}")
    for section in ("deployments", "batching"):
        unknown = set(data.get(section) or {}) - set(STAGES) - ({"ingress"} if section == "deployments" else set())
        if unknown:
            raise ValueError(f"{path}: {section}: unknown deployment(s) {sorted(unknown)}; known: "
                             f"{sorted(STAGES) + (['ingress'] if section == 'deployments' else [])}")
    return data
