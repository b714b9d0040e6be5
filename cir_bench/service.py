"""The conditional-search service, framework-free: request validation plus four components
that the Ray Serve app deploys separately (serve/app.py) and that ``SearchService`` composes
in-process (tests, micro-benchmarks). Both paths run the same component code, so an HTTP
answer equals the in-process one.

    ImageEncoder   uploaded image bytes -> z0                    (the model's backbone+encoder)
    TeacherSearch  (z0, condition) -> z by Backward Search        (the model's heads)
    StudentSearch  (z0, condition) -> z in one forward pass       (the distilled students)
    IndexSearch    z -> top-k item ids and scores; z0 of an item  (the embedding store)

Each component loads its own part from the files named by a ``ServeBundle`` (checkpoint,
embedding store, students), so a deployment holds only what it needs. On a multi-node
cluster the cache folder holding those files must be on a shared filesystem.

A request (JSON)::

    {"item_id": "00012-flat"}  or  {"image": "<base64 bytes>"},
    "conditions": {"style": "hatched"}, "method": "teacher" | "student" | "knn",
    "k": 10, "lambda": 0.005  (optional, teacher only)

Every malformed field raises ``RequestError`` naming the field, so the HTTP layer answers
4xx and keeps serving.
"""
from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cir_bench.data.base import BadImageError, decode_image
from cir_bench.data.queries import QuerySet
from cir_bench.data.transforms import build_transform

METHODS = ("teacher", "student", "knn")
FIELDS = {"item_id", "image", "conditions", "method", "k", "lambda"}


class RequestError(ValueError):
    """A bad request: ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class ServiceLimits:
    max_k: int = 100
    max_image_bytes: int = 5 * 1024 * 1024


# -- what the service knows of the dataset -----------------------------------------------------
@dataclass
class Catalog:
    """Item ids, their labels and the properties: all that validation and answers need of the
    dataset (small and picklable; no images)."""

    ids: list[str]
    labels: dict[str, np.ndarray]  # property -> class id per item
    classes: dict[str, list[str]]  # property -> class names (index = class id)
    excluded: dict[str, list[str]]  # classes that are not valid conditions
    database: np.ndarray  # item positions searched
    self_match: str = "exclude"

    def __post_init__(self) -> None:
        self._index = {item_id: i for i, item_id in enumerate(self.ids)}

    @classmethod
    def from_dataset(cls, dataset, database: np.ndarray, self_match: str) -> "Catalog":
        return cls([it.id for it in dataset.items], {p.name: dataset.labels(p.name) for p in dataset.properties},
                   {p.name: list(p.classes) for p in dataset.properties},
                   {p.name: list(p.excluded) for p in dataset.properties}, np.asarray(database), self_match)

    def properties(self) -> dict[str, list[str]]:
        return {name: [c for c in classes if c not in self.excluded[name]] for name, classes in self.classes.items()}

    def position(self, item_id: str) -> int:
        return self._index[item_id]

    def item(self, position: int) -> dict[str, Any]:
        return {"id": self.ids[position],
                "labels": {name: self.classes[name][int(lab[position])] for name, lab in self.labels.items()}}


@dataclass
class ServeBundle:
    """The files and settings the components are built from (what ``build_bundle`` writes)."""

    catalog: Catalog
    checkpoint: str
    store: str
    students: dict[tuple[str, ...], str]
    transform: dict[str, Any]  # build_transform kwargs
    search: dict[str, Any]  # {"preset", "lam", "overrides"}
    index: str = "exact"
    index_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"


def build_bundle(cfg, progress: bool = False, dataset=None) -> ServeBundle:
    """Train or load everything a run config names (the cache makes that a load), distil or
    load one student per query set, and return the files the components load."""
    from cir_bench.models import BACKBONES
    from cir_bench.pipeline import cache_dir_for, distil_or_load, prepare
    from cir_bench.store import store_path
    from cir_bench.train import resolve_input_size

    prepared = prepare(cfg, progress=progress, dataset=dataset)
    ds = prepared.dataset
    students = {}
    for props in cfg.queries.sets or ds.default_query_sets():
        _, info = distil_or_load(cfg, ds, prepared.trained, prepared.store, list(props), prepared.device,
                                 progress=progress)
        students[tuple(props)] = info["path"]
    spec = BACKBONES.get(cfg.model.backbone)
    return ServeBundle(
        catalog=Catalog.from_dataset(ds, prepared.ctx.database, cfg.eval.self_match),
        checkpoint=str(prepared.trained.checkpoint),
        store=str(store_path(cache_dir_for(cfg), prepared.store.fingerprint)),
        students=students,
        transform={"input_size": resolve_input_size(cfg.model, ds), "mean": list(spec.mean), "std": list(spec.std),
                   "square": ds.square_resize},
        search={"preset": cfg.search.preset, "lam": float(cfg.search.lam), "overrides": dict(cfg.search.overrides)},
        index=cfg.eval.index, index_options={"chunk": cfg.eval.search_batch, **cfg.eval.index_options},
        device=str(prepared.device),
    )


# -- the four components ----------------------------------------------------------------------
class ImageEncoder:
    """Uploaded image bytes -> z0 (eval mode, one batch per call)."""

    def __init__(self, bundle: ServeBundle, device: str | None = None) -> None:
        from cir_bench.models import load_checkpoint

        self.device = torch.device(device or bundle.device)
        self.model, _ = load_checkpoint(bundle.checkpoint, self.device)
        self.transform = build_transform(**bundle.transform)

    @torch.no_grad()
    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        x = torch.stack([self.transform(decode_image(b, "upload")) for b in images]).to(self.device)
        return self.model.embed(x).float().cpu().numpy()


def _groups(jobs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(tuple(tuple(job[k]) if isinstance(job[k], list) else job[k] for k in keys), []).append(i)
    return groups


class TeacherSearch:
    """(z0, condition) -> z by Backward Search. ``invert_many`` runs one batched inversion per
    (property set, λ) group: concurrent requests share it."""

    def __init__(self, bundle: ServeBundle, device: str | None = None) -> None:
        from cir_bench.models import load_checkpoint

        self.device = torch.device(device or bundle.device)
        model, _ = load_checkpoint(bundle.checkpoint, self.device)
        for p in model.parameters():
            p.requires_grad_(False)  # only z is differentiated
        self.heads = model.heads
        self.settings = bundle.search

    def invert_many(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """jobs: {"z0": (d,) array, "properties": [...], "classes": [...], "lambda": float | None}."""
        from cir_bench.methods.backward import BackwardSearch

        out: list[dict[str, Any]] = [{}] * len(jobs)
        for (props, lam), idx in _groups(jobs, ("properties", "lambda")).items():
            lam = float(self.settings["lam"] if lam is None else lam)
            bs = BackwardSearch(self.settings["preset"], lam=lam, **self.settings["overrides"])
            z0 = torch.as_tensor(np.stack([jobs[i]["z0"] for i in idx]), dtype=torch.float32, device=self.device)
            cond = torch.as_tensor([jobs[i]["classes"] for i in idx], device=self.device)
            inv = bs.invert(self.heads, z0, list(props), cond)
            z, its, sat = inv.z.float().cpu().numpy(), inv.iterations.cpu().numpy(), inv.satisfied.cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = {"z": z[row], "iterations": int(its[row]), "satisfied": bool(sat[row]), "lambda": lam,
                          "batch_size": len(idx)}
        return out


class StudentSearch:
    """(z0, condition) -> z with the distilled student of the condition's property set."""

    def __init__(self, bundle: ServeBundle, device: str | None = None) -> None:
        from cir_bench.methods.student import Student

        self.device = torch.device(device or bundle.device)
        self.students = {tuple(props): Student.load(path, self.device).eval()
                         for props, path in bundle.students.items()}

    @torch.no_grad()
    def transform_many(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{}] * len(jobs)
        for (props,), idx in _groups(jobs, ("properties",)).items():
            z0 = torch.as_tensor(np.stack([jobs[i]["z0"] for i in idx]), dtype=torch.float32, device=self.device)
            cond = torch.as_tensor([jobs[i]["classes"] for i in idx], device=self.device)
            z = self.students[tuple(props)](z0, cond).float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = {"z": z[row], "batch_size": len(idx)}
        return out


class IndexSearch:
    """Top-k over the database rows of the embedding store (backend from cir_bench.indexes)."""

    def __init__(self, bundle: ServeBundle, device: str | None = None) -> None:
        from cir_bench.indexes import build_index
        from cir_bench.store import EmbeddingStore

        store = EmbeddingStore.load(Path(bundle.store))
        if store.ids != bundle.catalog.ids:
            raise ValueError(f"{bundle.store}: its item ids do not match the dataset's")
        self.z = store.z
        device = torch.device(device or bundle.device)
        self.index = build_index(bundle.index, store.z, bundle.catalog.database, device, **bundle.index_options)

    def vectors(self, positions: Sequence[int]) -> np.ndarray:
        return self.z[torch.as_tensor(list(positions), dtype=torch.long)].numpy()

    def search_many(self, jobs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """jobs: {"z": (d,), "k": int, "exclude": item position or -1}; one top-k for all."""
        z = torch.as_tensor(np.stack([j["z"] for j in jobs]), dtype=torch.float32)
        exclude = np.array([j.get("exclude", -1) for j in jobs])
        pos, scores = self.index.search(z, max(j["k"] for j in jobs),
                                        exclude=exclude if (exclude >= 0).any() else None)
        return [{"positions": pos[i, : j["k"]].tolist(), "scores": scores[i, : j["k"]].tolist()}
                for i, j in enumerate(jobs)]


# -- validation -------------------------------------------------------------------------------
class RequestParser:
    """Checks a request body against the catalog; returns the parsed request or raises
    ``RequestError`` naming the field."""

    def __init__(self, catalog: Catalog, student_sets: Sequence[tuple[str, ...]], limits: ServiceLimits) -> None:
        self.catalog = catalog
        self.student_sets = [tuple(s) for s in student_sets]
        self.limits = limits

    def parse(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise RequestError("body", f"expected a JSON object, got {type(request).__name__}")
        unknown = set(request) - FIELDS
        if unknown:
            raise RequestError(sorted(unknown)[0], f"unknown field; allowed: {', '.join(sorted(FIELDS))}")
        has_id, has_img = request.get("item_id") is not None, request.get("image") is not None
        if has_id == has_img:
            raise RequestError("item_id", "give exactly one of item_id or image")
        method = request.get("method", "teacher")
        if method not in METHODS:
            raise RequestError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
        k = request.get("k", 10)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.limits.max_k:
            raise RequestError("k", f"must be an integer in 1..{self.limits.max_k}, got {k!r}")
        lam = request.get("lambda")
        if lam is not None and (not isinstance(lam, (int, float)) or isinstance(lam, bool) or lam < 0
                                or not np.isfinite(lam)):
            raise RequestError("lambda", f"must be a number >= 0, got {lam!r}")
        conditions = request.get("conditions")
        if not isinstance(conditions, dict) or not conditions:
            raise RequestError("conditions", "must be a non-empty object {property: label}")
        valid = self.catalog.properties()
        props, classes = [], []
        for prop, label in conditions.items():
            if prop not in valid:
                raise RequestError("conditions", f"unknown property '{prop}'; valid: {', '.join(valid)}")
            if not isinstance(label, str) or label not in valid[prop]:
                raise RequestError(f"conditions.{prop}", f"unknown label {label!r}; valid: {', '.join(valid[prop])}")
            props.append(prop)
            classes.append(self.catalog.classes[prop].index(label))
        if method == "student" and tuple(props) not in self.student_sets:
            raise RequestError("method", f"no student for conditions on {props}; students exist for "
                               f"{[list(s) for s in self.student_sets] or 'none'}")
        out = {"method": method, "k": k, "lambda": None if lam is None else float(lam), "properties": props,
               "classes": classes}
        if has_id:
            if not isinstance(request["item_id"], str):
                raise RequestError("item_id", "must be a string")
            try:
                out["position"] = self.catalog.position(request["item_id"])
            except KeyError:
                raise RequestError("item_id", f"unknown item id {request['item_id']!r}") from None
        else:
            out["image_bytes"] = self.image_bytes(request["image"])
        return out

    def image_bytes(self, value: Any) -> bytes:
        """Raw bytes (multipart) or base64 (JSON) -> checked, decodable image bytes."""
        limit = self.limits.max_image_bytes
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            if len(value) > limit * 4 // 3 + 4:
                raise RequestError("image", f"larger than {limit} bytes")
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError("image", "not valid base64") from None
        else:
            raise RequestError("image", "must be a base64 string")
        if len(data) > limit:
            raise RequestError("image", f"larger than {limit} bytes")
        try:
            decode_image(data, "upload")
        except BadImageError as err:
            raise RequestError("image", str(err)) from None
        return data


def format_answer(catalog: Catalog, parsed: Mapping[str, Any], ranked: Mapping[str, Any],
                  searched: Mapping[str, Any]) -> dict[str, Any]:
    items = []
    for p, s in zip(ranked["positions"], ranked["scores"]):
        item = catalog.item(p)
        items.append({"id": item["id"], "score": s, "labels": item["labels"]})
    res: dict[str, Any] = {"method": parsed["method"], "items": items, "batch_size": searched.get("batch_size", 1)}
    if parsed["method"] == "teacher":
        res.update(iterations=searched["iterations"], satisfied=searched["satisfied"], **{"lambda": searched["lambda"]})
    return res


def search_job(parsed: Mapping[str, Any], z0: np.ndarray) -> dict[str, Any]:
    return {"z0": z0, "properties": list(parsed["properties"]), "classes": list(parsed["classes"]),
            "lambda": parsed["lambda"]}


def rank_job(catalog: Catalog, parsed: Mapping[str, Any], z: np.ndarray) -> dict[str, Any]:
    exclude = parsed.get("position", -1) if catalog.self_match == "exclude" else -1
    return {"z": z, "k": parsed["k"], "exclude": exclude}


# -- in-process composition -------------------------------------------------------------------
class SearchService:
    """The four components composed in one process: ``search`` answers one request,
    ``search_many`` a list sharing batched work, as the Serve deployments do."""

    def __init__(self, bundle: ServeBundle, limits: ServiceLimits | None = None, device: str | None = None) -> None:
        self.bundle = bundle
        self.catalog = bundle.catalog
        self.limits = limits or ServiceLimits()
        self.parser = RequestParser(self.catalog, list(bundle.students), self.limits)
        self.encoder = ImageEncoder(bundle, device)
        self.teacher = TeacherSearch(bundle, device)
        self.student = StudentSearch(bundle, device)
        self.index = IndexSearch(bundle, device)

    def properties(self) -> dict[str, list[str]]:
        return self.catalog.properties()

    def examples(self, n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
        return example_requests(self.catalog, n, seed)

    def search(self, request: Any) -> dict[str, Any]:
        return self.search_many([request])[0]

    def search_many(self, requests: Sequence[Any]) -> list[dict[str, Any]]:
        """Validate each request, then run the valid ones; requests sharing a method and a
        property set share one batched search. Invalid ones come back as {"error": ...}."""
        t0 = time.perf_counter()
        results: list[dict[str, Any]] = [{} for _ in requests]
        parsed: dict[int, dict[str, Any]] = {}
        for i, r in enumerate(requests):
            try:
                parsed[i] = self.parser.parse(r)
            except RequestError as err:
                results[i] = {"error": str(err), "field": err.field}
        order = list(parsed)
        z0 = np.zeros((len(order), self.index.z.shape[1]), dtype=np.float32)
        uploads = [n for n, i in enumerate(order) if "image_bytes" in parsed[i]]
        if uploads:
            z0[uploads] = self.encoder.embed([parsed[order[n]]["image_bytes"] for n in uploads])
        items = [n for n, i in enumerate(order) if "position" in parsed[i]]
        if items:
            z0[items] = self.index.vectors([parsed[order[n]]["position"] for n in items])
        t_embed = time.perf_counter()
        searched: dict[int, dict[str, Any]] = {}
        for method in METHODS:
            idx = [n for n, i in enumerate(order) if parsed[i]["method"] == method]
            if not idx:
                continue
            jobs = [search_job(parsed[order[n]], z0[n]) for n in idx]
            if method == "teacher":
                answers = self.teacher.invert_many(jobs)
            elif method == "student":
                answers = self.student.transform_many(jobs)
            else:
                answers = [{"z": j["z0"], "batch_size": len(jobs)} for j in jobs]
            searched.update(zip(idx, answers))
        t_search = time.perf_counter()
        ranked = self.index.search_many([rank_job(self.catalog, parsed[i], searched[n]["z"])
                                         for n, i in enumerate(order)]) if order else []
        t_rank = time.perf_counter()
        for n, i in enumerate(order):
            res = format_answer(self.catalog, parsed[i], ranked[n], searched[n])
            res["timing_ms"] = {"embed": 1000 * (t_embed - t0), "search": 1000 * (t_search - t_embed),
                                "rank": 1000 * (t_rank - t_search), "total": 1000 * (time.perf_counter() - t0)}
            results[i] = res
        return results


def example_requests(catalog: Catalog, n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Valid request bodies (database items, a condition on the first property that differs
    from the item's own label): what load tests send."""
    rng = np.random.default_rng([seed, 61])
    prop = next(iter(catalog.classes))
    targets = [c for c, name in enumerate(catalog.classes[prop]) if name not in catalog.excluded[prop]]
    out = []
    for pos in rng.choice(catalog.database, size=min(n, len(catalog.database)), replace=False):
        own = int(catalog.labels[prop][pos])
        choice = [c for c in targets if c != own]
        out.append({"item_id": catalog.ids[pos],
                    "conditions": {prop: catalog.classes[prop][choice[int(rng.integers(len(choice)))]]}, "k": 10})
    return out


def queries_from_requests(parsed: Sequence[Mapping[str, Any]]) -> QuerySet:
    """The QuerySet equivalent of item-id requests (to compare with the offline methods)."""
    return QuerySet(list(parsed[0]["properties"]), np.array([p["position"] for p in parsed]),
                    np.array([p["classes"] for p in parsed]))
