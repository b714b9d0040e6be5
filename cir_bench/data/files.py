"""Datasets read from image files on disk: shared checks, image loading and bad-image policy.

Every loader converts images to RGB (grayscale, palette, CMYK, alpha), names the file in
every error, and with ``skip_bad_images`` drops missing or undecodable images up front and
counts them (``Dataset.report``, written to the run manifest) instead of failing.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from cir_bench.config import ConfigError
from cir_bench.data.base import BadImageError, Dataset, Item, Property


class DatasetLayoutError(FileNotFoundError):
    """The dataset root or one of its annotation files is missing or malformed."""


def require_dir(root: str | Path | None, name: str, hint: str) -> Path:
    if root is None:
        raise DatasetLayoutError(f"dataset '{name}' needs --root PATH ({hint})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(f"dataset '{name}': root {path} is not a folder ({hint})")
    return path


def find_file(name: str, candidates: Sequence[Path], what: str) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    listing = "\n  ".join(str(p) for p in candidates)
    raise DatasetLayoutError(f"dataset '{name}': {what} not found; looked at:\n  {listing}")


def read_lines(path: Path) -> list[str]:
    """UTF-8 lines without line endings (CRLF tolerated), blank lines dropped."""
    with open(path, encoding="utf-8", newline="") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


@dataclass(frozen=True)
class ImageSource:
    path: Path
    box: tuple[float, float, float, float] | None = None  # crop (left, top, right, bottom), pixels


def open_rgb(src: ImageSource) -> Image.Image:
    try:
        with Image.open(src.path) as img:
            img.load()
            out = img.convert("RGB") if img.mode != "RGB" else img.copy()
    except FileNotFoundError:
        raise BadImageError(f"image file missing: {src.path}") from None
    except Exception as err:  # PIL raises many types for corrupt files
        raise BadImageError(f"cannot decode image {src.path}: {err}") from None
    if src.box is not None:
        left, top, right, bottom = src.box
        w, h = out.size
        box = (max(0, int(left)), max(0, int(top)), min(w, int(round(right))), min(h, int(round(bottom))))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise BadImageError(f"crop box {src.box} is empty inside {src.path} ({w}x{h})")
        out = out.crop(box)
    return out


class FileDataset(Dataset):
    """Items whose images live in files; subclasses build (properties, items, sources)."""

    def __init__(self, properties: Sequence[Property], items: Sequence[Item], sources: dict[str, ImageSource],
                 skip_bad_images: bool = False, report: dict | None = None) -> None:
        self.report: dict = dict(report or {})
        missing = [it.id for it in items if not sources[it.id].path.is_file()]
        bad: list[str] = []
        if skip_bad_images:
            for it in items:
                if it.id in missing:
                    continue
                try:
                    open_rgb(sources[it.id])
                except BadImageError:
                    bad.append(it.id)
            dropped = set(missing) | set(bad)
            items = [it for it in items if it.id not in dropped]
            self.report.update(skipped_missing_images=len(missing), skipped_bad_images=len(bad),
                               skipped_examples=sorted(dropped)[:10])
        elif missing:
            first = "\n  ".join(str(sources[i].path) for i in missing[:5])
            raise BadImageError(
                f"{len(missing)} image file(s) missing, e.g.:\n  {first}\n"
                "(pass --skip-bad-images to skip and count them instead)"
            )
        if not items:
            raise DatasetLayoutError(f"dataset '{self.name}' has no usable item")
        self._sources = sources
        super().__init__(properties, items)

    def load_image(self, index: int) -> Image.Image:
        return open_rgb(self._sources[self.items[index].id])

    def _content_fingerprint(self) -> str:
        """Paths, sizes and modification times: cheap, and changes when a file changes."""
        h = hashlib.sha256()
        for it in self.items:
            src = self._sources[it.id]
            st = os.stat(src.path)
            h.update(f"{src.path}|{st.st_size}|{int(st.st_mtime)}|{src.box}".encode())
        return h.hexdigest()


def checked_options(dataset: str, loader: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` checked against the keyword parameters of ``loader`` (name, type of the
    default, fractions in (0, 1)), so that a typo or a bad value fails before any file is
    read, naming the config key."""
    params = {name: p for name, p in inspect.signature(loader).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY or (p.default is not inspect.Parameter.empty)}
    out: dict[str, Any] = {}
    for key, value in options.items():
        dotted = f"dataset.options.{key}"
        where = f"config key '{dotted}'"
        if key not in params:
            raise ConfigError(f"{where}: unknown option of dataset '{dataset}'; known: {', '.join(params)}", key=dotted)
        default = params[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} expects true or false, got {value!r}", key=dotted)
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} expects a number, got {value!r}", key=dotted)
            if isinstance(default, int) and not float(value).is_integer():
                raise ConfigError(f"{where} expects an integer, got {value!r}", key=dotted)
            value = type(default)(value)
            if key.endswith("fraction") and not 0.0 < value < 1.0:
                raise ConfigError(f"{where} must be in (0, 1), got {value}", key=dotted)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where} expects a string, got {value!r}", key=dotted)
        out[key] = value
    return out
