"""``csv``: a folder of images plus a CSV, how users bring their own labelled data.

    <root>/labels.csv      path,style,genre[,tags][,split][,id]
    <root>/<path>          the images, paths relative to the root (or absolute)

Every column other than path / tags / split / id is a labelled property (or name them
with ``properties``); class names are the values found, sorted. ``tags`` holds the tag set
separated by ``|`` (or ``tags_sep``); without it the tags are ``property:value``. Without a
``split`` column the split is a seeded random ``test_fraction``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cir_bench.data.base import Item, Property
from cir_bench.data.files import checked_options, DatasetLayoutError, FileDataset, find_file, ImageSource, require_dir


class CSVFolder(FileDataset):
    name = "csv"

    @classmethod
    def load(cls, root: str | Path | None, csv: str | None = None, properties: Sequence[str] | None = None,
             path_column: str = "path", tags_column: str = "tags", tags_sep: str = "|",
             split_column: str = "split", id_column: str = "id", test_fraction: float = 0.3, seed: int = 0,
             skip_bad_images: bool = False) -> "CSVFolder":
        base = require_dir(root, "csv", "a folder with the images and labels.csv")
        table = find_file("csv", [Path(csv) if csv and Path(csv).is_absolute() else base / (csv or "labels.csv")],
                          "the labels CSV")
        try:
            frame = pd.read_csv(table, dtype=str, keep_default_na=False, encoding="utf-8")
        except Exception as err:
            raise DatasetLayoutError(f"dataset 'csv': cannot parse {table}: {err}") from None
        if path_column not in frame.columns:
            raise DatasetLayoutError(f"dataset 'csv': {table} has no '{path_column}' column; columns: "
                                     f"{list(frame.columns)}")
        reserved = {path_column, tags_column, split_column, id_column}
        props = list(properties) if properties else [c for c in frame.columns if c not in reserved]
        unknown = [p for p in props if p not in frame.columns]
        if unknown or not props:
            raise DatasetLayoutError(f"dataset 'csv': property column(s) {unknown or '(none)'} not in {table}; "
                                     f"columns: {list(frame.columns)}")
        for p in props:
            empty = frame.index[frame[p].str.strip() == ""]
            if len(empty):
                raise DatasetLayoutError(f"dataset 'csv': {table} row {int(empty[0]) + 2} has no value for "
                                         f"property '{p}'")
        properties_ = [Property(p, tuple(sorted(frame[p].str.strip().unique()))) for p in props]
        if split_column in frame.columns:
            splits = frame[split_column].str.strip().str.lower().replace({"val": "test", "valid": "test"})
            bad = sorted(set(splits) - {"train", "test"})
            if bad:
                raise DatasetLayoutError(f"dataset 'csv': split values {bad} in {table}; use train/test")
        else:
            rng = np.random.default_rng([seed, 31])
            splits = pd.Series(np.where(rng.uniform(size=len(frame)) < test_fraction, "test", "train"))
        ids = frame[id_column] if id_column in frame.columns else frame[path_column]
        items, sources = [], {}
        for i, row in frame.reset_index(drop=True).iterrows():
            labels = {p.name: p.index(row[p.name].strip()) for p in properties_}
            if tags_column in frame.columns and row[tags_column].strip():
                tags = frozenset(t.strip() for t in row[tags_column].split(tags_sep) if t.strip())
            else:
                tags = frozenset(f"{p.name}:{row[p.name].strip()}" for p in properties_)
            item_id = str(ids.iloc[i])
            path = Path(row[path_column])
            sources[item_id] = ImageSource(path if path.is_absolute() else base / path)
            items.append(Item(item_id, str(splits.iloc[i]), labels, tags))
        return cls(properties_, items, sources, skip_bad_images=skip_bad_images)


def load(root: str | None, options: dict[str, Any]) -> CSVFolder:
    return CSVFolder.load(root, **checked_options("csv", CSVFolder.load, options))


def check(options: dict[str, Any]) -> dict[str, Any]:
    """The options checked (names, types, fractions) without reading any file."""
    return checked_options("csv", CSVFolder.load, options)
