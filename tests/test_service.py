"""The search service core: same answers as the offline methods, batching, bad requests."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from cir_bench.methods import get_method
from cir_bench.methods.backward import BackwardSearch
from cir_bench.methods.student import StudentSearch
from cir_bench.pipeline import distil_or_load, prepare
from cir_bench.service import RequestError, SearchService, ServiceLimits, queries_from_requests


@pytest.fixture(scope="module")
def service(tiny_config, tiny, tiny_trained):
    prepared = prepare(tiny_config, progress=False, dataset=tiny)
    student, _ = distil_or_load(tiny_config, tiny, prepared.trained, prepared.store, ["style"], prepared.device,
                                progress=False)
    return SearchService(prepared, tiny_config, {("style",): student}, ServiceLimits(max_image_bytes=200_000))


def _requests(service, method, n=6):
    test = service.dataset.split_indices("test")[:n]
    styles = service.dataset.property("style").classes
    return [{"item_id": service.dataset.items[p].id, "conditions": {"style": styles[(service.dataset.labels("style")[p]
             + 1) % 6]}, "method": method, "k": 10} for p in test]


@pytest.mark.parametrize("method", ["teacher", "student", "knn"])
def test_service_matches_the_offline_methods(service, method):
    reqs = _requests(service, method)
    answers = service.search_many(reqs)
    assert all(a["batch_size"] == len(reqs) for a in answers)  # one batched search for the group
    queries = queries_from_requests(service, [service.parse(r) for r in reqs])
    offline = {"teacher": lambda: BackwardSearch(service.cfg.search.preset, lam=service.cfg.search.lam),
               "student": lambda: StudentSearch(service.students[("style",)]),
               "knn": lambda: get_method("knn")}[method]().search(service.ctx, queries, 10)
    ids = [it.id for it in service.dataset.items]
    for a, row in zip(answers, offline.positions):
        assert [i["id"] for i in a["items"]] == [ids[p] for p in row]
    if method == "teacher":
        assert all(isinstance(a["iterations"], int) for a in answers)
    alone = service.search(reqs[0])
    assert [i["id"] for i in alone["items"]] == [i["id"] for i in answers[0]["items"]]


def test_uploaded_image_is_embedded_like_the_store(service):
    item = service.dataset.items[3]
    buf = io.BytesIO()
    service.dataset.load_image(3).save(buf, format="PNG")
    ans = service.search({"image": base64.b64encode(buf.getvalue()).decode(), "conditions": {"style": "flat"},
                          "method": "knn", "k": 3})
    # not in the index only if item 3 is outside the database split; then compare scores only
    if item.split == service.cfg.queries.database_split:
        assert ans["items"][0]["id"] == item.id and ans["items"][0]["score"] > 0.99
    assert set(ans["items"][0]["labels"]) == {"style", "shape", "color"}


@pytest.mark.parametrize("request_body, field", [
    ({"image": base64.b64encode(b"\x89PNG garbage").decode(), "conditions": {"style": "flat"}}, "image"),
    ({"image": "A" * 400_000, "conditions": {"style": "flat"}}, "image"),
    ({"image": "not base64!!", "conditions": {"style": "flat"}}, "image"),
    ({"item_id": "00001-flat", "conditions": {"style": "Rococo"}}, "conditions.style"),
    ({"item_id": "00001-flat", "conditions": {"genre": "portrait"}}, "conditions"),
    ({"item_id": "00001-flat", "conditions": {"style": "flat"}, "k": "ten"}, "k"),
    ({"item_id": "00001-flat", "conditions": {"style": "flat"}, "k": 0}, "k"),
    ({"item_id": "00001-flat", "conditions": {"style": "flat"}, "lambda": -1}, "lambda"),
    ({"item_id": "00001-flat", "conditions": {"style": "flat"}, "method": "magic"}, "method"),
    ({"item_id": 12, "conditions": {"style": "flat"}}, "item_id"),
    ({"item_id": "no-such-item", "conditions": {"style": "flat"}}, "item_id"),
    ({"conditions": {"style": "flat"}}, "item_id"),
    ({"item_id": "00001-flat", "conditions": ["style"]}, "conditions"),
    ({"item_id": "00001-flat", "conditions": {"style": "flat"}, "colour": "red"}, "colour"),
    ({"item_id": "00001-flat", "conditions": {"shape": "star"}, "method": "student"}, "method"),
    (["not", "an", "object"], "body"),
])
def test_bad_requests_name_the_field_and_the_service_keeps_serving(service, request_body, field):
    with pytest.raises(RequestError) as err:
        service.parse(request_body)
    assert err.value.field == field
    mixed = service.search_many([request_body, _requests(service, "knn", 1)[0]])
    assert mixed[0]["field"] == field and "items" in mixed[1]
