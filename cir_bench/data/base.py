"""The dataset abstraction: items with labels per property, tag sets and a split.

Nothing downstream of this module knows which dataset it is looking at. A dataset that
knows its exact generative factors (SynthArt) also fills ``Item.factors`` and
``Item.group``; real datasets leave them empty and the factor-based metrics are skipped.
"""
from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image


class UnknownLabelError(ValueError):
    """A property or class label that the dataset does not define."""


class BadImageError(ValueError):
    """An image that is missing or cannot be decoded."""


@dataclass(frozen=True)
class Property:
    """A labelled property (e.g. ``style``) and its class names, index = class id."""

    name: str
    classes: tuple[str, ...]
    #: classes that are never a condition target (e.g. WikiArt's "unknown genre")
    excluded: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, label: str | int) -> int:
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            if 0 <= int(label) < self.num_classes:
                return int(label)
            raise UnknownLabelError(
                f"class id {label} out of range for property '{self.name}' (0..{self.num_classes - 1})"
            )
        try:
            return self.classes.index(str(label))
        except ValueError:
            raise UnknownLabelError(
                f"unknown label '{label}' for property '{self.name}'; valid: {', '.join(self.classes)}"
            ) from None


@dataclass(frozen=True)
class Item:
    """One database image: its id, split, class id per property and tag set."""

    id: str
    split: str
    labels: Mapping[str, int]
    tags: frozenset[str]
    factors: Mapping[str, str] = field(default_factory=dict)  # exact factors, when known
    group: str | None = None  # items sharing a group are renders of one scene


class Dataset(ABC):
    """A labelled image collection. Items are kept sorted by id (the tie-break order)."""

    name: str = "dataset"
    #: factors compared by ``context_at_k`` (empty when the dataset does not know them)
    context_factors: tuple[str, ...] = ()
    #: native square image size, when all images share one
    image_size: int | None = None
    #: resize to a square without cropping (object crops, as the authors treat aPY)
    square_resize: bool = False
    #: what loading noticed (skipped images, degenerate boxes, ...); goes to the manifest
    report: dict = {}
    #: the domain-conversion protocol (docs/metrics.md): what a correct result shares with the
    #: query besides the conditions (a property, or an exact factor such as emoji's "emoji"),
    #: and the property that names the domain; None: the dataset does not define it
    class_key: str | None = None
    domain_property: str | None = None

    def __init__(self, properties: Sequence[Property], items: Sequence[Item]) -> None:
        if not properties:
            raise ValueError(f"dataset '{self.name}' defines no labelled property")
        self.properties: tuple[Property, ...] = tuple(properties)
        order = sorted(range(len(items)), key=lambda i: items[i].id)
        self.items: tuple[Item, ...] = tuple(items[i] for i in order)
        self._source_order = order  # position in the source for each sorted item
        ids = [it.id for it in self.items]
        if len(set(ids)) != len(ids):
            seen: dict[str, list[int]] = {}
            for row, it in enumerate(items):  # rows in the source order (a CSV's data rows, 0-based)
                seen.setdefault(it.id, []).append(row)
            dupes = {i: rows for i, rows in seen.items() if len(rows) > 1}
            shown = "; ".join(f"'{i}' at items {rows}" for i, rows in list(dupes.items())[:5])
            raise ValueError(f"dataset '{self.name}' has {len(dupes)} duplicate item id(s): {shown}"
                             + (" ..." if len(dupes) > 5 else ""))
        self._index = {item_id: i for i, item_id in enumerate(ids)}
        names = {p.name for p in self.properties}
        for it in self.items:
            if set(it.labels) != names:
                raise ValueError(f"item {it.id} labels {sorted(it.labels)} != properties {sorted(names)}")

    def canonical_properties(self, names: Sequence[str]) -> list[str]:
        """``names`` in the dataset's property order, each once: a set of conditions is the
        same set whatever order it was written in (students, query sets and caches key on it).
        Unknown names raise ``UnknownLabelError``."""
        wanted = set(names)
        for name in wanted:
            self.property(name)
        return [p.name for p in self.properties if p.name in wanted]

    def query_sets(self, configured: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
        """The configured query sets (or the default ones), each in canonical order, each once."""
        out: list[list[str]] = []
        for props in configured or self.default_query_sets():
            canonical = self.canonical_properties(props)
            if not canonical:
                raise UnknownLabelError("a query set needs at least one property")
            if canonical not in out:
                out.append(canonical)
        return out

    def default_query_sets(self) -> list[list[str]]:
        """The first property alone, and the first two together when there are two."""
        names = [p.name for p in self.properties]
        return [names[:1]] + ([names[:2]] if len(names) > 1 else [])

    # -- images ---------------------------------------------------------------------
    @abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """The RGB image of item ``index`` (position in ``self.items``)."""

    # -- lookup ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def property(self, name: str) -> Property:
        for p in self.properties:
            if p.name == name:
                return p
        raise UnknownLabelError(
            f"unknown property '{name}' for dataset '{self.name}'; valid: "
            + ", ".join(p.name for p in self.properties)
        )

    def index_of(self, item_id: str) -> int:
        try:
            return self._index[item_id]
        except KeyError:
            raise KeyError(f"unknown item id '{item_id}' in dataset '{self.name}'") from None

    def split_indices(self, split: str) -> np.ndarray:
        if split == "all":
            return np.arange(len(self.items))
        idx = np.array([i for i, it in enumerate(self.items) if it.split == split], dtype=np.int64)
        if idx.size == 0:
            splits = sorted({it.split for it in self.items})
            raise ValueError(f"dataset '{self.name}' has no item in split '{split}'; splits: {splits}")
        return idx

    def labels(self, prop: str) -> np.ndarray:
        self.property(prop)
        return np.array([it.labels[prop] for it in self.items], dtype=np.int64)

    def class_codes(self) -> np.ndarray:
        """(N,) one code per item for ``class_key``: its label when it names a property, else
        the exact factor of that name (codes in order of first appearance)."""
        if self.class_key is None:
            raise ValueError(f"dataset '{self.name}' defines no class for the domain-conversion protocol")
        if self.class_key in {p.name for p in self.properties}:
            return self.labels(self.class_key)
        codes: dict[str, int] = {}
        try:
            return np.array([codes.setdefault(it.factors[self.class_key], len(codes)) for it in self.items],
                            dtype=np.int64)
        except KeyError:
            raise ValueError(f"dataset '{self.name}': class_key '{self.class_key}' is neither a property nor a "
                             f"factor of every item") from None

    # -- tables and identity --------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per item: id, split, the label (name) of each property, tags, factors."""
        rows = []
        for it in self.items:
            row: dict = {"id": it.id, "split": it.split}
            for p in self.properties:
                row[p.name] = p.classes[it.labels[p.name]]
            row["tags"] = sorted(it.tags)
            row["group"] = it.group
            for key, value in it.factors.items():
                row[f"factor_{key}"] = value
            rows.append(row)
        return pd.DataFrame(rows)

    def fingerprint(self) -> str:
        """A hash of the labels, tags, splits and (by default) every image's bytes."""
        h = hashlib.sha256()
        h.update(json.dumps({p.name: p.classes for p in self.properties}, sort_keys=True).encode())
        for it in self.items:
            h.update(
                json.dumps([it.id, it.split, dict(it.labels), sorted(it.tags)], sort_keys=True).encode()
            )
        h.update(self._content_fingerprint().encode())
        return h.hexdigest()[:16]

    def _content_fingerprint(self) -> str:
        """Image content identity; subclasses with a cheaper source hash override it."""
        h = hashlib.sha256()
        for i in range(len(self.items)):
            h.update(np.asarray(self.load_image(i)).tobytes())
        return h.hexdigest()


class ImageTooLargeError(BadImageError):
    """An image whose header declares more pixels than allowed (a decompression bomb)."""


def decode_image(data: bytes, what: str, max_pixels: int | None = None, max_side: int | None = None,
                 max_aspect: float | None = None, draft: int | None = None) -> Image.Image:
    """Decode image bytes to RGB (grayscale, palette, CMYK, alpha all converted).

    ``max_pixels``, ``max_side``, ``max_aspect``: refuse an image whose header declares more
    pixels, a longer side or a more elongated shape, before decoding it (a few hundred KB of
    PNG can declare 13000 x 13000 pixels and take GBs to decode; a 39 KB PNG of 2,000,000 x 20
    took 1.8 GB). ``draft``: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that
    keeps both sides at least this long (the model resizes it further anyway)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # its message shows a BytesIO object, not the data
        raise BadImageError(f"cannot decode image {what}: not a recognised image format "
                            f"(starts with {data[:8]!r})") from None
    except Exception as err:  # PIL raises several types for corrupt data
        raise BadImageError(f"cannot decode image {what}: {err}") from None
    w, h = img.width, img.height
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(f"image {what} is {w} x {h} = {w * h:,} pixels, above the limit of {max_pixels:,}")
    if max_side is not None and max(w, h) > max_side:
        raise ImageTooLargeError(f"image {what} is {w} x {h} pixels: a side longer than the limit of {max_side:,}")
    if max_aspect is not None and max(w, h) > max_aspect * max(min(w, h), 1):
        raise ImageTooLargeError(f"image {what} is {w} x {h} pixels: more elongated than the limit of "
                                 f"{max_aspect:g}:1")
    if draft and img.format == "JPEG":
        img.draft("RGB", (draft, draft))
    try:
        img.load()
    except Exception as err:
        raise BadImageError(f"cannot decode image {what}: {err}") from None
    return img.convert("RGB") if img.mode != "RGB" else img
