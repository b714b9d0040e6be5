"""Cached artefacts are checked on load: a damaged one is named, discarded and rebuilt (or,
on request, an error); concurrent runs on one fresh cache leave one complete file each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cir_bench.cli import main

from .conftest import tiny_overrides

ARGS = ["--set", "eval.methods=[knn, student]", "--set", "queries.sets=[[style]]"]


def _run(cache: Path, out: Path, *extra: str) -> int:
    return main(["run", "--no-progress", *sum((["--set", o] for o in tiny_overrides(cache, out)), []), *ARGS,
                 *extra])


def _only(folder: Path, pattern: str) -> Path:
    (path,) = [p for p in folder.glob(pattern) if not p.name.endswith((".sha256", ".lock"))]
    return path


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("runs") / "first"
    assert _run(cache, out) == 0
    return cache, pd.read_csv(out / "metrics.csv")


def _same_metrics(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in a.columns if c.startswith(("precision", "ap_", "mts", "context"))]
    pd.testing.assert_frame_equal(a[["method", *cols]], b[["method", *cols]])


def test_flipped_bytes_in_embeddings_are_found_and_rebuilt(first, tmp_path, capsys):
    cache, metrics = first
    emb = _only(cache / "embeddings", "*.pt")
    data = bytearray(emb.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])  # same size
    emb.write_bytes(bytes(data))
    capsys.readouterr()
    assert _run(cache, tmp_path / "again") == 0
    err = capsys.readouterr().err
    assert f"damaged cache file {emb}" in err and "rebuilding" in err
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["embeddings"]["reused"] is False and manifest["checkpoint"]["reused"] is True
    _same_metrics(metrics, pd.read_csv(tmp_path / "again" / "metrics.csv"))


@pytest.mark.parametrize("folder", ["checkpoints", "students", "queries"])
def test_truncated_cache_files_are_named_and_rebuilt(first, tmp_path, capsys, folder):
    cache, metrics = first
    path = _only(cache / folder, "*")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    capsys.readouterr()
    assert _run(cache, tmp_path / "again") == 0
    err = capsys.readouterr().err
    assert f"damaged cache file {path}" in err
    _same_metrics(metrics, pd.read_csv(tmp_path / "again" / "metrics.csv"))
    assert path.with_name(path.name + ".sha256").is_file()


def test_damaged_cache_can_be_an_error(first, tmp_path, capsys):
    cache, _ = first
    path = _only(cache / "students", "*")
    path.write_bytes(b"not a student")
    assert _run(cache, tmp_path / "x", "--set", "on_damaged_cache=error") == 2
    err = capsys.readouterr().err
    assert f"cir-bench: error: damaged cache file {path}" in err and "sha256 does not match" in err


def test_concurrent_runs_on_a_fresh_cache_leave_one_complete_file(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "cir_bench.cli", "train", "--no-progress",
           *sum((["--set", o] for o in tiny_overrides(cache)), []), "--set", "train.epochs=1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    names = sorted(p.name for p in (cache / "checkpoints").iterdir() if not p.name.endswith(".lock"))
    assert len(names) == 2 and names[1] == names[0] + ".sha256", names  # one checkpoint, its checksum
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    reported = [json.loads(o[0][o[0].index("{"):]) for o in outs]
    assert len({r["checkpoint"] for r in reported}) == 1
    # the entry was built once: the second process waited for the first (or came after it)
    assert sorted(r["reused"] for r in reported) == [False, True], reported


def test_a_second_run_on_the_same_folder_is_refused_at_once_naming_the_first(tmp_path, capsys):
    """`--out` is locked while a run writes it (here held by this process, as a first run
    would): a second run stops before any work, naming the holder."""
    import os
    import time

    from cir_bench.paths import exclusive_folder

    out = tmp_path / "run"
    with exclusive_folder(out):
        t0 = time.perf_counter()
        assert _run(tmp_path / "cache", out) == 2
        assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert f"{out} is being written by another cir-bench (pid {os.getpid()}" in err, err
    assert not (tmp_path / "cache" / "checkpoints").exists()  # nothing was trained


def test_a_cache_entry_is_built_once_when_two_ask_for_it(tmp_path, capsys):
    import threading
    import time

    from cir_bench.paths import load_or_build, write_checked

    path = tmp_path / "entry.txt"
    built = []

    def build():
        built.append(1)
        time.sleep(1.0)
        write_checked(path, lambda tmp: tmp.write_text("built"))
        return "built"

    results = []

    def ask():
        results.append(load_or_build(path, lambda p: p.read_text(), build))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for t in threads:
        t.join(30)
    assert len(built) == 1 and sorted(results) == [("built", False), ("built", True)], (built, results)
    assert f"waiting for another process building {path}" in capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path, monkeypatch, capsys):
    """The disk filling up while a checkpoint is written (a real ENOSPC: the temporary file is
    /dev/full) ends in one `cir-bench: error:` line naming the folder and the sizes, not a
    traceback; nothing is left under the final name."""
    import os
    import tempfile

    from cir_bench import paths

    real = tempfile.mkstemp

    def full_disk(prefix="", suffix="", dir=None):
        fd, name = real(prefix=prefix, suffix=suffix, dir=dir)
        os.close(fd)
        os.unlink(name)
        os.symlink("/dev/full", name)  # every write there fails with ENOSPC
        return os.open(name, os.O_RDONLY), name

    monkeypatch.setattr(paths.tempfile, "mkstemp", full_disk)
    cache = tmp_path / "cache"
    code = main(["train", "--no-progress", *sum((["--set", o] for o in tiny_overrides(cache)), []),
                 "--set", "train.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cir-bench: error: no space left in "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not [p for p in cache.rglob("*.pt")]  # no checkpoint under its final name


def test_stale_temporaries_of_killed_writes_are_removed_at_start(tmp_path):
    import os
    import time

    from cir_bench.paths import remove_stale_temporaries

    cache = tmp_path / "cache"
    (cache / "embeddings").mkdir(parents=True)
    old = cache / "embeddings" / ".abc.pt.k2j3h4.tmp"
    fresh = cache / "embeddings" / ".def.pt.x8y9z0.tmp"  # a live writer's
    other = cache / "embeddings" / "notes.tmp"  # not of cir-bench's naming
    for p in (old, fresh, other):
        p.write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    assert remove_stale_temporaries(cache) == 1
    assert not old.exists() and fresh.exists() and other.exists()
