"""A wheelhouse: every wheel cir-bench needs on one Python version and platform, in one folder,
so that a machine without network (an air-gapped GPU server) installs with

    pip install --no-index --find-links DIR 'cir-bench[test,baselines,faiss]'

Built on a machine with the package index (``make wheelhouse`` or ``python -m
cir_bench.wheelhouse --out DIR``): pip resolves the whole set for the target Python and
platform (``pip install --dry-run --report``, which installs nothing), ``pip download
--no-deps`` fetches exactly the wheels of that resolution, each checked against the sha256 the
index gave, and the project itself is built into a wheel. ``--without torch,torchvision``
leaves out those packages and every package that only they need: a CUDA build of torch already
installed on the target satisfies the project's torch range, and pip installs nothing over it.

Uses only pip (the running interpreter's) and ``packaging``; imports nothing of cir-bench.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

MANIFEST = "wheelhouse.json"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EXTRAS = ("test", "baselines", "faiss")  # what `make setup` installs
LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


class WheelhouseError(RuntimeError):
    """A step of the build failed: ``step`` names it, ``detail`` says why (pip's last lines)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"wheelhouse: {step} failed: {detail}")
        self.step = step
        self.detail = detail


@dataclass(frozen=True)
class Target:
    """The machine the wheels are for: CPython ``python_version`` ("3.12") on ``platform`` (a
    wheel platform tag: "manylinux_2_28_x86_64" = glibc 2.28 or newer on x86-64)."""

    python_version: str
    platform: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"3\.\d+", self.python_version):
            raise WheelhouseError("target", f"python version {self.python_version!r} is not MAJOR.MINOR, e.g. 3.12")
        if self.glibc_minor is None and not self.platform.startswith("linux_"):
            raise WheelhouseError("target", f"platform {self.platform!r} is not a Linux wheel tag such as "
                                            "manylinux_2_28_x86_64 (other systems are not supported)")

    @property
    def arch(self) -> str:
        return re.sub(r"^(manylinux_\d+_\d+|manylinux\d+|linux)_", "", self.platform)

    @property
    def glibc_minor(self) -> int | None:
        m = re.fullmatch(r"manylinux_2_(\d+)_.+", self.platform)
        if m:
            return int(m.group(1))
        legacy = self.platform.rsplit("_" + self.arch, 1)[0] if self.platform.endswith(self.arch) else ""
        return LEGACY_MANYLINUX.get(legacy)

    def platform_tags(self) -> list[str]:
        """The tag itself and every older manylinux tag a machine of that glibc also runs (pip
        expands these only for the machine it runs on, not for a ``--platform`` it is given)."""
        if self.glibc_minor is None:
            return [self.platform]
        tags = [f"manylinux_2_{m}_{self.arch}" for m in range(self.glibc_minor, 4, -1)]
        tags += [f"{legacy}_{self.arch}" for legacy, m in LEGACY_MANYLINUX.items() if m <= self.glibc_minor]
        return tags

    def pip_flags(self) -> list[str]:
        flags = ["--only-binary=:all:", "--python-version", self.python_version, "--implementation", "cp"]
        for tag in self.platform_tags():
            flags += ["--platform", tag]
        return flags

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker values of the target, to follow the dependencies pip resolved."""
        return {"python_version": self.python_version, "python_full_version": self.python_version + ".0",
                "implementation_version": self.python_version + ".0", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "os_name": "posix", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": self.arch, "platform_release": "",
                "platform_version": ""}

    @classmethod
    def this_machine(cls) -> Target:
        """This interpreter on this machine (what the offline-install test installs into)."""
        import platform as _platform

        libc, version = _platform.libc_ver()
        if sys.platform != "linux" or libc != "glibc":
            raise WheelhouseError("target", "this machine is not a glibc Linux: name --platform")
        major, minor = (int(v) for v in version.split(".")[:2])
        return cls(f"{sys.version_info.major}.{sys.version_info.minor}",
                   f"manylinux_{major}_{minor}_{_platform.machine()}")


@dataclass(frozen=True)
class Resolved:
    """One package of pip's resolution for the target."""

    name: str  # canonical (PEP 503)
    version: str
    requires: tuple[str, ...]
    url: str
    sha256: str | None
    requested_extras: tuple[str, ...] = ()
    requested: bool = False


@dataclass
class Manifest:
    """``wheelhouse.json``: what was resolved for which target, and what the folder holds."""

    python_version: str
    platform: str
    project: str
    extras: list[str]
    without: list[str]
    left_out: list[str]
    wheels: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    install: str = ""


def run_pip(step: str, args: Sequence[str], python: str = sys.executable) -> None:
    proc = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise WheelhouseError(step, tail or f"pip exited {proc.returncode}")


def resolve(requirements: Sequence[str], target: Target, constraints: Sequence[Path] = ()) -> list[Resolved]:
    """pip's resolution of ``requirements`` for ``target`` (nothing is installed)."""
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        report = Path(tmp) / "report.json"
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--target", str(Path(tmp) / "target"),
                "--report", str(report), *target.pip_flags()]
        for c in constraints:
            args += ["--constraint", str(c)]
        run_pip("resolve", [*args, *requirements])
        items = json.loads(report.read_text())["install"]
    out = []
    for item in items:
        meta = item["metadata"]
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        out.append(Resolved(canonicalize_name(meta["name"]), meta["version"], tuple(meta.get("requires_dist") or ()),
                            item["download_info"]["url"], hashes.get("sha256"),
                            tuple(item.get("requested_extras") or ()), bool(item.get("requested"))))
    return out


def needed(packages: Iterable[Resolved], without: Iterable[str], env: dict[str, str]) -> set[str]:
    """The packages reachable from the requested ones without passing through ``without``:
    what the target needs when the ``without`` packages are already installed there."""
    by_name = {p.name: p for p in packages}
    skip = {canonicalize_name(n) for n in without}
    missing = skip - by_name.keys()
    if missing:
        raise WheelhouseError("--without", f"not in the resolution: {', '.join(sorted(missing))}")
    seen: dict[str, set[str]] = {}  # name -> the extras its requirements were followed with
    todo = [(p.name, set(p.requested_extras)) for p in by_name.values() if p.requested and p.name not in skip]
    while todo:
        name, extras = todo.pop()
        if name in seen and extras <= seen[name]:
            continue
        done = seen.setdefault(name, set())
        done |= extras
        for spec in by_name[name].requires:
            req = Requirement(spec)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in done | {""}):
                continue
            dep = canonicalize_name(req.name)
            if dep in skip:
                continue
            if dep not in by_name:
                raise WheelhouseError("resolve", f"{name} needs {dep}, which pip did not resolve")
            todo.append((dep, set(req.extras)))
    return set(seen)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_folder(out: Path) -> set[Path]:
    """The wheels already in ``out`` (a wheelhouse built before, to be replaced); a folder with
    other files in it is refused rather than mixed into."""
    if not out.exists():
        out.mkdir(parents=True)
        return set()
    present = set(out.iterdir())
    if present and not (out / MANIFEST).is_file():
        raise WheelhouseError("--out", f"{out} is not empty and holds no {MANIFEST}: name an empty or new folder")
    return {p for p in present if p.suffix == ".whl"}


def build(out: Path, target: Target, extras: Sequence[str] = DEFAULT_EXTRAS, without: Sequence[str] = (),
          project: Path = PROJECT_ROOT, constraints: Sequence[Path] | None = None) -> Manifest:
    """Resolve, download and check every wheel for ``target`` into ``out``; write its manifest."""
    pyproject_file = project / "pyproject.toml"
    if not pyproject_file.is_file():
        raise WheelhouseError("project", f"no pyproject.toml in {project}: run from a cir-bench checkout")
    pyproject = tomllib.loads(pyproject_file.read_text())
    name = canonicalize_name(pyproject["project"]["name"])
    if constraints is None:
        constraints = [c for c in [project / "constraints.txt"] if c.is_file()]
    old_wheels = prepare_folder(out)
    spec = f"{project}[{','.join(extras)}]" if extras else str(project)
    # the build requirements too, so that `pip install --no-index -e .` works from a checkout there
    packages = resolve([spec, *pyproject["build-system"]["requires"]], target, constraints)
    keep = needed(packages, without, target.marker_environment())
    wanted = [p for p in packages if p.name in keep and p.name != name]
    run_pip("download", ["download", "--no-deps", "--quiet", "--dest", str(out), *target.pip_flags(),
                         *(f"{p.name}=={p.version}" for p in wanted)])
    wheels: dict[str, str] = {}
    for p in wanted:
        file = out / os.path.basename(p.url)
        if not file.is_file():
            raise WheelhouseError("download", f"{file.name} ({p.name} {p.version}) is not in {out}")
        digest = sha256_of(file)
        if p.sha256 is not None and digest != p.sha256:
            raise WheelhouseError("download", f"{file.name}: sha256 {digest} differs from the index's {p.sha256}")
        wheels[file.name] = digest
    with tempfile.TemporaryDirectory(prefix="wheelhouse-build-") as tmp:
        run_pip("build the project's wheel", ["wheel", "--no-deps", "--quiet", "--wheel-dir", tmp, str(project)])
        for built in Path(tmp).glob("*.whl"):
            os.replace(built, out / built.name)
            wheels[built.name] = sha256_of(out / built.name)
    for stale in old_wheels:
        if stale.name not in wheels:
            stale.unlink()
    extras_part = f"[{','.join(extras)}]" if extras else ""
    manifest = Manifest(target.python_version, target.platform, f"{pyproject['project']['name']}=="
                        f"{pyproject['project']['version']}", list(extras), sorted(canonicalize_name(w) for w in without),
                        sorted(p.name for p in packages if p.name not in keep), dict(sorted(wheels.items())),
                        f"pip install --no-index --find-links {out} '{pyproject['project']['name']}{extras_part}'")
    (out / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def split_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    here = None
    try:
        here = Target.this_machine()
    except WheelhouseError:
        pass
    ap = argparse.ArgumentParser(prog="python -m cir_bench.wheelhouse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the wheels and wheelhouse.json")
    ap.add_argument("--python-version", default=here.python_version if here else None, required=here is None,
                    help="the target's CPython MAJOR.MINOR (default: this interpreter's)")
    ap.add_argument("--platform", default=here.platform if here else None, required=here is None,
                    help="the target's wheel platform tag, e.g. manylinux_2_28_x86_64 (default: this machine's)")
    ap.add_argument("--extras", default=",".join(DEFAULT_EXTRAS), help="extras of cir-bench to include")
    ap.add_argument("--without", default="", help="packages the target already has, e.g. torch,torchvision: left "
                                                  "out with every package only they need")
    ap.add_argument("--constraint", type=Path, action="append", default=None,
                    help="pip constraints file (default: the checkout's constraints.txt, the tested torch pins)")
    args = ap.parse_args(argv)
    try:
        target = Target(args.python_version, args.platform)
        manifest = build(args.out, target, split_names(args.extras), split_names(args.without),
                         constraints=args.constraint)
    except WheelhouseError as err:
        print(err, file=sys.stderr)
        return 1
    size = sum((args.out / f).stat().st_size for f in manifest.wheels) / 2**20
    print(f"{len(manifest.wheels)} wheels ({size:,.0f} MiB) for CPython {target.python_version} on "
          f"{target.platform} in {args.out}", file=sys.stderr)
    if manifest.left_out:
        print(f"left out (the target has them): {', '.join(manifest.left_out)}", file=sys.stderr)
    print(manifest.install)
    return 0


if __name__ == "__main__":
    sys.exit(main())
