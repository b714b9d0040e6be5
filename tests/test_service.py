"""The search service core: same answers as the offline methods, batching, bad requests."""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
import pytest

from cir_bench.search import get_method
from cir_bench.search.backward import BackwardSearch
from cir_bench.search.student import StudentSearch
from cir_bench.models.student import Student
from cir_bench.pipeline import prepare
from cir_bench.serving import RequestError, SearchService, ServiceLimits, build_bundle

from .conftest import queries_from_requests
from .equivalence import SCORE_TOL, assert_same_rankings


@pytest.fixture(scope="module")
def prepared(tiny_config, tiny, tiny_trained):
    return prepare(tiny_config, progress=False, dataset=tiny)


@pytest.fixture(scope="module")
def service(tiny_config, tiny, prepared):
    bundle = build_bundle(tiny_config, dataset=tiny)
    return SearchService(bundle, ServiceLimits(max_image_bytes=200_000))


def _same(answers, ids, scores, teacher: bool = False) -> None:
    """Service answers vs reference lists: equal up to near-ties. A teacher answer computed
    in another batch may also differ by Adam's magnification of float rounding
    (tests/equivalence.py): near-ties then within the score change that allows."""
    got_ids = [[i["id"] for i in a["items"]] for a in answers]
    got_scores = [[i["score"] for i in a["items"]] for a in answers]
    assert_same_rankings(got_ids, got_scores, ids, scores, tie=1e-3 if teacher else SCORE_TOL,
                         score_tol=1e-2 if teacher else SCORE_TOL)


def _requests(dataset, method, n=6):
    test = dataset.split_indices("test")[:n]
    styles = dataset.property("style").classes
    return [{"item_id": dataset.items[p].id, "conditions": {"style": styles[(dataset.labels("style")[p]
             + 1) % 6]}, "method": method, "k": 10} for p in test]


@pytest.mark.parametrize("method", ["teacher", "student", "knn", "filtered_knn", "soft_filtered_knn"])
def test_service_matches_the_offline_methods(service, prepared, tiny_config, method):
    """The service's components (loaded from the bundle's files) answer exactly what the
    offline methods of the pipeline answer for the same queries."""
    reqs = _requests(prepared.dataset, method)
    answers = service.search_many(reqs)
    assert all(a["batch_size"] == len(reqs) for a in answers)  # one batched search for the group
    queries = queries_from_requests([service.parser.parse(r) for r in reqs])
    student = Student.load(service.bundle.students[("style",)])
    offline = {"teacher": lambda: BackwardSearch(tiny_config.search.preset, lam=tiny_config.search.lam),
               "student": lambda: StudentSearch(student),
               "knn": lambda: get_method("knn"), "filtered_knn": lambda: get_method("filtered_knn"),
               "soft_filtered_knn": lambda: get_method("soft_filtered_knn")}[method]().search(prepared.ctx, queries, 10)
    ids = [it.id for it in prepared.dataset.items]
    if method == "soft_filtered_knn":
        assert all(a["beta"] == 0.1 for a in answers)  # the offline default
    # the same batch of queries through the service's components and the offline method
    _same(answers, [[ids[p] for p in row] for row in offline.positions], offline.scores.tolist())
    if method == "teacher":
        assert all(isinstance(a["iterations"], int) for a in answers)
        assert [a["iterations"] for a in answers] == offline.extras["iterations"].tolist()
    alone = service.search(reqs[0])  # batch of 1 vs 6: equal up to near-ties
    _same([alone], [[i["id"] for i in answers[0]["items"]]], [[i["score"] for i in answers[0]["items"]]],
          teacher=method == "teacher")


def test_uploaded_image_is_embedded_like_the_store(service, prepared, tiny_config):
    item = prepared.dataset.items[3]
    buf = io.BytesIO()
    prepared.dataset.load_image(3).save(buf, format="PNG")
    ans = service.search({"image": base64.b64encode(buf.getvalue()).decode(), "conditions": {"style": "flat"},
                          "method": "knn", "k": 3})
    # not in the index only if item 3 is outside the database split; then compare scores only
    if item.split == tiny_config.queries.database_split:
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
    ({"item_id": "00001-flat", "conditions": {"style": "flat"}, "method": "knn", "lambda": 0.1}, "lambda"),
    (["not", "an", "object"], "body"),
])
def test_bad_requests_name_the_field_and_the_service_keeps_serving(service, prepared, request_body, field):
    with pytest.raises(RequestError) as err:
        service.parser.parse(request_body)
    assert err.value.field == field and "object at 0x" not in str(err.value)
    mixed = service.search_many([request_body, _requests(prepared.dataset, "knn", 1)[0]])
    assert mixed[0]["field"] == field and "items" in mixed[1]


def test_mixed_methods_and_uploads_in_one_call(service, prepared):
    """A batch holding teacher, student and knn requests, item ids and an upload, answers each
    as if it were alone."""
    buf = io.BytesIO()
    prepared.dataset.load_image(5).save(buf, format="PNG")
    upload = {"image": base64.b64encode(buf.getvalue()).decode(), "conditions": {"style": "flat"},
              "method": "teacher", "k": 4}
    reqs = [_requests(prepared.dataset, m, 2)[1] for m in ("teacher", "student", "knn")] + [upload]
    together = service.search_many(reqs)
    for r, t in zip(reqs, together):
        _same([service.search(r)], [[i["id"] for i in t["items"]]], [[i["score"] for i in t["items"]]],
              teacher=r["method"] == "teacher")


def test_faiss_backend_gives_the_exact_answers(tiny_config, tiny, prepared):
    import dataclasses

    pytest.importorskip("faiss")
    bundle = dataclasses.replace(build_bundle(tiny_config, dataset=tiny), index="faiss",
                                 index_options={"factory": "Flat"})
    exact = SearchService(build_bundle(tiny_config, dataset=tiny))
    flat = SearchService(bundle)
    for r in _requests(prepared.dataset, "knn") + _requests(prepared.dataset, "teacher"):
        a, b = exact.search(r), flat.search(r)  # FAISS Flat is exact up to float summation order
        _same([b], [[i["id"] for i in a["items"]]], [[i["score"] for i in a["items"]]])


def test_run_config_selects_the_faiss_backend(tiny_config, tiny, prepared):
    """eval.index=faiss reaches prepare(): knn over a FAISS Flat index ranks as the exact one."""
    from cir_bench.index import FaissIndex

    pytest.importorskip("faiss")
    cfg = tiny_config.model_copy(update={"eval": tiny_config.eval.model_copy(
        update={"index": "faiss", "index_options": {"factory": "Flat"}})})
    with_faiss = prepare(cfg, progress=False, dataset=tiny)
    assert isinstance(with_faiss.ctx.index, FaissIndex)
    queries = queries_from_requests([service_parse(prepared, r) for r in _requests(tiny, "knn")])
    for method in ("knn", "filtered_knn"):
        a = get_method(method).search(prepared.ctx, queries, 10)
        b = get_method(method).search(with_faiss.ctx, queries, 10)
        assert_same_rankings(a.positions.tolist(), a.scores.tolist(), b.positions.tolist(), b.scores.tolist(),
                             what=method)


def service_parse(prepared, request):
    from cir_bench.serving import Catalog, RequestParser

    catalog = Catalog.from_dataset(prepared.dataset, prepared.ctx.database, "exclude")
    return RequestParser(catalog, [], ServiceLimits()).parse(request)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_service_components_on_cuda_match_cpu(service, prepared):
    """The deployments' components on CUDA answer as on the CPU: the same scores to float
    precision, so the same top-10 up to near-ties (float summation order differs between
    devices: seen on an H200, 11 of 12 knn lists equal, the twelfth swapping near-tied items)."""
    gpu = SearchService(service.bundle, ServiceLimits(max_image_bytes=200_000), device="cuda")
    assert gpu.teacher.device.type == "cuda" and next(gpu.encoder.model.parameters()).is_cuda
    for method in ("knn", "student", "teacher"):
        reqs = _requests(prepared.dataset, method, 12)
        cpu, gpu_answers = service.search_many(reqs), gpu.search_many(reqs)
        overlap = np.mean([len({i["id"] for i in a["items"]} & {i["id"] for i in b["items"]}) / 10
                           for a, b in zip(cpu, gpu_answers)])
        assert overlap >= (0.8 if method == "teacher" else 0.95), (method, overlap)
        if method != "teacher":  # one forward pass: scores agree to float precision
            for a, b in zip(cpu, gpu_answers):
                assert np.allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]], atol=1e-4)


def test_student_leaving_z_on_its_device_ranks_the_same(service, prepared):
    """In the ingress the student hands z to the index as a tensor (on CUDA: no wait for the
    device between the two); the answers are those of the numpy hand-over."""
    from cir_bench.serving import IndexStage, StudentStage
    from cir_bench.serving.orchestrate import rank_job, search_job

    student, index = StudentStage(service.bundle, "cpu"), IndexStage(service.bundle, "cpu")
    parsed = [service.parser.parse(r) for r in _requests(prepared.dataset, "student", 8)]
    jobs = [search_job(p, index.vectors([p.position])[0]) for p in parsed]
    as_numpy, as_tensor = student.transform_many(jobs), student.transform_many(jobs, on_device=True)
    assert all(torch.is_tensor(t.z) and isinstance(n.z, np.ndarray) for t, n in zip(as_tensor, as_numpy))
    ranked = [index.search_many([rank_job(service.catalog, p, s.z) for p, s in zip(parsed, out)])
              for out in (as_numpy, as_tensor)]
    assert [r.positions for r in ranked[0]] == [r.positions for r in ranked[1]]
    assert np.allclose([r.scores for r in ranked[0]], [r.scores for r in ranked[1]], atol=1e-6)
    # a batch mixing student z (tensors) and knn z0 (numpy) is ranked in one call
    mixed = [rank_job(service.catalog, parsed[0], as_tensor[0].z), rank_job(service.catalog, parsed[1], jobs[1].z0)]
    assert index.search_many(mixed)[0].positions == ranked[0][0].positions


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_student_and_index_on_cuda_wait_once_and_match_cpu(service, prepared):
    """On CUDA: staged inputs, z left on the device, one wait in the index; the same top-10 as
    the CPU up to near-ties, and a second batch does not disturb the first one's answers."""
    from cir_bench.serving import IndexStage, StudentStage
    from cir_bench.serving.orchestrate import rank_job, search_job

    parsed = [service.parser.parse(r) for r in _requests(prepared.dataset, "student", 12)]
    answers = {}
    for device in ("cpu", "cuda"):
        student, index = StudentStage(service.bundle, device), IndexStage(service.bundle, device)
        assert index.index.one_sync is (device == "cuda")
        jobs = [search_job(p, index.vectors([p.position])[0]) for p in parsed]
        out = student.transform_many(jobs, on_device=True)
        answers[device] = index.search_many([rank_job(service.catalog, p, s.z) for p, s in zip(parsed, out)])
        again = index.search_many([rank_job(service.catalog, p, s.z) for p, s in zip(parsed[:3], out[:3])])
        assert [a.positions for a in again] == [a.positions for a in answers[device][:3]]
    overlap = np.mean([len(set(a.positions) & set(b.positions)) / len(a.positions)
                       for a, b in zip(answers["cpu"], answers["cuda"])])
    assert overlap >= 0.95, overlap


def test_serve_config_is_checked_before_serve_starts_naming_file_and_key(tmp_path, service):
    from cir_bench.config import ConfigError
    from cir_bench_serve.app import with_index
    from cir_bench_serve.settings import load_serve_config, settings_from_dict

    shipped = load_serve_config(None)  # serve/config.yaml
    assert set(shipped.deployments) == {"ingress", "encoder", "teacher", "student", "index"}
    assert shipped.deployment("teacher")["ray_actor_options"]["num_cpus"] == 0.5
    assert with_index(service.bundle, shipped) is service.bundle  # no index section: the run config's
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("deployments:\n  searcher: {num_replicas: 2}\n", r"unknown deployment\(s\) \['searcher'\]"),
        ("indexes: {}\n", r"unknown config key 'indexes'"),
        ("deployments:\n  teacher: {num_replicas: 0}\n", r"'deployments.teacher.num_replicas' must be >= 1"),
        ("batching:\n  teacher: {max_batch_size: many}\n", r"'batching.teacher.max_batch_size' expects an integer"),
        ("limits: {max_k: 10, max_kk: 3}\n", r"unknown config key 'limits.max_kk'"),
        ("http: {port: 70000}\n", r"'http.port' must be <= 65535"),
        ("index: {backend: annoy}\n", r"unknown index 'annoy'"),
        ("ray_serve: {haproxy: maybe}\n", r"'ray_serve.haproxy' expects"),
        ("teacher: {compile: sometimes}\n", r"'teacher.compile' must be one of auto, True, False"),
        ("ray_serve: {proxy: haproxy}\n", r"unknown config key 'ray_serve.proxy'"),
        ("ingress: {local: [student, index, teacher]}\ndeployments:\n  teacher: {ray_actor_options: {num_gpus: 0.5}}\n",
         r"deployments.teacher asks for num_gpus 0.5, but ingress.local answers teacher inside the ingress"),
        ("- a list\n", r"expected a mapping"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message) as err:
            load_serve_config(str(bad))
        assert str(bad) in str(err.value)
    faiss_cfg = tmp_path / "faiss.yaml"
    faiss_cfg.write_text("index: {backend: faiss, options: {factory: HNSW32, ef_search: 64}}\n")
    b = with_index(service.bundle, load_serve_config(str(faiss_cfg)))
    assert b.index == "faiss" and b.index_options["factory"] == "HNSW32"
    assert settings_from_dict({}).deployment("ingress")["max_ongoing_requests"] == 256
    assert shipped.ray_serve.haproxy and shipped.ray_serve.throughput_optimized
    # a GPU for a stage with its own replica is fine
    gpu = settings_from_dict({"ingress": {"local": ["student", "index"]},
                              "deployments": {"teacher": {"ray_actor_options": {"num_gpus": 0.5}}}})
    assert gpu.deployment("teacher")["ray_actor_options"]["num_gpus"] == 0.5


def test_condition_order_does_not_matter(service, prepared):
    """A set of conditions is the same set in any order: the student for style+shape answers
    {"shape": ..., "style": ...} too, with the same answer (issue: 422 "no student" before)."""
    ds = prepared.dataset
    pos = int(ds.split_indices("test")[0])
    style = ds.property("style").classes[(ds.labels("style")[pos] + 1) % 6]
    shape = ds.property("shape").classes[(ds.labels("shape")[pos] + 1) % 8]
    for method in ("student", "teacher"):
        a = service.search({"item_id": ds.items[pos].id, "conditions": {"shape": shape, "style": style},
                            "method": method})
        b = service.search({"item_id": ds.items[pos].id, "conditions": {"style": style, "shape": shape},
                            "method": method})
        assert "items" in a, a
        assert [i["id"] for i in a["items"]] == [i["id"] for i in b["items"]]
    parsed = service.parser.parse({"item_id": ds.items[pos].id, "conditions": {"shape": shape, "style": style}})
    assert parsed.properties == ("style", "shape")
    assert parsed.classes == (ds.property("style").index(style), ds.property("shape").index(shape))


def test_query_sets_are_canonical(tiny):
    assert tiny.query_sets([["shape", "style"], ["style"], ["style", "shape"]]) == [["style", "shape"], ["style"]]
    with pytest.raises(Exception, match="unknown property 'genre'"):
        tiny.query_sets([["genre"]])


def test_serve_config_env_reaches_the_replica_as_runtime_env():
    from cir_bench_serve.settings import settings_from_dict

    settings = settings_from_dict({"deployments": {"ingress": {"ray_actor_options": {
        "num_cpus": 0.5, "env": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": 0}}}}})
    opts = settings.deployment("ingress")["ray_actor_options"]
    assert opts == {"num_cpus": 0.5, "num_gpus": 0.0,
                    "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
    assert "runtime_env" not in settings.deployment("teacher")["ray_actor_options"]


def test_serve_config_shutdown_timing_reaches_the_deployment_options():
    """Stopping checks for requests in flight every 0.1 s (Serve's 2 s loop made each stop ~5 s
    longer); a config may set both, and the timeout still bounds the wait."""
    from ray.serve.deployment import Deployment

    from cir_bench_serve.settings import settings_from_dict

    opts = settings_from_dict({}).deployment("teacher")
    assert opts["graceful_shutdown_wait_loop_s"] == 0.1 and opts["graceful_shutdown_timeout_s"] == 20.0
    set_ = settings_from_dict({"deployments": {"teacher": {"graceful_shutdown_timeout_s": 5}}}).deployment("teacher")
    assert set_["graceful_shutdown_timeout_s"] == 5
    import inspect

    assert {"graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s"} <= set(
        inspect.signature(Deployment.options).parameters)  # names Serve takes


@pytest.mark.skipif(__import__("shutil").which("g++") is None and __import__("shutil").which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++)")
def test_teacher_with_compile_warms_up_and_answers_every_lambda_like_the_plain_one(service, prepared):
    """search.compile in a serving config: the teacher compiles its step for one request and
    for a small batch when it starts (not on the first requests), then answers any λ without
    compiling again, with the plain teacher's lists (tests/test_backward.py: compiled kernels
    round differently, so near-ties and a few amplified queries may differ)."""
    import dataclasses

    from cir_bench.search import backward_engines
    from cir_bench.serving import TeacherStage
    from cir_bench.serving.orchestrate import search_job

    bundle = service.bundle
    bundle = dataclasses.replace(bundle, students={("style",): bundle.students[("style",)]},
                                 search=bundle.search.model_copy(update={"compile": True}))
    teacher = TeacherStage(bundle, "cpu")
    assert teacher.warmup_s > 0
    cached = len(backward_engines.STEP_CACHE)
    parsed = [service.parser.parse(r) for r in _requests(prepared.dataset, "teacher", 6)]
    for lam in (None, 0.02):
        jobs = [dataclasses.replace(search_job(p, service.index.vectors([p.position])[0]), lam=lam) for p in parsed]
        got = teacher.invert_many(jobs)
        assert len(backward_engines.STEP_CACHE) == cached  # buckets 1 and 8 were compiled at start, for every λ
        plain = service.teacher.invert_many(jobs)
        dist = [float(np.linalg.norm(g.z - p.z) / np.linalg.norm(p.z)) for g, p in zip(got, plain)]
        assert np.median(dist) <= 1e-4, dist
        assert np.mean([abs(g.iterations - p.iterations) <= 1 for g, p in zip(got, plain)]) >= 0.8


def test_teacher_compile_setting_auto_true_false(monkeypatch):
    """serve config teacher.compile: auto compiles on the CPU when a C++ compiler is found,
    never on CUDA (not measured there), true forces, false leaves it to search.compile."""
    import shutil

    import torch

    from cir_bench.serving.components import compile_decision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    assert compile_decision("auto", False, cpu) == (True, "teacher.compile: auto, /usr/bin/g++")
    assert compile_decision("auto", False, cuda)[0] is False and "CPU only" in compile_decision("auto", False, cuda)[1]
    assert compile_decision(False, False, cpu) == (False, "off (teacher.compile: false)")
    assert compile_decision(False, True, cpu) == (True, "search.compile")
    assert compile_decision(True, False, cuda) == (True, "teacher.compile: true")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    on, why = compile_decision("auto", False, cpu)
    assert not on and "found no C++ compiler" in why


def test_teacher_serves_uncompiled_when_compiling_fails_or_disagrees(service, monkeypatch):
    """A torch.compile that fails (no working compiler, no Triton) or a compiled step that does
    not compute what the eager step computes leaves the teacher uncompiled, answering, and
    saying why, whether compile was auto or true: a compile failure never stops a server."""
    from cir_bench.search import backward_engines
    from cir_bench.serving import TeacherStage
    from cir_bench.serving import components
    from cir_bench.serving.jobs import SearchJob

    def broken(*args, **kwargs):
        raise backward_engines.CompileUnavailable("RuntimeError", "InvalidCxxCompiler: No working C++ compiler found")

    def disagrees(*args, **kwargs):
        raise backward_engines.CompiledStepMismatch(1.2, 1e-3, 0.1)

    monkeypatch.setattr(components, "cxx_compiler", lambda: "/usr/bin/g++")
    job = SearchJob(service.index.vectors([0])[0], ("style",), (1,))
    for fake, why in ((broken, "off: fell back to the uncompiled step: torch.compile failed (RuntimeError: "
                                "InvalidCxxCompiler"),
                      (disagrees, "off: fell back to the uncompiled step: the compiled step disagrees")):
        monkeypatch.setattr(backward_engines, "CompiledStep", fake)
        for setting in ("auto", True):
            backward_engines.STEP_CACHE.clear()
            teacher = TeacherStage(service.bundle, "cpu", 8, setting)
            assert not teacher.compiled and teacher.info()["compile"].startswith(why), teacher.info()
            assert teacher.invert_many([job])[0].iterations >= 1
    backward_engines.STEP_CACHE.clear()


