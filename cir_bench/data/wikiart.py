"""``wikiart``: WikiArt in the ArtGAN CSV layout or the Hugging Face parquet layout
(docs/datasets.md).

ArtGAN: ``--root`` holds ``wikiart_csv/`` (style_class.txt, style_train.csv, style_val.csv,
genre_class.txt, genre_train.csv, genre_val.csv; CRLF rows ``Style_Dir/file.jpg,<idx>``) and
the images under ``wikiart/`` (or the root itself). Labels come from the class index, never
from the folder (``Art_Nouveau_Modern/`` holds ``Art_Nouveau``). Paths are used byte for
byte, with a fallback match on the NFC-normalised, case-folded file name (709 real paths
are lower-cased mojibake).

Hugging Face: ``--root`` holds ``*.parquet`` files (anywhere below it) with ``image``
(bytes) and integer ``style`` / ``genre`` columns; class names come from the schema's
``huggingface`` metadata, else ``style_<i>``.

Properties ``style`` and ``genre``. Images without a genre label get ``unknown_genre`` (the
paper's 11th genre); unknown classes are never used as condition targets. Split: a joint
seeded random ``test_fraction`` (the official style and genre splits disagree). Tags: from
an optional ``tags.csv`` sidecar (path, genre, style, media, tags), normalised as the paper
describes (fields joined by commas, "nan" and spaces removed, lower-cased, split on
commas), else the style and genre names.
"""
from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from cir_bench.data.base import BadImageError, Dataset, Item, Property, decode_image
from cir_bench.data.files import checked_options, DatasetLayoutError, FileDataset, find_file, ImageSource, \
    read_lines, require_dir

UNKNOWN_GENRE = "unknown_genre"


def _class_file(path: Path) -> list[str]:
    names: dict[int, str] = {}
    for lineno, line in enumerate(read_lines(path), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetLayoutError(f"{path}:{lineno}: expected '<index> <name>', got {line!r}")
        names[int(parts[0])] = parts[1].strip()
    if sorted(names) != list(range(len(names))):
        raise DatasetLayoutError(f"{path}: class indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def _label_rows(path: Path, n_classes: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip("\r\n")
            if ".jpg" not in line.lower() and ".png" not in line.lower():
                continue  # blank lines, headers such as "(Path to image),, (Groundtruth class)"
            fields = [x for x in line.split(",") if x.strip()]
            try:
                label = int(fields[-1])
            except (ValueError, IndexError):
                raise DatasetLayoutError(f"{path}:{lineno}: no class index in {line!r}") from None
            if not 0 <= label < n_classes:
                raise DatasetLayoutError(f"{path}:{lineno}: class index {label} outside 0..{n_classes - 1}")
            out[fields[0]] = label
    return out


def normalise_tags(fields: list[str]) -> frozenset[str]:
    """The paper's tag normalisation (docs/datasets.md)."""
    text = ",".join(f for f in fields if f and f.lower() != "nan")
    text = text.replace("nan", "").replace(" ", "")
    while ",," in text:
        text = text.replace(",,", ",")
    return frozenset(t for t in text.lower().strip(",").split(",") if t)


def _read_tags(path: Path) -> dict[str, frozenset[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = [c for c in ("genre", "style", "media", "tags") if c in (reader.fieldnames or [])]
        if "path" not in (reader.fieldnames or []):
            raise DatasetLayoutError(f"{path}: tags sidecar needs a 'path' column; has {reader.fieldnames}")
        return {row["path"]: normalise_tags([row[c] or "" for c in cols]) for row in reader}


def _split(ids: list[str], test_fraction: float, seed: int) -> dict[str, str]:
    rng = np.random.default_rng([seed, 41])
    order = rng.permutation(len(ids))
    n_test = int(round(test_fraction * len(ids)))
    test = {ids[i] for i in order[:n_test]}
    return {i: ("test" if i in test else "train") for i in ids}


def _fold(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


class WikiArtCSV(FileDataset):
    name = "wikiart"


class WikiArtParquet(Dataset):
    name = "wikiart"

    def __init__(self, properties, items, images: dict[str, bytes], report: dict) -> None:
        self.report = report
        super().__init__(properties, items)
        self._images = [images[it.id] for it in self.items]

    def load_image(self, index: int):
        return decode_image(self._images[index], f"wikiart parquet item {self.items[index].id}")

    def _content_fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for data in self._images:
            h.update(hashlib.sha256(data).digest())
        return h.hexdigest()


def _properties(style_names: list[str], genre_names: list[str], need_unknown: bool) -> list[Property]:
    genres = list(genre_names) + ([UNKNOWN_GENRE] if need_unknown and UNKNOWN_GENRE not in genre_names else [])
    unknown = tuple(g for g in genres if g == UNKNOWN_GENRE or g.lower() == "unknown genre")
    return [Property("style", tuple(style_names)), Property("genre", tuple(genres), excluded=unknown)]


def load_artgan(base: Path, test_fraction: float, seed: int, skip_bad_images: bool, tags: str | None) -> Dataset:
    csv_dir = base / "wikiart_csv" if (base / "wikiart_csv").is_dir() else base
    style_names = _class_file(find_file("wikiart", [csv_dir / "style_class.txt", csv_dir / "Style" / "style_class.txt"],
                                        "style_class.txt"))
    genre_file = find_file("wikiart", [csv_dir / "genre_class.txt", csv_dir / "genre_class",
                                       csv_dir / "Genre" / "genre_class.txt"], "genre_class.txt")
    genre_names = _class_file(genre_file)
    style: dict[str, int] = {}
    for part in ("train", "val"):
        style.update(_label_rows(find_file("wikiart", [csv_dir / f"style_{part}.csv"], f"style_{part}.csv"),
                                 len(style_names)))
    genre: dict[str, int] = {}
    for part in ("train", "val"):
        path = csv_dir / f"genre_{part}.csv"
        if path.is_file():
            genre.update(_label_rows(path, len(genre_names)))
    image_root = base / "wikiart" if (base / "wikiart").is_dir() else base
    props = _properties(style_names, genre_names, need_unknown=any(p not in genre for p in style))
    gprop = props[1]
    tag_map = _read_tags(Path(tags) if tags else base / "tags.csv") if (tags or (base / "tags.csv").is_file()) \
        else None
    ids = sorted(style)
    split_of = _split(ids, test_fraction, seed)
    folded: dict[Path, dict[str, Path]] = {}
    items, sources, matched_by_fold = [], {}, 0
    for rel in ids:
        path = image_root / rel
        if not path.is_file() and path.parent.is_dir():  # mojibake: match the normalised name
            index = folded.setdefault(path.parent, {_fold(p.name): p for p in path.parent.iterdir()})
            if _fold(path.name) in index:
                path = index[_fold(path.name)]
                matched_by_fold += 1
        g = genre.get(rel)
        labels = {"style": style[rel], "genre": g if g is not None else gprop.index(UNKNOWN_GENRE)}
        if tag_map is not None and rel in tag_map:
            tag_set = tag_map[rel]
        else:
            tag_set = frozenset({style_names[labels["style"]].lower(), gprop.classes[labels["genre"]].lower()})
        items.append(Item(rel, split_of[rel], labels, tag_set))
        sources[rel] = ImageSource(path)
    report = {"layout": "artgan-csv", "matched_by_normalised_name": matched_by_fold,
              "images_without_genre": sum(1 for r in ids if r not in genre),
              "tags": "sidecar" if tag_map is not None else "style+genre names (coarse Jaccard)"}
    ds = WikiArtCSV(props, items, sources, skip_bad_images=skip_bad_images, report=report)
    return ds


def _hf_names(schema_meta: dict | None, column: str, n: int) -> list[str]:
    try:
        info = json.loads(schema_meta[b"huggingface"])
        feat = info["info"]["features"][column]
        names = feat.get("names")
        if names and len(names) >= n:
            return list(names)
    except (KeyError, TypeError, ValueError):
        pass
    return [f"{column}_{i}" for i in range(n)]


def load_parquet(base: Path, test_fraction: float, seed: int, skip_bad_images: bool) -> Dataset:
    import pyarrow.parquet as pq

    files = sorted(base.rglob("*.parquet"))
    if not files:
        raise DatasetLayoutError(f"dataset 'wikiart': no wikiart_csv/ folder and no *.parquet file under {base}")
    rows, meta = [], None
    for f in files:
        table = pq.read_table(f)
        missing = {"image", "style", "genre"} - set(table.column_names)
        if missing:
            raise DatasetLayoutError(f"{f}: parquet lacks column(s) {sorted(missing)}; has {table.column_names}")
        meta = meta or table.schema.metadata
        for r, row in enumerate(table.select(["image", "style", "genre"]).to_pylist()):
            rows.append((f"{f.stem}/{r:06d}", row))
    n_style = 1 + max(int(r["style"]) for _, r in rows)
    n_genre = 1 + max(int(r["genre"]) for _, r in rows)
    props = _properties(_hf_names(meta, "style", n_style), _hf_names(meta, "genre", n_genre), need_unknown=False)
    ids = [i for i, _ in rows]
    split_of = _split(ids, test_fraction, seed)
    items, images, bad = [], {}, []
    for item_id, row in rows:
        data = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
        try:
            decode_image(data, item_id)
        except BadImageError:
            if not skip_bad_images:
                raise
            bad.append(item_id)
            continue
        labels = {"style": int(row["style"]), "genre": int(row["genre"])}
        tag_set = frozenset({props[0].classes[labels["style"]].lower(), props[1].classes[labels["genre"]].lower()})
        items.append(Item(item_id, split_of[item_id], labels, tag_set))
        images[item_id] = data
    report = {"layout": "huggingface-parquet", "files": [str(f) for f in files], "skipped_bad_images": len(bad),
              "tags": "style+genre names (coarse Jaccard)"}
    return WikiArtParquet(props, items, images, report)


def load(root: str | None, options: dict[str, Any]) -> Dataset:
    return _load(root, **checked_options("wikiart", _load, options))


def _load(root: str | None, test_fraction: float = 0.2, seed: int = 777, skip_bad_images: bool = False,
          tags: str | None = None, layout: str = "auto") -> Dataset:
    base = require_dir(root, "wikiart", "the folder holding wikiart_csv/ and wikiart/, or *.parquet files")
    skip = skip_bad_images
    has_csv = (base / "wikiart_csv").is_dir() or (base / "style_class.txt").is_file()
    if layout == "artgan" or (layout == "auto" and has_csv):
        return load_artgan(base, test_fraction, seed, skip, tags)
    if layout in ("auto", "parquet"):
        return load_parquet(base, test_fraction, seed, skip)
    raise ValueError(f"wikiart layout must be auto, artgan or parquet, got '{layout}'")


def check(options: dict[str, Any]) -> dict[str, Any]:
    """The options checked (names, types, fractions) without reading any file."""
    return checked_options("wikiart", _load, options)
