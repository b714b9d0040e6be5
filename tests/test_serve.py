"""The Ray Serve app over real HTTP on 127.0.0.1: methods, batching, bad requests."""
from __future__ import annotations

import asyncio
import base64
import socket

import pytest

import httpx  # noqa: E402  (a dependency: the load-test client)

from .conftest import tiny_overrides
from .equivalence import SCORE_TOL, assert_same_rankings  # noqa: E402


@pytest.fixture(scope="module")
def server(local_ray, cache_dir, tiny_trained):
    from ray import serve

    import serve.app as app_module  # noqa: F401  (the repository's serve/ package)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from cir_bench.config import load_config
    from cir_bench.serving import build_bundle

    bundle = build_bundle(load_config(None, tiny_overrides(cache_dir)))
    small = {"max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.2}}
    settings = {"deployments": {name: small for name in ("ingress", "encoder", "teacher", "student", "index")},
                "batching": {name: {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}
                             for name in ("encoder", "teacher", "student", "index")},
                # 0: item-id queries fetch z0 from the Index deployment (the CLI test below
                # serves with the default, where the ingress holds the small store)
                "limits": {"max_image_bytes": 100_000, "ingress_store_mb": 0}}
    from serve.settings import settings_from_dict

    serve.run(app_module.build_app(bundle, settings_from_dict(settings)), route_prefix="/", name="cir-bench-test")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def local_service(tiny_config, tiny, tiny_trained):
    from cir_bench.serving import SearchService, build_bundle

    service = SearchService(build_bundle(tiny_config, dataset=tiny))
    service.dataset = tiny
    return service


def _same(remote: dict, local: dict, method: str) -> None:
    """An HTTP answer vs the in-process one: the same orchestration and components, but the
    deployments batch requests differently, so equal up to near-ties (tests/equivalence.py)."""
    teacher = method == "teacher"
    assert_same_rankings([[x["id"] for x in remote["items"]]], [[x["score"] for x in remote["items"]]],
                         [[x["id"] for x in local["items"]]], [[x["score"] for x in local["items"]]],
                         tie=1e-3 if teacher else SCORE_TOL, score_tol=1e-2 if teacher else SCORE_TOL)
    if teacher:
        assert abs(remote["iterations"] - local["iterations"]) <= 1


def _request(service, i: int, method: str) -> dict:
    ds = service.dataset
    pos = int(ds.split_indices("test")[i])
    style = ds.property("style").classes[(ds.labels("style")[pos] + 1) % 6]
    return {"item_id": ds.items[pos].id, "conditions": {"style": style}, "method": method, "k": 5}


def test_health_and_properties(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    props = httpx.get(f"{server}/properties").json()
    assert props["style"][:2] == ["flat", "outline"] and len(props["shape"]) == 8


@pytest.mark.parametrize("method", ["teacher", "student", "knn"])
def test_http_answers_equal_in_process_answers(server, local_service, method):
    for i in range(3):
        body = _request(local_service, i, method)
        r = httpx.post(f"{server}/search", json=body, timeout=30)
        assert r.status_code == 200, r.text
        remote = r.json()
        local = local_service.search(body)
        _same(remote, local, method)
        assert remote["timing_ms"]["total"] > 0 and set(remote["timing_ms"]) == set(local["timing_ms"])


def test_concurrent_teacher_requests_are_batched(server, local_service):
    async def fire():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(f"{server}/search", json=_request(local_service, i % 10,
                                                                                          "teacher"))
                                          for i in range(16)])

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["batch_size"] for r in responses) > 1
    stats = httpx.get(f"{server}/stats").json()
    assert max(stats["teacher"]["batch_sizes"]) > 1  # one inversion shared by concurrent requests
    assert max(stats["index"]["batch_sizes"]) > 1


def _png(service, pos: int) -> bytes:
    import io

    buf = io.BytesIO()
    service.dataset.load_image(pos).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("method", ["teacher", "student", "knn"])
def test_uploads_base64_and_multipart_equal_in_process(server, local_service, method):
    """An uploaded image goes through the Encoder deployment; JSON (base64) and multipart
    uploads answer what the in-process service answers."""
    image = _png(local_service, 7)
    body = {"image": base64.b64encode(image).decode(), "conditions": {"style": "hatched"}, "method": method, "k": 5}
    local = local_service.search(body)
    as_json = httpx.post(f"{server}/search", json=body, timeout=30)
    assert as_json.status_code == 200, as_json.text
    form = {"conditions": '{"style": "hatched"}', "method": method, "k": "5"}
    as_form = httpx.post(f"{server}/search", data=form, files={"image": ("q.png", image, "image/png")}, timeout=30)
    assert as_form.status_code == 200, as_form.text
    _same(as_json.json(), local, method)
    _same(as_form.json(), local, method)
    assert as_form.json()["timing_ms"]["embed"] > 0


@pytest.mark.parametrize("form, files, field", [
    ({"conditions": '{"style": "hatched"}'}, {"image": ("q.png", b"not an image", "image/png")}, "image"),
    ({"conditions": '{"style": "hatched"}'}, {"image": ("q.png", b"x" * 100_001, "image/png")}, "image"),
    ({"conditions": "style=hatched"}, {"image": ("q.png", b"x", "image/png")}, "conditions"),
    ({"conditions": '{"style": "hatched"}', "k": "many"}, {"image": ("q.png", b"x", "image/png")}, "k"),
])
def test_bad_multipart_uploads_get_4xx_naming_the_field(server, local_service, form, files, field):
    r = httpx.post(f"{server}/search", data=form, files=files, timeout=30)
    assert 400 <= r.status_code < 500 and r.json()["field"] == field, r.text
    assert httpx.post(f"{server}/search", json=_request(local_service, 0, "knn")).status_code == 200


@pytest.mark.parametrize("content, field", [
    ({"image": base64.b64encode(b"garbage bytes").decode(), "conditions": {"style": "flat"}}, "image"),
    ({"image": "A" * 140_000, "conditions": {"style": "flat"}}, "image"),
    ({"image": "A" * 400_000, "conditions": {"style": "flat"}}, "body"),  # 413 before reading
    ({"item_id": "x", "conditions": {"style": "Rococo"}}, "conditions.style"),
    ({"item_id": "x", "conditions": {"style": "flat"}, "k": "10"}, "k"),
    (b"{not json", "body"),
])
def test_bad_input_gets_4xx_then_service_still_serves(server, local_service, content, field):
    if isinstance(content, bytes):
        r = httpx.post(f"{server}/search", content=content, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{server}/search", json=content)
    assert 400 <= r.status_code < 500 and r.json()["field"] == field, r.text
    ok = httpx.post(f"{server}/search", json=_request(local_service, 0, "knn"))
    assert ok.status_code == 200


def test_cli_serve_starts_prints_url_and_stops_on_interrupt(cache_dir, tiny_trained, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    args = [sys.executable, "-m", "cir_bench.cli", "serve", "--port", str(port), "--no-progress"]
    for o in tiny_overrides(cache_dir):
        args += ["--set", o]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and f"http://127.0.0.1:{port}" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=10).status_code == 200  # OpenAPI UI
        body = httpx.get(f"http://127.0.0.1:{port}/examples", params={"n": 1}, timeout=10).json()[0]
        answer = httpx.post(f"http://127.0.0.1:{port}/search", json={**body, "method": "student"}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["items"]) == body["k"], answer.text
    finally:
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl+C sends
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("cir-bench serve did not stop on SIGINT")
    assert code == 0 and "cir-bench serve: stopped" in (tmp_path / "serve.log").read_text()


def test_loadtest_short_staged_run_writes_json_csv_plot(server, tmp_path, capsys):
    import json

    from cir_bench.cli import main

    out = tmp_path / "lt"
    code = main(["loadtest", server, "--methods", "student,teacher", "--concurrency", "1,4", "--rates", "10",
                 "--duration", "1.5", "--warmup", "0.5", "--max-requests", "200", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "loadtest.json").read_text())
    assert len(data["stages"]) == 2 * 3
    for stage in data["stages"]:
        assert stage["requests"] > 0 and stage["errors"] == 0 and stage["p50_ms"] <= stage["p99_ms"]
    assert (out / "loadtest.csv").exists() and (out / "loadtest.png").stat().st_size > 0


def test_loadtest_refuses_non_loopback_targets():
    from cir_bench.serving.loadtest import check_loopback

    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000")
    with pytest.raises(ValueError, match="loopback only"):
        check_loopback("http://10.1.2.3:8000")
