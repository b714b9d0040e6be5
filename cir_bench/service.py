"""The conditional-search service core: request validation and one search per request,
independent of any web framework (the Ray Serve app wraps it).

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
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from cir_bench.data.base import BadImageError, decode_image
from cir_bench.data.queries import QuerySet
from cir_bench.data.transforms import build_transform
from cir_bench.methods.backward import BackwardSearch
from cir_bench.methods.student import Student
from cir_bench.models import BACKBONES
from cir_bench.train import resolve_input_size

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


class SearchService:
    """Holds the model, the embedding index and the students; answers one request at a time
    (``search``) or a list of them sharing one batched inversion (``search_many``)."""

    def __init__(self, prepared, cfg, students: Mapping[tuple[str, ...], Student] | None = None,
                 limits: ServiceLimits | None = None) -> None:
        self.prepared = prepared
        self.cfg = cfg
        self.dataset = prepared.dataset
        self.ctx = prepared.ctx
        self.students = dict(students or {})
        self.limits = limits or ServiceLimits()
        spec = BACKBONES.get(cfg.model.backbone)
        size = resolve_input_size(cfg.model, self.dataset)
        self.transform = build_transform(size, spec.mean, spec.std, square=self.dataset.square_resize)
        self._ids = [it.id for it in self.dataset.items]

    # -- metadata --------------------------------------------------------------------------
    def properties(self) -> dict[str, list[str]]:
        return {p.name: [c for c in p.classes if c not in p.excluded] for p in self.dataset.properties}

    def examples(self, n: int = 32, seed: int = 0) -> list[dict[str, Any]]:
        """Valid request bodies (database items, a condition on the first property that
        differs from the item's own label): what load tests send."""
        rng = np.random.default_rng([seed, 61])
        prop = self.dataset.properties[0]
        targets = [c for c, name in enumerate(prop.classes) if name not in prop.excluded]
        out = []
        for pos in rng.choice(self.ctx.database, size=min(n, len(self.ctx.database)), replace=False):
            own = self.dataset.items[pos].labels[prop.name]
            choice = [c for c in targets if c != own]
            out.append({"item_id": self.dataset.items[pos].id,
                        "conditions": {prop.name: prop.classes[choice[int(rng.integers(len(choice)))]]}, "k": 10})
        return out

    # -- validation ------------------------------------------------------------------------
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
        props, classes = [], []
        for prop, label in conditions.items():
            try:
                p = self.dataset.property(prop)
            except ValueError:
                raise RequestError("conditions", f"unknown property '{prop}'; valid: "
                                   f"{', '.join(self.properties())}") from None
            if not isinstance(label, str) or label not in p.classes or label in p.excluded:
                raise RequestError(f"conditions.{prop}", f"unknown label {label!r}; valid: "
                                   f"{', '.join(self.properties()[prop])}")
            props.append(prop)
            classes.append(p.index(label))
        if method == "student" and tuple(props) not in self.students:
            raise RequestError("method", f"no student for conditions on {props}; students exist for "
                               f"{[list(s) for s in self.students] or 'none'}")
        out = {"method": method, "k": k, "lambda": lam, "properties": props, "classes": classes}
        if has_id:
            if not isinstance(request["item_id"], str):
                raise RequestError("item_id", "must be a string")
            try:
                out["position"] = self.dataset.index_of(request["item_id"])
            except KeyError:
                raise RequestError("item_id", f"unknown item id {request['item_id']!r}") from None
        else:
            out["image_bytes"] = self._image_bytes(request["image"])
        return out

    def _image_bytes(self, value: Any) -> bytes:
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            if len(value) > self.limits.max_image_bytes * 4 // 3 + 4:
                raise RequestError("image", f"larger than {self.limits.max_image_bytes} bytes")
            try:
                data = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError("image", "not valid base64") from None
        else:
            raise RequestError("image", "must be a base64 string")
        if len(data) > self.limits.max_image_bytes:
            raise RequestError("image", f"larger than {self.limits.max_image_bytes} bytes")
        try:
            decode_image(data, "upload")
        except BadImageError as err:
            raise RequestError("image", str(err)) from None
        return data

    # -- search ----------------------------------------------------------------------------
    def search(self, request: Any) -> dict[str, Any]:
        return self.search_many([request])[0]

    def search_many(self, requests: list[Any]) -> list[dict[str, Any]]:
        """Validate each request, then run the valid ones; requests sharing a method and a
        property set share one batched search. Invalid ones come back as {"error": ...}."""
        t0 = time.perf_counter()
        parsed: list[dict | RequestError] = []
        for r in requests:
            try:
                parsed.append(self.parse(r))
            except RequestError as err:
                parsed.append(err)
        results: list[dict[str, Any] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(parsed):
            if isinstance(p, RequestError):
                results[i] = {"error": str(p), "field": p.field}
            else:
                groups.setdefault((p["method"], tuple(p["properties"]), p["lambda"]), []).append(i)
        for (method, props, lam), idx in groups.items():
            for i, res in zip(idx, self._run_group(method, list(props), lam, [parsed[i] for i in idx])):
                res["timing_ms"]["total"] = 1000 * (time.perf_counter() - t0)
                res["batch_size"] = len(idx)
                results[i] = res
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _embed_uploads(self, images: list[bytes]) -> torch.Tensor:
        model = self.prepared.trained.model
        x = torch.stack([self.transform(decode_image(b, "upload")) for b in images]).to(self.ctx.device)
        return model.embed(x).float().cpu()

    def _run_group(self, method: str, props: list[str], lam: float | None, reqs: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        z0 = torch.zeros(len(reqs), self.ctx.store.z.shape[1])
        uploads = [i for i, r in enumerate(reqs) if "image_bytes" in r]
        if uploads:
            z0[uploads] = self._embed_uploads([reqs[i]["image_bytes"] for i in uploads])
        for i, r in enumerate(reqs):
            if "position" in r:
                z0[i] = self.ctx.store.z[r["position"]]
        t_embed = time.perf_counter()
        cond = torch.as_tensor([r["classes"] for r in reqs], device=self.ctx.device)
        z0_dev = z0.to(self.ctx.device)
        extras: dict[str, np.ndarray] = {}
        if method == "teacher":
            bs = BackwardSearch(self.cfg.search.preset, lam=float(self.cfg.search.lam if lam is None else lam),
                                **self.cfg.search.overrides)
            inv = bs.invert(self.prepared.trained.model.heads, z0_dev, props, cond)
            z = inv.z
            extras = {"iterations": inv.iterations.cpu().numpy(), "satisfied": inv.satisfied.cpu().numpy()}
        elif method == "student":
            z = self.students[tuple(props)].to(self.ctx.device).eval()(z0_dev, cond)
        else:
            z = z0_dev
        t_search = time.perf_counter()
        exclude = np.array([r.get("position", -1) for r in reqs]) if self.ctx.self_match == "exclude" else None
        k_max = max(r["k"] for r in reqs)
        pos, scores = self.ctx.index.search(z, k_max, exclude=exclude)
        t_rank = time.perf_counter()
        out = []
        for i, r in enumerate(reqs):
            items = []
            for p, s in zip(pos[i, : r["k"]].tolist(), scores[i, : r["k"]].tolist()):
                item = self.dataset.items[p]
                items.append({"id": item.id, "score": s, "labels": {
                    prop.name: prop.classes[item.labels[prop.name]] for prop in self.dataset.properties}})
            res = {"method": method, "items": items, "timing_ms": {
                "embed": 1000 * (t_embed - t0), "search": 1000 * (t_search - t_embed),
                "rank": 1000 * (t_rank - t_search)}}
            if extras:
                res["iterations"] = int(extras["iterations"][i])
                res["satisfied"] = bool(extras["satisfied"][i])
            if method == "teacher":
                res["lambda"] = float(self.cfg.search.lam if lam is None else lam)
            out.append(res)
        return out


def queries_from_requests(service: SearchService, parsed: list[dict]) -> QuerySet:
    """The QuerySet equivalent of item-id requests (to compare with the offline methods)."""
    return QuerySet(parsed[0]["properties"], np.array([p["position"] for p in parsed]),
                    np.array([p["classes"] for p in parsed]))
