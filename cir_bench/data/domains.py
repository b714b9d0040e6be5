"""``domains``: the file lists of the domain-conversion literature (FreeDom, BASIC): ImageNet-R,
MiniDomainNet, NICO++, LTLL, or any collection laid out the same way (docs/datasets.md).

    <root>/query_files.csv + <root>/database_files.csv    separate query and database lists
    <root>/full_files.csv                                 or one list: every image queries the rest
    <root>/train_files.csv                                optional: labelled images to train on
    <root>/<path>                                         the images, paths relative to the root
                                                          (or to ``images``, e.g. ``..``)

Each line is ``path domain class``: the last two whitespace-separated fields are the domain
and the class (names without spaces), the rest is the path. FreeDom's lists sit in
``data/<set>/`` and name paths from ``data/`` (``nico/autumn/...``): ``images: ..``. Properties: ``domain`` and ``class``; the protocol's class is ``class`` and its
domain ``domain``, so a correct result has the query's class and the target domain.

The published lists evaluate training-free methods; cir-bench's heads need labelled images
to train on. Without a train list, a seeded ``train_fraction`` of the database list (of the
full list) is set aside for training, by a hash of the path, and leaves the evaluation;
the manifest counts it. The queries of a query list are never used for training.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cir_bench.data.base import Item, Property
from cir_bench.data.files import DatasetLayoutError, FileDataset, ImageSource, checked_options, read_lines, \
    require_dir

LAYOUT = "query_files.csv + database_files.csv, or full_files.csv (lines 'path domain class')"


class Domains(FileDataset):
    name = "domains"
    class_key = "class"
    domain_property = "domain"

    def __init__(self, properties: Sequence[Property], items: Sequence[Item], sources: dict[str, ImageSource],
                 full_list: bool, skip_bad_images: bool = False, report: dict | None = None) -> None:
        super().__init__(properties, items, sources, skip_bad_images, report)
        self.full_list = full_list

    def split_indices(self, split: str) -> np.ndarray:
        """With one full list, ``query`` and ``database`` are both the full list."""
        if self.full_list and split in ("query", "database"):
            split = "full"
        return super().split_indices(split)

    def default_query_sets(self) -> list[list[str]]:
        return [["domain"]]

    @classmethod
    def load(cls, root: str | Path | None, query: str = "query_files.csv", database: str = "database_files.csv",
             full: str = "full_files.csv", train: str = "train_files.csv", train_fraction: float = 0.5,
             seed: int = 0, images: str = "", skip_bad_images: bool = False) -> "Domains":
        base = require_dir(root, "domains", f"a folder with {LAYOUT}")
        image_base = (base / images).resolve() if images else base
        if not image_base.is_dir():
            raise DatasetLayoutError(f"dataset 'domains': options.images {images!r} is not a folder ({image_base})")
        q_path, d_path, f_path, t_path = (base / query, base / database, base / full, base / train)
        if q_path.is_file() and d_path.is_file():
            lists = {"query": _read_list(q_path), "database": _read_list(d_path)}
            carve_from, full_list = "database", False
        elif f_path.is_file():
            lists = {"full": _read_list(f_path)}
            carve_from, full_list = "full", True
        else:
            raise DatasetLayoutError(f"dataset 'domains': no file list in {base}; expected {LAYOUT} "
                                     f"(looked for {q_path.name}, {d_path.name}, {f_path.name})")
        report: dict[str, Any] = {"lists": {name: len(rows) for name, rows in lists.items()}}
        if t_path.is_file():
            lists["train"] = _read_list(t_path)
            report["train"] = f"{t_path.name}: {len(lists['train'])} images"
        else:
            kept, carved = [], []
            for row in lists[carve_from]:
                (carved if _hash_fraction(row[0], seed) < train_fraction else kept).append(row)
            lists[carve_from], lists["train"] = kept, carved
            report["train"] = (f"no {t_path.name}: {len(carved)} images of {carve_from} list (train_fraction "
                               f"{train_fraction}, seed {seed}) set aside for training")
        seen: dict[str, str] = {}
        for split, rows in lists.items():
            for path, *_ in rows:
                if path in seen:
                    raise DatasetLayoutError(f"dataset 'domains': {path} is in both the {seen[path]} and the "
                                             f"{split} list")
                seen[path] = split
        rows_all = [row for rows in lists.values() for row in rows]
        first = rows_all[0][0]
        if not (image_base / first).exists() and not images and (base.parent / first).exists():
            raise DatasetLayoutError(f"dataset 'domains': {first} is not under {base} but under {base.parent}: the "
                                     "lists name paths from the parent folder (FreeDom's layout); pass "
                                     "--set dataset.options.images=..")
        properties = [Property("domain", tuple(sorted({r[1] for r in rows_all}))),
                      Property("class", tuple(sorted({r[2] for r in rows_all})))]
        items, sources = [], {}
        for split, rows in lists.items():
            for path, domain, klass in rows:
                items.append(Item(path, split, {"domain": properties[0].index(domain),
                                                "class": properties[1].index(klass)},
                                  frozenset({f"domain:{domain}", f"class:{klass}"})))
                sources[path] = ImageSource(image_base / path)
        return cls(properties, items, sources, full_list, skip_bad_images=skip_bad_images, report=report)


def _read_list(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for n, line in enumerate(read_lines(path), 1):
        fields = line.strip().rsplit(None, 2)
        if len(fields) != 3:
            raise DatasetLayoutError(f"dataset 'domains': {path} line {n} has {len(fields)} fields, expected "
                                     f"'path domain class': {line[:120]!r}")
        if Path(fields[0]).is_absolute() or ".." in Path(fields[0]).parts:
            raise DatasetLayoutError(f"dataset 'domains': {path} line {n}: the path {fields[0]!r} must be relative "
                                     "to the image folder and stay inside it")
        rows.append((fields[0], fields[1], fields[2]))
    if not rows:
        raise DatasetLayoutError(f"dataset 'domains': {path} lists no image")
    return rows


def _hash_fraction(path: str, seed: int) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "big") / 2 ** 64


def load(root: str | None, options: dict[str, Any]) -> Domains:
    return Domains.load(root, **checked_options("domains", Domains.load, options))


def check(options: dict[str, Any]) -> dict[str, Any]:
    """The options checked (names, types, fractions) without reading any file."""
    return checked_options("domains", Domains.load, options)
