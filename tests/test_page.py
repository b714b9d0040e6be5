"""The search page of `cir-bench serve`, driven in headless Chromium (Debian's `chromium`,
Playwright's Python package) against a real server on loopback with SynthArt tiny: a deep
link, changing a condition and λ, an upload, an error; plus its image and gallery endpoints."""
from __future__ import annotations

import io
import os
import shutil
import signal

import httpx
import pytest

from .test_serve import _free_port, _listeners, _start_cli_serve, _wait_or_kill, serve_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page_server(cache_dir, tiny_trained, tmp_path_factory):
    """`cir-bench serve` with Ray's Python proxy (the ray_serve switches off; the shipped
    HAProxy layout is tested in tests/test_serve.py) and the teacher uncompiled; stopped the
    way Ctrl+C stops it, and that is checked."""
    port = _free_port()
    folder = tmp_path_factory.mktemp("page")
    config = serve_config(folder / "serve.yaml", teacher={"compile": False},
                          ray_serve={"haproxy": False, "throughput_optimized": False})
    proc, log = _start_cli_serve(cache_dir, folder, port, "page", "--serve-config", config)
    try:
        assert {name for _, name in _listeners(port)} == {"ray::ProxyActor"}, _listeners(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl+C sends
        code = _wait_or_kill(proc, 60)
    assert code == 0 and "cir-bench serve: stopped" in log.read_text(), log.read_text()[-2000:]


def _an_item(server: str) -> tuple[dict, str, str]:
    """An item, a condition label it does not have, and the property."""
    item = httpx.get(f"{server}/items", params={"limit": 1}, timeout=30).json()["items"][0]
    labels = httpx.get(f"{server}/properties", timeout=30).json()["style"]
    other = next(label for label in labels if label != item["labels"]["style"])
    return item, other, "style"


def test_image_and_gallery_endpoints(page_server):
    item, other, _ = _an_item(page_server)
    r = httpx.get(f"{page_server}/items/{item['id']}/image", params={"size": 128}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"] and r.headers["etag"]
    from PIL import Image

    assert max(Image.open(io.BytesIO(r.content)).size) <= 128
    missing = httpx.get(f"{page_server}/items/no-such-item/image", timeout=30)
    assert missing.status_code == 404 and "no-such-item" in missing.json()["error"]
    assert httpx.get(f"{page_server}/items/{item['id']}/image", params={"size": 7}, timeout=30).status_code == 422
    page = httpx.get(f"{page_server}/items", params={"style": other, "limit": 5}, timeout=30).json()
    assert page["total"] > 0 and all(it["labels"]["style"] == other for it in page["items"])
    bad = httpx.get(f"{page_server}/items", params={"style": "no-such-style"}, timeout=30)
    assert bad.status_code == 422 and "style" in bad.json()["error"]
    home = httpx.get(f"{page_server}/", timeout=30)
    assert home.status_code == 200 and "<title>cir-bench search</title>" in home.text
    assert httpx.get(f"{page_server}/static/../config.yaml", timeout=30).status_code == 404


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is absent (Debian: apt-get install -y chromium); "
                    ".ci/run installs it")
def test_search_page_in_headless_chromium(page_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    item, other, prop = _an_item(page_server)
    outside: list[str] = []

    def route(r):
        if r.request.url.startswith((page_server, "data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    def searches(page) -> int:
        return int(page.get_attribute("#results-area", "data-searches") or 0)

    def wait_results(page, after: int, n: int, box: str = "#results-a") -> list[str]:
        page.wait_for_function(f"Number(document.querySelector('#results-area').dataset.searches || 0) > {after}",
                               timeout=60000)
        page.wait_for_function(
            f"Array.from(document.querySelectorAll('{box} .result img')).length === {n} && "
            f"Array.from(document.querySelectorAll('{box} .result img')).every(i => i.complete && i.naturalWidth > 0)",
            timeout=60000)
        return page.eval_on_selector_all(f"{box} .result", "els => els.map(e => e.dataset.id)")

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", route)
            # 1. a deep link runs its search without a click: k images, each marked
            page.goto(f"{page_server}/?item={item['id']}&{prop}={other}&method=student&k=6")
            first = wait_results(page, 0, 6)
            marks = page.eval_on_selector_all("#results-a .result", "els => els.map(e => [e.dataset.ok, "
                                              "e.querySelector('figcaption').innerText])")
            for ok, text in marks:
                assert ok == str(f"{prop}: {other}" in text).lower(), (ok, text)  # the mark matches the labels
            assert all(page.eval_on_selector_all("#results-a .result img", "els => els.map(e => e.alt)"))
            page.screenshot(path=str(tmp_path / "search-page.png"))
            # 2. another condition: the grid changes, and so does the URL
            third = next(o for o in page.eval_on_selector_all(f"#cond-{prop} option", "els => els.map(e => e.value)")
                         if o and o != other)
            n = searches(page)
            page.select_option(f"#cond-{prop}", third)
            second = wait_results(page, n, 6)
            assert second != first and f"{prop}={third}" in page.url
            # 3. the teacher at another λ (slider, applied on release)
            n = searches(page)
            page.select_option("#method", "teacher")
            wait_results(page, n, 6)
            n = searches(page)
            page.locator("#lambda").fill("-1")
            wait_results(page, n, 6)
            assert "lambda=0.1" in page.url and "λ = 0.1" in page.inner_text("#results-a .meta")
            # soft filtered kNN with its β
            n = searches(page)
            page.select_option("#method", "soft_filtered_knn")
            wait_results(page, n, 6)
            assert "β = 0.1" in page.inner_text("#results-a .meta") and "method=soft_filtered_knn" in page.url
            # 4. compare two methods side by side
            n = searches(page)
            page.check("#compare")
            wait_results(page, n, 6, "#results-b")
            # 5. an upload
            png = tmp_path / "query.png"
            png.write_bytes(httpx.get(f"{page_server}/items/{item['id']}/image", params={"size": 256}).content)
            n = searches(page)
            page.set_input_files("#upload", str(png))
            wait_results(page, n, 6)
            assert "uploaded" in page.inner_text("#query-view")
            # 6. an error from the API is shown, and the page stays usable
            page.goto(f"{page_server}/?item={item['id']}&{prop}=no-such-label&method=student&k=6")
            page.wait_for_selector("#error:not([hidden])", timeout=60000)
            assert prop in page.inner_text("#error") and "no-such-label" in page.inner_text("#error")
            page.screenshot(path=str(tmp_path / "search-page-error.png"))
            # 7. an oversized upload: the 413 is shown, the page does not hang
            big = tmp_path / "big.png"
            big.write_bytes(b"\x89PNG" + os.urandom(6 * 1024 * 1024))  # over the default 5 MiB
            page.evaluate("document.querySelector('#error').hidden = true")
            page.set_input_files("#upload", str(big))
            page.wait_for_selector("#error:not([hidden])", timeout=60000)
            assert "image: larger than" in page.inner_text("#error")
        finally:
            browser.close()
    assert outside == []
