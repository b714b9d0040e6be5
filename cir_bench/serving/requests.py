"""Requests to the search service: what the service knows of the dataset (``Catalog``), the
limits, validation (``RequestParser``: every malformed field raises ``RequestError`` naming
the field, so the HTTP layer answers 4xx and keeps serving) and example requests.

A request (JSON)::

    {"item_id": "00012-flat"}  or  {"image": "<base64 bytes>"},
    "conditions": {"style": "hatched"}, "method": "teacher" | "student" | "knn" | "filtered_knn" | "soft_filtered_knn",
    "k": 10, "lambda": 0.005  (optional, teacher only), "beta": 0.1 (optional, soft_filtered_knn only)
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
import typing
from typing import Annotated, Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema

from cir_bench.config import Section
from cir_bench.data.base import BadImageError, ImageTooLargeError, decode_image

# filtered_knn / soft_filtered_knn: the offline methods of the same names (cir_bench.search),
# the heads' predicted labels / log-probabilities of the database computed once by the index
Method = Literal["teacher", "student", "knn", "filtered_knn", "soft_filtered_knn"]
METHODS: tuple[str, ...] = typing.get_args(Method)
DEFAULT_BETA = 0.1  # SoftFilteredKNN's default
# the largest lambda / beta taken: the search runs in float32 (3.4e38 overflowed to inf, and a
# beta of 1e308 made scores that JSON cannot carry)
MAX_WEIGHT = 1e6


class SearchRequest(BaseModel):
    """A search request: the body of POST /search (JSON, or multipart/form-data with ``image``
    as a file part and ``conditions`` as a JSON field) and, for an item, the query string of
    GET /search. The one schema of the HTTP API (its OpenAPI document) and the first check of
    ``RequestParser``; what needs the catalog or the limits is checked there."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Method = Field("teacher", description=(
        "Backward Search, its distilled student, plain kNN, kNN among the items the heads label as the "
        "condition, or kNN re-scored by beta * log p(condition | item)"))
    k: int = Field(10, ge=1, description="results to return (at most limits.max_k)")
    lambda_: float | None = Field(None, alias="lambda", ge=0, le=MAX_WEIGHT,
                                  description="teacher only: the L1 weight λ")
    beta: float | None = Field(None, ge=0, le=MAX_WEIGHT, description="soft_filtered_knn only: the weight β "
                               f"(default {DEFAULT_BETA})")
    conditions: dict[str, Any] = Field(min_length=1, description="{property: label}, e.g. {\"style\": \"hatched\"}; "
                                                                 "GET /properties lists them")
    item_id: str | None = Field(None, description="a database item as the query (give this or image)")
    # bytes: a form's file part (the multipart schema of POST /search says so)
    image: Annotated[str | bytes | None, WithJsonSchema({"type": "string", "contentEncoding": "base64"})] = Field(
        None, description="the query image, base64 (give this or item_id)")


FIELDS = frozenset(f.alias or name for name, f in SearchRequest.model_fields.items())
_TEXT_READERS = {f.alias or name: TypeAdapter(f.annotation) for name, f in SearchRequest.model_fields.items()}
# what a field's type or range error says (the limits' part is RequestParser's)
_FIELD_RULES = {"method": f"must be one of {', '.join(METHODS)}", "k": "must be an integer in 1..{max_k}",
                "lambda": f"must be a number in 0..{MAX_WEIGHT:g}", "beta": f"must be a number in 0..{MAX_WEIGHT:g}",
                "conditions": "must be a non-empty object {{property: label}}", "item_id": "must be a string",
                "image": "must be a base64 string"}


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: conditions in the catalog's property order, as class ids; the
    query is an item (``position``) or an upload (``image_bytes``)."""

    method: str
    k: int
    properties: tuple[str, ...]
    classes: tuple[int, ...]
    lam: float | None = None  # teacher only
    beta: float | None = None  # soft_filtered_knn only (its default when not given)
    position: int | None = None
    image_bytes: bytes | None = None


class RequestError(ValueError):
    """A bad request: ``field`` names the offending field."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message  # without the field: what an HTTP error body carries beside it
        self.status = status  # the HTTP status the Serve app answers with


def request_from_query(items: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A search request from a query string (``GET /search?item_id=…&style=Rococo&method=student``):
    ``item_id``, ``method``, ``k``, ``lambda``, ``beta`` as in the JSON body; every other key is a
    condition ``property=label``. Values are read by ``text_field``; a key given twice and ``image``
    (uploads need POST) are refused here."""
    body: dict[str, Any] = {}
    conditions: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in items:
        if key in seen:
            raise RequestError(key, "given more than once in the query string")
        seen.add(key)
        if key == "image":
            raise RequestError("image", "uploads go in the body of POST /search")
        if key == "conditions":
            raise RequestError("conditions", "in a query string each condition is its own key: ?<property>=<label>")
        if key in FIELDS:
            body[key] = text_field(key, value)
        else:
            conditions[key] = value
    if conditions:
        body["conditions"] = conditions
    return body


def text_field(key: str, value: str) -> Any:
    """A field given as text (a query string, a form field) read as the schema's type for it
    (``k`` an integer, ``lambda`` and ``beta`` numbers); text that does not read passes on as
    text, so that the parser names the field."""
    try:
        return _TEXT_READERS[key].validate_python(value)
    except (KeyError, ValidationError):
        return value


def json_body(raw: bytes | str, field: str = "body") -> Any:
    """JSON text parsed, or a ``RequestError`` naming ``field``: not JSON, or nested too deeply
    for the parser (a body nested 100,000 levels deep ended in RecursionError, a 500)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError(field, "JSON nested too deeply") from None
    except ValueError:
        raise RequestError(field, "not valid JSON") from None


class ServiceLimits(Section):
    """What a request may ask (the serve config's ``limits``, serve/settings.py)."""

    max_k: int = Field(100, ge=1)
    max_image_bytes: int = Field(5 * 1024 * 1024, ge=1)  # uploads above this get a 4xx
    # pixels an upload's header may declare: read before decoding (decompression bombs); the
    # model sees a few hundred pixels a side, 40 Mpx leaves room for any camera photo
    max_image_pixels: int = Field(40_000_000, ge=1)
    # and by shape: a long thin image within the pixel limit still decodes to gigabytes of rows
    max_image_side: int = Field(20_000, ge=1)
    max_image_aspect: float = Field(50.0, ge=1)  # longer side / shorter side


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

    def canonical(self, properties: Sequence[str]) -> tuple[str, ...]:
        """``properties`` in the dataset's order (the order of ``classes``)."""
        return tuple(name for name in self.classes if name in set(properties))

    def position(self, item_id: str) -> int:
        return self._index[item_id]

    def item(self, position: int) -> dict[str, Any]:
        return {"id": self.ids[position],
                "labels": {name: self.classes[name][int(lab[position])] for name, lab in self.labels.items()}}


# -- validation -------------------------------------------------------------------------------
class RequestParser:
    """Checks a request body against the catalog; returns the parsed request or raises
    ``RequestError`` naming the field."""

    def __init__(self, catalog: Catalog, student_sets: Sequence[tuple[str, ...]], limits: ServiceLimits) -> None:
        self.catalog = catalog
        self.student_sets = [self.catalog.canonical(s) for s in student_sets]
        self.limits = limits

    def parse(self, request: Any) -> ParsedRequest:
        """``request``: a JSON body, or the fields of a form or a query string read with ``text_field``."""
        if not isinstance(request, dict):
            raise RequestError("body", f"expected a JSON object, got {type(request).__name__}")
        unknown = set(request) - FIELDS
        if unknown:
            raise RequestError(sorted(unknown)[0], f"unknown field; allowed: {', '.join(sorted(FIELDS))}")
        if (request.get("item_id") is not None) == (request.get("image") is not None):
            raise RequestError("item_id", "give exactly one of item_id or image")
        try:
            checked = SearchRequest.model_validate(request, strict=True)
        except ValidationError as err:
            field = str(err.errors()[0]["loc"][0])
            given = request.get(field)
            raise RequestError(field, f"{_FIELD_RULES[field].format(max_k=self.limits.max_k)}, got {given!r}") from None
        method, k, lam, beta, conditions = checked.method, checked.k, checked.lambda_, checked.beta, checked.conditions
        if k > self.limits.max_k:
            raise RequestError("k", f"{_FIELD_RULES['k'].format(max_k=self.limits.max_k)}, got {k!r}")
        if lam is not None and method != "teacher":
            raise RequestError("lambda", f"only the teacher (Backward Search) takes lambda; method {method!r} "
                               "would ignore it")
        if beta is not None and method != "soft_filtered_knn":
            raise RequestError("beta", f"only soft_filtered_knn takes beta; method {method!r} would ignore it")
        valid = self.catalog.properties()
        props, classes = [], []
        for prop, label in conditions.items():
            if prop not in valid:
                raise RequestError("conditions", f"unknown property '{prop}'; valid: {', '.join(valid)}")
            if not isinstance(label, str) or label not in valid[prop]:
                raise RequestError(f"conditions.{prop}", f"unknown label {label!r}; valid: {', '.join(valid[prop])}")
            props.append(prop)
            classes.append(self.catalog.classes[prop].index(label))
        # a set of conditions is the same set in any order: the catalog's property order
        order = self.catalog.canonical(props)
        classes = [classes[props.index(p)] for p in order]
        props = list(order)
        if method == "student" and tuple(props) not in self.student_sets:
            raise RequestError("method", f"no student for conditions on {props}; students exist for "
                               f"{[list(s) for s in self.student_sets] or 'none'}")
        position, image = None, None
        if checked.item_id is not None:
            try:
                position = self.catalog.position(checked.item_id)
            except KeyError:
                raise RequestError("item_id", f"unknown item id {checked.item_id!r}") from None
        else:
            image = self.image_bytes(checked.image)
        return ParsedRequest(method, k, tuple(props), tuple(classes), None if lam is None else float(lam),
                             float(DEFAULT_BETA if beta is None else beta) if method == "soft_filtered_knn" else None,
                             position, image)

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
            raise RequestError("image", f"larger than {limit} bytes", 413)
        try:
            decode_image(data, "upload", self.limits.max_image_pixels, self.limits.max_image_side,
                         self.limits.max_image_aspect)
        except ImageTooLargeError as err:
            raise RequestError("image", str(err), 413) from None
        except BadImageError as err:
            raise RequestError("image", str(err)) from None
        return data


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


