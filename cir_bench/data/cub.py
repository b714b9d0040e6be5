"""``cub``: CUB-200-2011 read from the released files (docs/datasets.md).

``--root`` is the folder holding ``CUB_200_2011/`` (or that folder itself). Everything is
joined by image id, never by line order (the authors' code shifts attributes by one image;
docs/deviations.md, D15). Property ``bird`` (species, names from classes.txt). Tags: the
present attributes minus the most frequent ones (those whose frequency over the images is
above the ``tag_quantile`` quantile of attribute frequencies, computed on the data), plus
the species. Split: stratified ``test_fraction`` by species with a seed (the paper), or the
official ``train_test_split.txt`` (``split=official``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cir_bench.data.base import Item, Property
from cir_bench.data.files import checked_options, DatasetLayoutError, FileDataset, find_file, ImageSource, \
    read_lines, require_dir


def _id_table(path: Path, what: str, n_fields: int = 2) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for lineno, line in enumerate(read_lines(path), 1):
        parts = line.split(maxsplit=n_fields - 1)
        if len(parts) < n_fields or not parts[0].isdigit():
            raise DatasetLayoutError(f"{path}:{lineno}: malformed {what} line {line!r}")
        out[int(parts[0])] = parts[1:]
    return out


class CUB(FileDataset):
    name = "cub"

    @classmethod
    def load(cls, root: str | Path | None, split: str = "stratified", test_fraction: float = 0.3, seed: int = 42,
             tag_quantile: float = 0.8, crop_to_box: bool = False, skip_bad_images: bool = False) -> "CUB":
        base = require_dir(root, "cub", "the folder holding CUB_200_2011/")
        cub = base / "CUB_200_2011" if (base / "CUB_200_2011").is_dir() else base
        need = {n: cub / n for n in ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")}
        for n, p in need.items():
            find_file("cub", [p], n)
        paths = {i: v[0] for i, v in _id_table(need["images.txt"], "images.txt").items()}
        classes = _id_table(need["classes.txt"], "classes.txt")
        labels = _id_table(need["image_class_labels.txt"], "image_class_labels.txt")
        official = _id_table(need["train_test_split.txt"], "train_test_split.txt")
        class_ids = sorted(classes)
        species = tuple(classes[c][0] for c in class_ids)
        prop = Property("bird", species)
        col = {c: i for i, c in enumerate(class_ids)}

        # attribute names: attributes.txt (root, CUB_200_2011/ or its attributes/), else attr_<id>
        names_file = next((p for p in (base / "attributes.txt", cub / "attributes.txt",
                                       cub / "attributes" / "attributes.txt") if p.is_file()), None)
        attr_names = {i: v[0] for i, v in _id_table(names_file, "attributes.txt").items()} if names_file else {}
        labels_file = find_file("cub", [cub / "attributes" / "image_attribute_labels.txt"],
                                "attributes/image_attribute_labels.txt")
        present: dict[int, set[int]] = {i: set() for i in paths}
        for lineno, line in enumerate(read_lines(labels_file), 1):
            tok = line.split()  # tolerant: extra tokens on some lines are ignored
            if len(tok) < 3:
                raise DatasetLayoutError(f"{labels_file}:{lineno}: expected 'image attribute is_present ...'")
            img, attr, is_present = int(tok[0]), int(tok[1]), tok[2]
            if img not in present:
                raise DatasetLayoutError(f"{labels_file}:{lineno}: image id {img} is not in images.txt")
            if is_present == "1":
                present[img].add(attr)
        n_images = max(len(paths), 1)
        attr_ids = sorted({a for s in present.values() for a in s} | set(attr_names))
        freq = np.array([sum(a in s for s in present.values()) / n_images for a in attr_ids])
        cutoff = float(np.quantile(freq, tag_quantile)) if len(freq) else 0.0
        common = {a for a, f in zip(attr_ids, freq) if f > cutoff}

        ids = sorted(paths)
        for i in ids:
            if i not in labels:
                raise DatasetLayoutError(f"{need['image_class_labels.txt']}: no class for image id {i}")
            if int(labels[i][0]) not in col:
                raise DatasetLayoutError(f"{need['image_class_labels.txt']}: image {i} has class id "
                                         f"{labels[i][0]}, which classes.txt does not define")
        y = np.array([col[int(labels[i][0])] for i in ids])
        if split == "official":
            split_of = {i: ("train" if official[i][0] == "1" else "test") for i in ids}
        elif split == "stratified":
            from sklearn.model_selection import train_test_split

            train_ids, _ = train_test_split(ids, test_size=test_fraction, random_state=seed, stratify=y)
            train_set = set(train_ids)
            split_of = {i: ("train" if i in train_set else "test") for i in ids}
        else:
            raise ValueError(f"cub split must be 'stratified' or 'official', got '{split}'")

        boxes: dict[int, tuple[float, float, float, float]] = {}
        if crop_to_box:
            box_file = find_file("cub", [cub / "bounding_boxes.txt"], "bounding_boxes.txt")
            for i, v in _id_table(box_file, "bounding_boxes.txt").items():
                try:
                    x, y0, w, h = (float(t) for t in v[0].split())
                except ValueError:
                    raise DatasetLayoutError(f"{box_file}: image {i}: expected 'x y width height'") from None
                boxes[i] = (x, y0, x + w, y0 + h)
            missing_boxes = [i for i in ids if i not in boxes]
            if missing_boxes:
                raise DatasetLayoutError(f"{box_file}: no box for image id {missing_boxes[0]}")
        items, sources = [], {}
        for i, label in zip(ids, y):
            item_id = paths[i]
            tags = {attr_names.get(a, f"attr_{a}") for a in present[i] - common} | {species[label]}
            items.append(Item(item_id, split_of[i], {"bird": int(label)}, frozenset(tags)))
            sources[item_id] = ImageSource(cub / "images" / paths[i], boxes.get(i))
        report = {"attribute_names": str(names_file) if names_file else "missing: attr_<id> names used",
                  "tag_frequency_cutoff": cutoff, "n_frequent_attributes_dropped": len(common)}
        return cls([prop], items, sources, skip_bad_images=skip_bad_images, report=report)


def load(root: str | None, options: dict[str, Any]) -> CUB:
    return CUB.load(root, **checked_options("cub", CUB.load, options))


def check(options: dict[str, Any]) -> dict[str, Any]:
    """The options checked (names, types, fractions) without reading any file."""
    return checked_options("cub", CUB.load, options)
