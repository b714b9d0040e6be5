"""Files on disk, the one place for each concern every stage shares:

- ``cache_root``: where cir-bench keeps datasets, checkpoints, embeddings, query sets,
  students, baseline galleries and (by default) baseline/backbone weights;
- ``atomic_write`` / ``save_torch``: write a file under a temporary name and rename it into
  place, so a crashed or concurrent run never leaves a half-written file under the final name;
- ``file_sha256``: the content hash that cache keys and manifests record;
- ``write_checked`` / ``load_checked``: cached artefacts carry a sha256 sidecar
  (``<file>.sha256``), written after the file; a file whose bytes do not match it (flipped
  bits, a truncated copy, a write cut short) is reported as ``DamagedCacheError``, naming it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def cache_root(explicit: str | Path | None = None) -> Path:
    """``explicit`` (``cache_dir`` of the config, ``--cache-dir``) if given, else
    ``$CIR_BENCH_CACHE``, else ``~/.cache/cir-bench``."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("CIR_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cir-bench"


def default_weights_dir() -> Path:
    """Where weights files are looked for when neither a flag nor ``$CIR_BENCH_WEIGHTS``
    names a folder: ``<cache root>/weights`` (``~/.cache/cir-bench/weights`` by default)."""
    return cache_root(None) / "weights"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``
    (``os.replace`` is atomic on one filesystem), on error remove it.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a" / "x.txt"
    >>> with atomic_write(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('done', ['x.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        size = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise DiskFullError(path, size) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """The disk filled up while cir-bench wrote ``path``."""

    def __init__(self, path: str | Path, written: int) -> None:
        import shutil

        self.path = Path(path)
        self.free = shutil.disk_usage(self.path.parent).free
        self.written = written
        super().__init__(errno.ENOSPC, f"no space left in {self.path.parent} while writing {self.path.name} "
                                       f"({written / 2**20:.1f} MB written before the disk filled, "
                                       f"{self.free / 2**20:.1f} MB free there now); free at least that much "
                                       "more there, or point --cache-dir / --out at a disk with room")

    def __str__(self) -> str:
        return self.strerror


def remove_stale_temporaries(folder: str | Path, older_than_s: float = 3600.0) -> int:
    """Remove cir-bench's own temporary files (``.<name>.<random>.tmp``, left by a process
    killed while writing) under ``folder`` that are older than ``older_than_s`` (a live
    writer's are younger); returns how many."""
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    for tmp in folder.rglob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and not tmp.is_symlink() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
    return removed


class DamagedCacheError(RuntimeError):
    """A cached file that is not what was written: its checksum does not match, it has none
    (a write cut short) or it does not load."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"damaged cache file {path}: {reason}")
        self.path = Path(path)


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checked(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then rename onto ``path`` (atomic), then its sha256 sidecar (atomic).
    A reader that finds the file without a matching sidecar treats it as damaged."""
    path = Path(path)
    with atomic_write(path) as tmp:
        write(tmp)
        digest = file_sha256(tmp)
    with atomic_write(checksum_path(path)) as tmp:
        tmp.write_text(digest + "\n")
    return path


def verify_checked(path: str | Path) -> None:
    """Raise ``DamagedCacheError`` unless ``path`` matches its sha256 sidecar."""
    path, sidecar = Path(path), checksum_path(path)
    if not sidecar.is_file():
        raise DamagedCacheError(path, "no checksum beside it (written by an older cir-bench, or the write was cut "
                                      "short)")
    expected = sidecar.read_text().strip()
    if file_sha256(path) != expected:
        raise DamagedCacheError(path, f"its sha256 does not match {sidecar.name} (changed or truncated on disk)")


def load_checked(path: str | Path, load: Callable[[Path], Any]) -> Any:
    """``load(path)`` after checking the file against its sidecar; a load that fails anyway
    is reported as ``DamagedCacheError`` too."""
    verify_checked(path)
    try:
        return load(Path(path))
    except Exception as err:  # noqa: BLE001 -- whatever a damaged file makes the reader raise
        raise DamagedCacheError(path, f"does not load ({type(err).__name__}: {err})") from err


def discard(path: str | Path) -> None:
    """Remove a cached file and its sidecar."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def load_cached(path: str | Path, load: Callable[[Path], Any], on_damaged: str = "rebuild") -> Any | None:
    """The cached object at ``path`` or None when there is none. A damaged file is named on
    stderr, discarded and None returned, so the caller rebuilds it (``on_damaged="error"``:
    ``DamagedCacheError`` instead)."""
    if not Path(path).exists():
        return None
    try:
        return load_checked(path, load)
    except DamagedCacheError as err:
        if on_damaged == "error":
            raise
        print(f"cir-bench: {err}; discarded, rebuilding it", file=sys.stderr, flush=True)
        discard(path)
        return None


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically, with a checksum sidecar. The archive is built in memory, so
    its bytes do not depend on the file's (temporary) name: identical payloads give identical
    files, in any process, and content-addressed caches keyed on them are shared."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_checked(path, lambda tmp: tmp.write_bytes(buf.getvalue()))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class UntrustedFolderError(PermissionError):
    """A folder whose files cir-bench would unpickle (Ray Tune's experiment state) that someone
    other than this user (or root) can change: loading it would run their code as ours."""

    def __init__(self, path: str | Path, reason: str, flag: str) -> None:
        self.path, self.reason, self.flag = Path(path), reason, flag
        super().__init__(f"{path}: {reason}; its pickled files would run code of whoever can write there. Make it "
                         f"writable only by you (chmod go-w) or, if everyone who can write there may run code as "
                         f"you, pass {flag}")


def check_private_tree(root: str | Path, flag: str) -> None:
    """Raise ``UntrustedFolderError`` unless ``root``, every folder above it and everything in
    it is owned by this user or root and not writable by group or others (a folder above with
    the sticky bit, such as /tmp, is fine: others cannot replace what is ours in it)."""
    import stat

    root = Path(root).resolve()
    me = os.geteuid()

    def check(path: Path, above: bool) -> None:
        st = path.lstat()
        if st.st_uid not in (me, 0):
            raise UntrustedFolderError(path, f"owned by uid {st.st_uid}, not by you (uid {me})", flag)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (above and st.st_mode & stat.S_ISVTX):
            raise UntrustedFolderError(path, f"writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
                                             f"(mode {stat.filemode(st.st_mode)})", flag)

    for parent in reversed(root.parents):
        check(parent, above=True)
    check(root, above=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            check(Path(dirpath) / name, above=False)


def kernel_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where torch.compile keeps the kernels cir-bench compiles: ``<base>/<key>``, the base
    ``$CIR_BENCH_KERNEL_CACHE`` or ``<cache root>/kernels``, the key naming the torch version,
    the CPU capability torch runs with (ATEN_CPU_CAPABILITY changes it) and the machine's CPU
    (model and flags, whatever the core count), so that a kernel built for one is never loaded
    under another (torch's shared default cache is keyed by none of them)."""
    import platform

    import torch

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        cpu += "".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    key = (f"torch-{torch.__version__}-{torch.backends.cpu.get_cpu_capability().lower()}-"
           f"{hashlib.sha256(cpu.encode()).hexdigest()[:12]}")
    base = os.environ.get("CIR_BENCH_KERNEL_CACHE")
    return (Path(base).expanduser() if base else cache_root(cache_dir) / "kernels") / key


def use_kernel_cache(cache_dir: str | Path | None = None) -> Path:
    """Point torch.compile's cache (TorchInductor reads $TORCHINDUCTOR_CACHE_DIR when it
    compiles) at ``kernel_cache_dir()``, created private to this user."""
    path = kernel_cache_dir(cache_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


class FolderInUseError(RuntimeError):
    """Another cir-bench process holds the lock of a folder this one would write."""

    def __init__(self, path: str | Path, holder: str) -> None:
        self.path, self.holder = Path(path), holder
        super().__init__(f"{path} is being written by another cir-bench ({holder or 'a process'}); wait for it "
                         "to finish or choose another --out")


LOCK_NAME = ".cir-bench.lock"


@contextlib.contextmanager
def exclusive_folder(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) while writing it; a second
    process asking for it is refused at once with ``FolderInUseError`` naming the first (its
    pid, start time and command, kept in the lock file). The lock goes with the process."""
    import fcntl
    import time

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(folder, os.pread(fd, 4096, 0).decode(errors="replace").strip()) from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv)[:500]}\n".encode(), 0)
        yield folder
    finally:
        if held and created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            # a run that failed before writing anything leaves no folder behind
            (folder / LOCK_NAME).unlink()
            folder.rmdir()
        os.close(fd)


@contextlib.contextmanager
def build_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry ``path`` (``<path>.lock``) while building it:
    a second process building the same entry waits (saying so) and then finds it built."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cir-bench: waiting for another process building {path}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_or_build(path: str | Path, load: Callable[[Path], Any], build: Callable[[], Any],
                  on_damaged: str = "rebuild") -> tuple[Any, bool]:
    """The cached object at ``path`` and True, or ``build()``'s (which writes ``path``) and
    False; built under ``build_lock``, so two processes never build one entry twice: the
    second waits and loads what the first wrote. ``load`` may return None to reject a file."""
    hit = load_cached(path, load, on_damaged)
    if hit is not None:
        return hit, True
    with build_lock(path):
        hit = load_cached(path, load, on_damaged)
        if hit is not None:
            return hit, True
        return build(), False
