"""The wheelhouse (cir_bench/wheelhouse.py): the resolution it follows, and an install from it
into a fresh virtual environment with the network refused, torch kept from outside the venv as a
GPU machine's CUDA torch would be."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from cir_bench.wheelhouse import MANIFEST, Resolved, Target, WheelhouseError, build, needed, prepare_folder

ROOT = Path(__file__).resolve().parent.parent


def test_target_expands_manylinux_tags_and_marker_values():
    t = Target("3.12", "manylinux_2_28_x86_64")
    tags = t.platform_tags()
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux_2_5_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert Target("3.12", "manylinux2014_x86_64").platform_tags()[0] == "manylinux_2_17_x86_64"
    assert "manylinux_2_28_x86_64" not in Target("3.12", "manylinux2014_x86_64").platform_tags()
    flags = t.pip_flags()
    assert flags[flags.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in flags
    env = Target("3.12", "manylinux_2_28_aarch64").marker_environment()
    assert env["platform_machine"] == "aarch64" and env["python_version"] == "3.12"


@pytest.mark.parametrize("version, platform", [("3", "manylinux_2_28_x86_64"), ("3.12", "macosx_14_0_arm64"),
                                               ("3.12", "win_amd64")])
def test_target_refuses_what_it_cannot_serve(version, platform):
    with pytest.raises(WheelhouseError) as err:
        Target(version, platform)
    assert err.value.step == "target"


def pkg(name, requires=(), requested=False, extras=()):
    return Resolved(name, "1.0", tuple(requires), f"file:///x/{name}-1.0-py3-none-any.whl", None, tuple(extras),
                    requested)


def test_needed_leaves_out_what_only_the_excluded_packages_need():
    env = Target("3.12", "manylinux_2_28_x86_64").marker_environment()
    packages = [
        pkg("app", ["torch>=2", "ray[serve]==1", "jinja2", "old-backport; python_version < '3.11'",
                    "pytest; extra == 'test'", "faiss; extra == 'faiss'"], requested=True, extras=["test"]),
        pkg("torch", ["jinja2", "sympy", "nvidia-cublas; platform_system == 'Linux'"]),
        pkg("sympy", ["mpmath"]), pkg("mpmath"), pkg("nvidia-cublas"), pkg("jinja2", ["markupsafe"]),
        pkg("markupsafe"), pkg("ray", ["click", "fastapi; extra == 'serve'", "pandas; extra == 'data'"]),
        pkg("click"), pkg("fastapi", ["pydantic"]), pkg("pydantic"), pkg("pytest"), pkg("faiss"),
        pkg("old-backport"), pkg("pandas"),
    ]
    assert needed(packages, [], env) == {"app", "torch", "sympy", "mpmath", "nvidia-cublas", "jinja2", "markupsafe",
                                         "ray", "click", "fastapi", "pydantic", "pytest"}
    without = needed(packages, ["Torch"], env)  # names compare canonicalised
    assert without == {"app", "jinja2", "markupsafe", "ray", "click", "fastapi", "pydantic", "pytest"}
    with pytest.raises(WheelhouseError) as err:
        needed(packages, ["torchh"], env)
    assert err.value.step == "--without" and "torchh" in err.value.detail


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WheelhouseError) as err:
        prepare_folder(tmp_path)
    assert err.value.step == "--out" and (tmp_path / "notes.txt").read_text() == "mine"
    assert prepare_folder(tmp_path / "new") == set() and (tmp_path / "new").is_dir()


def link_installed(names: list[str], site: Path) -> None:
    """A site folder holding (as links) these installed distributions of this venv: torch as a
    GPU machine has it, outside the venv the project installs into."""
    site.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}:
            if not (site / top).exists():
                (site / top).symlink_to(Path(dist.locate_file("")) / top)


def offline_env(home: Path) -> dict[str, str]:
    """No pip configuration, no index, and a proxy that refuses every connection, for when the
    test cannot also take the network away (``unshare``)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PIP_CONFIG_FILE": os.devnull,
            "PIP_NO_INDEX": "1", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}


def without_network() -> list[str]:
    unshare = shutil.which("unshare")
    for prefix in ([unshare, "-n"], [unshare, "-rn"]) if unshare else ():
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


@pytest.mark.slow
def test_install_from_the_wheelhouse_with_the_network_refused(tmp_path):
    wheels = tmp_path / "wheelhouse"
    manifest = build(wheels, Target.this_machine(), without=["torch", "torchvision"])
    files = {p.name for p in wheels.glob("*.whl")}
    assert files == set(manifest.wheels) and any(f.startswith("cir_bench-") for f in files)
    assert not any(f.startswith(("torch-", "torchvision-", "nvidia_", "triton-")) for f in files)
    assert {"torch", "torchvision", "sympy", "triton"} <= set(manifest.left_out)
    assert {"ray", "fastapi", "pydantic", "open-clip-torch", "faiss-cpu", "pytest"} <= {
        f.split("-")[0].lower().replace("_", "-") for f in files}
    assert json.loads((wheels / MANIFEST).read_text())["without"] == ["torch", "torchvision"]

    site = tmp_path / "gpu-torch"
    link_installed(manifest.left_out, site)
    venv = tmp_path / "fresh"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    cut = without_network()
    env = offline_env(tmp_path)

    def offline(*cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*cut, *map(str, cmd)], capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=tmp_path)

    install = [py, "-m", "pip", "install", "--no-index", "--find-links", wheels, "--no-compile", "--quiet",
               "cir-bench[test,baselines,faiss]"]
    # without a torch on the machine the wheelhouse cannot satisfy it, and nothing is fetched instead
    refused = offline(*install)
    assert refused.returncode != 0 and "torch" in refused.stderr
    (Path(purelib) / "gpu_torch.pth").write_text(f"{site}\n")
    done = offline(*install)
    assert done.returncode == 0, done.stderr[-3000:]
    assert offline(py, "-m", "pip", "check").returncode == 0
    where = offline(py, "-c", "import torch, ray.serve, faiss, open_clip, transformers, cir_bench_serve.app; "
                              "print(torch.__file__)")
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip().startswith(str(site))  # the torch that was there, not a copy
    run = offline(venv / "bin" / "cir-bench", "run", "--preset", "tiny", "--set", "train.epochs=1", "--set",
                  "eval.lambda_curve=[]", "--no-progress", "--cache-dir", tmp_path / "cache", "--out",
                  tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.csv").is_file() and (tmp_path / "run" / "report.html").is_file()
