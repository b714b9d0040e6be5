"""Joining a Ray cluster with --address: wrong addresses and missing tokens fail fast with a
one-line error that says what to do; a token where Ray documents it switches token mode on."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from cir_bench.cluster import ClusterConnectError, check_reachable, token_source


def test_token_is_found_where_ray_documents_it(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert token_source({}, home) is None
    (home / ".ray" / "auth_token").write_text("t" * 64)
    assert token_source({}, home) == str(home / ".ray" / "auth_token")
    assert token_source({"RAY_AUTH_TOKEN": "abc"}, tmp_path / "elsewhere") == "$RAY_AUTH_TOKEN"
    path = tmp_path / "token.txt"
    path.write_text("x")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(path)}, tmp_path / "elsewhere") == str(path)
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path / "elsewhere") is None


def test_unreachable_and_malformed_addresses_fail_at_once():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    t0 = time.perf_counter()
    with pytest.raises(ClusterConnectError, match=f"127.0.0.1:{port}: no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ClusterConnectError, match="expected HOST:PORT"):
        check_reachable("my-cluster")
    check_reachable("auto")  # Ray finds the local cluster itself


def test_cli_with_a_wrong_address_gives_one_line_in_seconds(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cir_bench.cli", "tune", "quick", "--address", f"127.0.0.1:{port}",
                           "--storage-path", str(tmp_path / "tune"), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    elapsed = time.perf_counter() - t0
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"cir-bench: error: --address 127.0.0.1:{port}: no Ray cluster answers there")
    assert "Traceback" not in done.stderr
    assert elapsed < 10, elapsed  # interpreter start and imports included
