"""Ray Serve application: a FastAPI ingress composing its stages, each a deployment called
through a handle or (student and index by default, see ``ingress.local`` in serve/config.yaml)
answered inside the ingress itself, one hop and one batch wait fewer each.

    IngressDeployment  validates (cir_bench.serving.RequestParser), then answers through the
                       same orchestration as the in-process service
                       (cir_bench.serving.orchestrate.answer), with the stages:
                       z0 <- EncoderDeployment (uploads) or IndexDeployment.vector (item ids)
                       z  <- TeacherDeployment (Backward Search) | StudentDeployment | z0 (knn)
                       top-k <- IndexDeployment
    EncoderDeployment  image bytes -> z0                 @serve.batch
    TeacherDeployment  batched Backward Search inversion @serve.batch: concurrent requests share one
    StudentDeployment  distilled one-pass search         @serve.batch
    IndexDeployment    top-k over the embedding store    @serve.batch (exact torch, or FAISS)

Routes: POST /search (JSON, image as base64; or multipart/form-data with an ``image`` file part
and the other fields as form fields, ``conditions`` as a JSON object), GET /healthz,
/properties, /examples, /stats (batch sizes per deployment), OpenAPI at /docs.
Bad requests get a 4xx naming the field; the service keeps serving.
"""

import asyncio
import html
import json
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from cir_bench.serving.jobs import Ranked, RankJob, Searched, SearchJob
from cir_bench.serving.requests import SearchRequest
from cir_bench_serve.runtime import loopback_replica_grpc
from cir_bench_serve.settings import STAGES

loopback_replica_grpc()  # a local server's replicas listen on loopback only (serve/runtime.py)

api = FastAPI(title="cir-bench conditional search",
              description="Backward Search (teacher), its distilled student and kNN over one embedding store.",
              docs_url=None, redoc_url=None)  # /docs below: a page that needs no CDN

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


class HostCheck:
    """ASGI middleware: a server bound to loopback answers only requests whose Host header
    names loopback, so a web page elsewhere cannot read it through DNS rebinding (a name of
    its own resolving to 127.0.0.1). ``allowed``: the host names accepted, None for any (a
    server bound to every interface cannot know the names it is reached by)."""

    allowed: frozenset[str] | None = None  # set by the Ingress replica from the serve host

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and HostCheck.allowed is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name.lower() not in HostCheck.allowed:
                response = _error("host", f"{host!r} is not an address this server serves "
                                          f"({', '.join(sorted(HostCheck.allowed))})", 400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def for_host(bind: str) -> frozenset[str] | None:
        """The names a server bound to ``bind`` answers to."""
        if bind in ("", "0.0.0.0", "::"):
            return None
        return LOOPBACK_NAMES | {bind.lower()}


api.add_middleware(HostCheck)


_SEARCH_SCHEMA = SearchRequest.model_json_schema(by_alias=True)
_SEARCH_BODY = {"required": True, "content": {
    "application/json": {"schema": _SEARCH_SCHEMA},
    "multipart/form-data": {"schema": {**_SEARCH_SCHEMA, "properties": {
        **_SEARCH_SCHEMA["properties"], "image": {"type": "string", "format": "binary"},
        "conditions": {"type": "string", "description": "a JSON object {property: label}"}}}}}}


@api.get("/docs", response_class=HTMLResponse, include_in_schema=False)
async def docs_page() -> str:
    """The API described from its OpenAPI document, as plain HTML (no script, no CDN)."""
    spec = api.openapi()
    parts = [f"<h1>{html.escape(spec['info']['title'])}</h1><p>{html.escape(spec['info'].get('description', ''))}"
             "</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a></p>"]
    for path, ops in spec["paths"].items():
        for verb, op in ops.items():
            parts.append(f"<h2>{verb.upper()} {html.escape(path)}</h2><p>{html.escape(op.get('summary', ''))}</p>")
            if op.get("description"):
                parts.append(f"<p>{html.escape(op['description'])}</p>")
            for ctype, body in op.get("requestBody", {}).get("content", {}).items():
                parts.append(f"<h3>request body, {html.escape(ctype)}</h3><pre>"
                             f"{html.escape(json.dumps(body['schema'], indent=2))}</pre>")
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f4f4f4;padding:1em}"
    return f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(spec['info']['title'])}" \
           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"



class _Batched:
    """Shared by the four deployments: batch settings applied at start, batch sizes kept, and
    a worker thread for the heavy stages: with ray_serve.throughput_optimized user code runs
    on the replica's own event loop, and an inversion or an encoder pass there would hold up
    everything else the replica does (taking in the next requests, health checks)."""

    def _setup_batching(self, method, batching: dict[str, Any]) -> None:
        method.set_max_batch_size(int(batching.get("max_batch_size", 16)))
        method.set_batch_wait_timeout_s(float(batching.get("batch_wait_timeout_s", 0.005)))
        self.batch_sizes: list[int] = []
        self._worker = None

    async def _off_loop(self, fn, *args):
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=type(self).__name__.lower())
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _seen(self, n: int) -> None:
        self.batch_sizes.append(n)
        del self.batch_sizes[:-1000]

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes)}


@serve.deployment
class EncoderDeployment(_Batched):
    def __init__(self, bundle, batching: dict[str, Any]) -> None:
        from cir_bench.serving import EncoderStage

        self.encoder = EncoderStage(bundle, _replica_device())
        self._setup_batching(self.embed, batching)

    @serve.batch  # its size and wait: set from the serve config when the replica starts
    async def embed(self, images: list[bytes]) -> list[np.ndarray]:
        self._seen(len(images))
        return list(await self._off_loop(self.encoder.embed, images))


@serve.deployment
class TeacherDeployment(_Batched):
    def __init__(self, bundle, batching: dict[str, Any], compile: bool | str = False) -> None:
        from cir_bench.serving import TeacherStage

        self.teacher = TeacherStage(bundle, _replica_device(), int(batching.get("max_batch_size", 16)), compile)
        self._setup_batching(self.invert, batching)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), **self.teacher.info()}

    @serve.batch  # its size and wait: set from the serve config when the replica starts
    async def invert(self, jobs: list[SearchJob]) -> list[Searched]:
        self._seen(len(jobs))
        return await self._off_loop(self.teacher.invert_many, jobs)


@serve.deployment
class StudentDeployment(_Batched):
    def __init__(self, bundle, batching: dict[str, Any]) -> None:
        from cir_bench.serving import StudentStage

        self.student = StudentStage(bundle, _replica_device())
        self._setup_batching(self.transform, batching)

    @serve.batch  # its size and wait: set from the serve config when the replica starts
    async def transform(self, jobs: list[SearchJob]) -> list[Searched]:
        self._seen(len(jobs))
        return self.student.transform_many(jobs)


@serve.deployment
class IndexDeployment(_Batched):
    def __init__(self, bundle, batching: dict[str, Any]) -> None:
        from cir_bench.serving import IndexStage

        self.index = IndexStage(bundle, _replica_device())
        self._setup_batching(self.search, batching)

    def vector(self, position: int) -> np.ndarray:
        return self.index.vectors([position])[0]

    @serve.batch  # its size and wait: set from the serve config when the replica starts
    async def search(self, jobs: list[RankJob]) -> list[Ranked]:
        self._seen(len(jobs))
        return self.index.search_many(jobs)


def _replica_device() -> str:
    """CUDA when this replica was given a GPU (the bundle names the driver's device, not the replica's)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HandleStages:
    """``Stages`` (cir_bench.serving.orchestrate) through deployment handles: each item goes
    to its deployment on its own, and ``@serve.batch`` there batches concurrent requests.
    Stages in ``local`` (the student, the index; the teacher if asked) are answered in the
    ingress itself; ``local_invert`` is the ingress's own batched inversion of one job."""

    def __init__(self, handles: dict[str, DeploymentHandle], z0: np.ndarray | None,
                 local: dict[str, Any] | None = None, local_invert=None) -> None:
        self.handles, self.z0, self.local = handles, z0, local or {}
        self.local_invert = local_invert
        self.local_batches: dict[str, list[int]] = {name: [] for name in self.local}

    def _local(self, name: str, n: int):
        sizes = self.local_batches[name]
        sizes.append(n)
        del sizes[:-1000]
        return self.local[name]

    @staticmethod
    async def _each(method, items: list) -> list:
        async def one(item):
            return await method.remote(item)

        return list(await asyncio.gather(*[one(item) for item in items]))

    async def embed(self, images: list[bytes]) -> list[np.ndarray]:
        return await self._each(self.handles["encoder"].embed, images)

    async def vectors(self, positions: list[int]) -> list[np.ndarray]:
        if self.z0 is not None:  # small stores are kept in the ingress: no hop
            return [self.z0[p] for p in positions]
        return await self._each(self.handles["index"].vector, positions)

    async def invert(self, jobs: list[SearchJob]) -> list[Searched]:
        if self.local_invert is not None:
            return list(await asyncio.gather(*[self.local_invert(job) for job in jobs]))
        return await self._each(self.handles["teacher"].invert, jobs)

    async def transform(self, jobs: list[SearchJob]) -> list[Searched]:
        if "student" in self.local:  # under a millisecond: no hop, no batch wait; z stays on the
            # device when the index is here too (one wait for the device per request batch)
            return self._local("student", len(jobs)).transform_many(jobs, on_device="index" in self.local)
        return await self._each(self.handles["student"].transform, jobs)

    async def rank(self, jobs: list[RankJob]) -> list[Ranked]:
        if "index" in self.local:
            return self._local("index", len(jobs)).search_many(jobs)
        return await self._each(self.handles["index"].search, jobs)


WEB = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
       "style.css": "text/css; charset=utf-8"}


def _web_file(name: str) -> Response:
    """One of the page's files from serve/web/ (a fixed list: no path from the URL is opened)."""
    from pathlib import Path

    if name not in WEB:
        return _error("name", f"no such file '{name}'", 404)
    data = (Path(__file__).with_name("web") / name).read_bytes()
    return Response(data, media_type=WEB[name], headers={"Cache-Control": "no-cache"})


def _boundary(content_type: str) -> bytes | None:
    """The boundary parameter of a multipart Content-Type header."""
    for part in content_type.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


def _error(field: str, message: str, status: int = 422) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field}, status_code=status)


@serve.deployment
@serve.ingress(api)
class IngressDeployment:
    def __init__(self, bundle, encoder: DeploymentHandle, teacher: DeploymentHandle | None,
                 student: DeploymentHandle | None, index: DeploymentHandle | None, limits: dict[str, Any],
                 local: list[str] | None = None, teacher_batching: dict[str, Any] | None = None,
                 teacher_compile: bool | str = False, serve_host: str = "127.0.0.1") -> None:
        from cir_bench.serving import (IndexStage, ItemImages, RequestParser, ServiceLimits, StudentStage,
                                       TeacherStage)

        HostCheck.allowed = HostCheck.for_host(serve_host)
        limits = dict(limits)
        ingress_store_mb = float(limits.pop("ingress_store_mb", 256))
        self.catalog = bundle.catalog
        self.limits = ServiceLimits(**limits)
        self.parser = RequestParser(self.catalog, list(bundle.students), self.limits)
        self.handles = {name: h for name, h in (("encoder", encoder), ("teacher", teacher), ("student", student),
                                                 ("index", index)) if h is not None}
        local_stages: dict[str, Any] = {}
        if "student" in (local or []):
            local_stages["student"] = StudentStage(bundle, _replica_device())
        if "index" in (local or []):
            local_stages["index"] = IndexStage(bundle, _replica_device())
        local_invert = None
        if "teacher" in (local or []):
            # in the ingress, concurrent requests still share one inversion (@serve.batch on
            # this replica); it runs on one worker thread so that the ingress keeps answering
            from concurrent.futures import ThreadPoolExecutor

            batching = teacher_batching or {}
            local_stages["teacher"] = TeacherStage(bundle, _replica_device(), int(batching.get("max_batch_size", 16)),
                                                    teacher_compile)
            self._teacher_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
            self._invert_here.set_max_batch_size(int(batching.get("max_batch_size", 16)))
            self._invert_here.set_batch_wait_timeout_s(float(batching.get("batch_wait_timeout_s", 0.001)))
            local_invert = self._invert_here
        # a small store is also kept here, so an item-id query skips the hop to the Index for
        # its z0. Large stores stay in Index only.
        self.z0 = None
        if "index" in local_stages:
            self.z0 = local_stages["index"].z.numpy()
        elif ingress_store_mb > 0 and _store_fits(bundle, ingress_store_mb):
            from pathlib import Path

            from cir_bench.embed import EmbeddingStore

            self.z0 = EmbeddingStore.load(Path(bundle.store)).z.numpy()
        self.stages = HandleStages(self.handles, self.z0, local_stages, local_invert)
        self.images = ItemImages(bundle)
        self._filtered: tuple[dict[str, str], list[int]] | None = None
        # a JSON body holds the image as base64 (4/3 of its size) plus small fields
        self.max_body = self.limits.max_image_bytes * 4 // 3 + 64 * 1024

    @serve.batch  # its size and wait: set from the serve config when the replica starts
    async def _invert_here(self, jobs: list[SearchJob]) -> list[Searched]:
        teacher = self.stages._local("teacher", len(jobs))
        return await asyncio.get_running_loop().run_in_executor(self._teacher_thread, teacher.invert_many, jobs)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    # -- the search page (serve/web/: plain HTML, CSS and JS, no CDN, no build step) -------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> Response:
        return _web_file("index.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        return _web_file(name)

    @api.get("/items", summary="Items of the catalog, paged, filtered by labels (?style=hatched&offset=0&limit=24)")
    async def items(self, request: Request, offset: int = 0, limit: int = 24) -> JSONResponse:
        props = self.catalog.properties()
        wanted = {k: v for k, v in request.query_params.items() if k not in ("offset", "limit")}
        for name, label in wanted.items():
            if name not in props:
                return _error(name, f"unknown property; known: {', '.join(props)}", 422)
            if label not in props[name]:
                return _error(name, f"unknown label '{label}'", 422)
        if self._filtered is None or self._filtered[0] != wanted:
            match = [p for p in range(len(self.catalog.ids))
                     if all(self.catalog.item(p)["labels"][k] == v for k, v in wanted.items())]
            self._filtered = (wanted, match)
        match = self._filtered[1]
        offset, limit = max(0, int(offset)), max(1, min(int(limit), 200))
        return JSONResponse({"total": len(match), "offset": offset,
                             "items": [self.catalog.item(p) for p in match[offset:offset + limit]]})

    @api.get("/items/{item_id:path}/image", summary="An item's image as JPEG (?size=64|128|256|512)")
    async def item_image(self, item_id: str, size: int = 256) -> Response:
        from cir_bench.serving import ItemImages

        if size not in ItemImages.SIZES:
            return _error("size", f"one of {', '.join(map(str, ItemImages.SIZES))}", 422)
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, self.images.jpeg, item_id, size)
        except KeyError:
            return _error("item_id", f"unknown item '{item_id}'", 404)
        # the image of an id never changes while the dataset's fingerprint holds
        return Response(data, media_type="image/jpeg", headers={
            "Cache-Control": "public, max-age=86400, immutable",
            "ETag": f'"{self.images.spec.fingerprint if self.images.spec else ""}-{item_id}-{size}"'})

    @api.get("/properties")
    async def properties(self) -> dict[str, list[str]]:
        return self.catalog.properties()

    @api.get("/examples")
    async def examples(self, n: int = 32) -> list:
        from cir_bench.serving import example_requests

        return example_requests(self.catalog, max(1, min(int(n), 1000)))

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        out = {name: await self.handles[name].stats.remote() for name in STAGES if name in self.handles}
        for name, sizes in self.stages.local_batches.items():
            out[name] = {"batch_sizes": list(sizes), "in_ingress": True}
            if name == "teacher":
                out[name].update(self.stages.local[name].info())
        return out

    @api.post("/search", openapi_extra={"requestBody": _SEARCH_BODY},
              summary="Conditional search: the top-k items like the query, with the conditions",
              description="Answers ranked ids, scores, labels, the teacher's iterations and server-side "
                          "timing per stage (ms). Bad input: 4xx with the field named.")
    async def search(self, request: Request) -> JSONResponse:
        from cir_bench.serving import RequestError

        t0 = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and size.isascii() and size.isdigit() and int(size) > self.max_body:
            return _error("body", f"{size} bytes; the limit is {self.max_body}", 413)
        try:
            body = await self._body(request)
        except RequestError as err:
            status = err.status if err.status != 422 else (400 if err.field == "body" else 422)
            return _error(err.field, err.message, status)
        return await self._answer(body, t0)

    @api.get("/search", summary="Conditional search by item id, as a query string (no body to read)",
             description="`/search?item_id=<id>&<property>=<label>…&method=student&k=10[&lambda=…][&beta=…]`: "
                         "the same answer as POST /search with that JSON body; uploads need POST. Cheaper "
                         "through Serve: the replica does not fetch a body from the HTTP proxy.")
    async def search_by_query(self, request: Request) -> JSONResponse:
        from cir_bench.serving import RequestError, request_from_query

        t0 = time.perf_counter()
        try:
            body = request_from_query(request.query_params.multi_items())
        except RequestError as err:
            return _error(err.field, err.message, err.status)
        return await self._answer(body, t0)

    async def _answer(self, body: Any, t0: float) -> JSONResponse:
        from cir_bench.serving import RequestError
        from cir_bench.serving.orchestrate import answer

        try:
            if isinstance(body, dict) and body.get("image") is not None:
                # an upload's header check and decode off the event loop (four large uploads
                # held every other request up by up to 0.8 s)
                parsed = await asyncio.to_thread(self.parser.parse, body)
            else:
                parsed = self.parser.parse(body)
        except RequestError as err:
            return _error(err.field, err.message, err.status)
        (result,) = await answer([parsed], self.stages, self.catalog, t0)
        return JSONResponse(result)

    async def _read_limited(self, request: Request) -> bytes:
        """The raw body, refused as soon as it passes the limit while it streams in (a chunked
        body has no Content-Length to check up front)."""
        from cir_bench.serving import RequestError

        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise RequestError("body", f"more than {self.max_body} bytes (the limit)", 413)
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # Starlette's form() and json() read a body already received from here
        return body

    async def _body(self, request: Request) -> Any:
        from cir_bench.serving import RequestError, json_body, text_field

        raw = await self._read_limited(request)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            boundary = _boundary(request.headers.get("content-type", ""))
            if boundary and not raw.rstrip(b"\r\n").endswith(b"--" + boundary + b"--"):
                raise RequestError("body", "multipart/form-data cut short: no closing boundary (a truncated "
                                           "upload?)")
            try:
                form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
            except Exception as err:  # malformed multipart, too many parts
                raise RequestError("body", f"not valid multipart/form-data ({err})") from None
            body: dict[str, Any] = {}
            for key, value in form.multi_items():
                if hasattr(value, "read"):  # the file part
                    data = await value.read(self.limits.max_image_bytes + 1)
                    if len(data) > self.limits.max_image_bytes:
                        raise RequestError(key, f"larger than {self.limits.max_image_bytes} bytes", 413)
                    body[key] = data
                elif key == "conditions":
                    body[key] = json_body(value, "conditions")
                else:
                    body[key] = text_field(key, value)
            return body
        if ctype != "application/json" and not ctype.endswith("+json"):
            # a cross-site form can post text/plain without a preflight; JSON must say it is JSON
            raise RequestError("body", f"Content-Type must be application/json or multipart/form-data, "
                                       f"got {ctype or 'none'}", 415)
        return json_body(raw)

def build_app(bundle, settings=None):
    """The application for a ``ServeBundle`` (cir_bench.serving.build_bundle); ``settings``:
    the checked serve config (serve/settings.py): deployments, batching, limits."""
    from cir_bench_serve.settings import ServeSettings

    settings = settings or ServeSettings()

    def bind(cls, name: str, *more):
        return cls.options(**settings.deployment(name)).bind(bundle, settings.batch(name).model_dump(), *more)

    local = local_stages(bundle, settings)
    encoder = bind(EncoderDeployment, "encoder")
    teacher = None if "teacher" in local else bind(TeacherDeployment, "teacher", settings.teacher.compile)
    student = None if "student" in local else bind(StudentDeployment, "student")
    index = None if "index" in local else bind(IndexDeployment, "index")
    return IngressDeployment.options(**settings.deployment("ingress")).bind(
        bundle, encoder, teacher, student, index, settings.limits.model_dump(), local,
        settings.batch("teacher").model_dump(), settings.teacher.compile, settings.http.host)


def _store_fits(bundle, limit_mb: float) -> bool:
    import os

    return os.path.getsize(bundle.store) <= limit_mb * 2 ** 20


def local_stages(bundle, settings) -> list[str]:
    """The stages the ingress answers itself: ``ingress.local`` of the serve config, less the
    index when the store is larger than ``limits.ingress_store_mb`` (it then keeps its own
    deployment, where it may have a GPU)."""
    local = list(dict.fromkeys(settings.ingress.local))
    if "index" in local and not _store_fits(bundle, settings.limits.ingress_store_mb):
        local.remove("index")
    return local


def with_index(bundle, settings, chunk: int = 1024):
    """The bundle with the serve config's index backend, when the config names one."""
    import dataclasses

    if not settings.index.backend:
        return bundle
    return dataclasses.replace(bundle, index=settings.index.backend,
                               index_options={"chunk": chunk, **settings.index.options})
