"""``apy``: aPascal (and optionally aYahoo) objects from the attribute release (docs/datasets.md).

``--root`` holds ``attribute_data/`` (apascal_train.txt, apascal_test.txt, ayahoo_test.txt,
class_names.txt, attribute_names.txt), ``VOCdevkit/VOC2008/JPEGImages/`` and, for aYahoo,
``ayahoo_test_images/``. One item per annotation row (an object), cropped by its box:
coordinates are 1-based inclusive (VOC), clipped to the image; boxes that are empty after
clipping are skipped and counted in the report. Property ``category``: the class names of
class_names.txt that occur in the loaded rows, in file order. Tags: the present attributes
(names read from attribute_names.txt, whole lines) plus the class. Split: the official
aPascal train/test files; aYahoo rows (``include_ayahoo=true``) are test items.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from cir_bench.data.base import Item, Property
from cir_bench.data.files import checked_options, DatasetLayoutError, FileDataset, find_file, ImageSource, \
    read_lines, require_dir


class APY(FileDataset):
    name = "apy"
    square_resize = True  # object crops are resized to a square, never cropped again

    @classmethod
    def load(cls, root: str | Path | None, include_ayahoo: bool = False, skip_bad_images: bool = False) -> "APY":
        base = require_dir(root, "apy", "the folder holding attribute_data/ and VOCdevkit/")
        ann = base / "attribute_data" if (base / "attribute_data").is_dir() else base
        class_names = read_lines(find_file("apy", [ann / "class_names.txt"], "attribute_data/class_names.txt"))
        attr_names = [n.strip() for n in read_lines(find_file("apy", [ann / "attribute_names.txt"],
                                                              "attribute_data/attribute_names.txt"))]
        files = [("apascal_train.txt", "train", base / "VOCdevkit" / "VOC2008" / "JPEGImages"),
                 ("apascal_test.txt", "test", base / "VOCdevkit" / "VOC2008" / "JPEGImages")]
        if include_ayahoo:
            files.append(("ayahoo_test.txt", "test", base / "ayahoo_test_images"))
        rows = []
        n_attr = len(attr_names)
        for fname, split, folder in files:
            path = find_file("apy", [ann / fname], f"attribute_data/{fname}")
            for lineno, line in enumerate(read_lines(path), 1):
                tok = line.split()
                if len(tok) != 6 + n_attr:
                    raise DatasetLayoutError(f"{path}:{lineno}: expected {6 + n_attr} fields (file, class, 4 box "
                                             f"coordinates, {n_attr} attributes), got {len(tok)}")
                if tok[1] not in class_names:
                    raise DatasetLayoutError(f"{path}:{lineno}: class '{tok[1]}' is not in class_names.txt")
                try:
                    box = tuple(float(v) for v in tok[2:6])
                    attrs = [int(float(v)) for v in tok[6:]]
                except ValueError:
                    raise DatasetLayoutError(f"{path}:{lineno}: non-numeric box or attribute value") from None
                rows.append((fname, lineno, split, folder / tok[0], tok[1], box, attrs))
        used = [c for c in class_names if any(r[4] == c for r in rows)]
        prop = Property("category", tuple(used))
        items, sources, degenerate = [], {}, []
        size_cache: dict[Path, tuple[int, int]] = {}
        for fname, lineno, split, img_path, cls_name, (x1, y1, x2, y2), attrs in rows:
            # VOC boxes are 1-based inclusive; clip to the image, then a box whose min and max
            # coincide (a line or a point, as on some aYahoo rows) is degenerate
            if img_path.is_file():
                if img_path not in size_cache:
                    with Image.open(img_path) as im:
                        size_cache[img_path] = im.size
                w, h = size_cache[img_path]
                x1, y1, x2, y2 = max(1.0, x1), max(1.0, y1), min(float(w), x2), min(float(h), y2)
            if x2 <= x1 or y2 <= y1:
                degenerate.append(f"{fname}:{lineno}")
                continue
            box = (x1 - 1, y1 - 1, x2, y2)  # as a PIL crop
            item_id = f"{Path(fname).stem}/{lineno:05d}_{cls_name}_{img_path.stem}"
            tags = frozenset({attr_names[j] for j, v in enumerate(attrs) if v == 1} | {cls_name})
            items.append(Item(item_id, split, {"category": prop.index(cls_name)}, tags))
            sources[item_id] = ImageSource(img_path, box)
        report = {"degenerate_boxes_skipped": len(degenerate), "degenerate_examples": degenerate[:10],
                  "n_objects": len(items), "include_ayahoo": include_ayahoo}
        return cls([prop], items, sources, skip_bad_images=skip_bad_images, report=report)


def load(root: str | None, options: dict[str, Any]) -> APY:
    return APY.load(root, **checked_options("apy", APY.load, options))


def check(options: dict[str, Any]) -> dict[str, Any]:
    """The options checked (names, types, fractions) without reading any file."""
    return checked_options("apy", APY.load, options)
