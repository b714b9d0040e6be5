"""Tiny replicas of the native dataset layouts (docs/datasets.md), written with PIL.

Each has a few JPEGs (one grayscale, one CMYK), a non-ASCII file name and the quirks the
loaders must survive; images carry a class-dependent colour so a model can learn a little.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(220, 40, 40), (40, 160, 60), (40, 70, 210), (230, 200, 40), (160, 40, 200), (40, 200, 200)]


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (48, 40), mode: str = "RGB",
                seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="JPEG", quality=90)


def cub(root: Path, n_classes: int = 3, per_class: int = 8) -> Path:
    """``root/CUB_200_2011/...`` with attributes.txt at the root (the tgz layout)."""
    cub = root / "CUB_200_2011"
    (cub / "attributes").mkdir(parents=True)
    attrs = ["has_bill_shape::a", "has_bill_shape::b", "has_bill_shape::c",
             "has_wing_color::x", "has_wing_color::y", "has_wing_color::z"]
    (root / "attributes.txt").write_text("".join(f"{i + 1} {a}\n" for i, a in enumerate(attrs)))
    classes, images, labels, split, boxes, attr_rows = [], [], [], [], [], []
    img_id = 0
    for c in range(n_classes):
        cname = f"{c + 1:03d}.Species_{chr(65 + c)}"
        classes.append(f"{c + 1} {cname}\n")
        for j in range(per_class):
            img_id += 1
            fname = f"Species_{chr(65 + c)}_{j:04d}.jpg" if img_id != 2 else "Espèce_été_0001.jpg"
            rel = f"{cname}/{fname}"
            mode = "L" if img_id == 3 else "CMYK" if img_id == 4 else "RGB"
            write_image(cub / "images" / rel, PALETTE[c], mode=mode, seed=img_id)
            images.append(f"{img_id} {rel}\n")
            labels.append(f"{img_id} {c + 1}\n")
            split.append(f"{img_id} {j % 2}\n")
            boxes.append(f"{img_id} 2.0 3.0 30.0 25.0\n")
            for a in range(len(attrs)):
                present = int((a % 3 == c % 3) or a == 0)  # attribute 1 is on everywhere: a frequent one
                row = f"{img_id} {a + 1} {present} 3 1.5"
                if img_id == 5 and a == 2:
                    row += " 0"  # the stray extra token some real lines carry
                attr_rows.append(row + "\n")
    (cub / "classes.txt").write_text("".join(classes))
    (cub / "images.txt").write_text("".join(images), encoding="utf-8")
    (cub / "image_class_labels.txt").write_text("".join(labels))
    (cub / "train_test_split.txt").write_text("".join(split))
    (cub / "bounding_boxes.txt").write_text("".join(boxes))
    (cub / "attributes" / "image_attribute_labels.txt").write_text("".join(attr_rows))
    return root


def apy(root: Path, per_class: int = 6) -> Path:
    ann = root / "attribute_data"
    ann.mkdir(parents=True)
    classes = ["aeroplane", "bicycle", "bird", "donkey"]
    (ann / "class_names.txt").write_text("\n".join(classes) + "\n")
    attr_names = ["2D Boxy", "Foot/Shoe", "Furn. Seat", "Wing"]
    (ann / "attribute_names.txt").write_text("\n".join(attr_names) + "\n")
    jpg = root / "VOCdevkit" / "VOC2008" / "JPEGImages"
    rows = {"apascal_train.txt": [], "apascal_test.txt": []}
    n = 0
    for c, cname in enumerate(classes[:3]):
        for j in range(per_class):
            n += 1
            fname = f"2008_{n:06d}.jpg"
            mode = "L" if n == 1 else "CMYK" if n == 2 else "RGB"
            write_image(jpg / fname, PALETTE[c], size=(64, 48), mode=mode, seed=n)
            attrs = [int(k == c) for k in range(4)] if n != 3 else [0, 0, 0, 0]  # one all-zero row
            box = "5 4 40 30" if n != 4 else "20 10 90 70"  # one box past the image edge
            split = "apascal_train.txt" if j % 2 == 0 else "apascal_test.txt"
            rows[split].append(f"{fname} {cname} {box} {' '.join(map(str, attrs))}\n")
    # an image with two objects, and a zero-area box
    rows["apascal_test.txt"].append(f"2008_{1:06d}.jpg bird 10 10 30 30 0 0 0 1\n")
    rows["apascal_train.txt"].append(f"2008_{5:06d}.jpg aeroplane 12 12 12 30 1 0 0 0\n")
    for name, lines in rows.items():
        (ann / name).write_text("".join(lines))
    ya = root / "ayahoo_test_images"
    write_image(ya / "donkey_1.jpg", PALETTE[3], seed=99)
    (ann / "ayahoo_test.txt").write_text("donkey_1.jpg donkey 1 1 40 30 0 1 0 0\n")
    return root


def csv_folder(root: Path, n_per: int = 6) -> Path:
    lines = ["path,style,genre,tags,split\r\n"]  # CRLF on purpose
    k = 0
    for s, style in enumerate(["Baroque", "Rococo", "Cubism"]):
        for g, genre in enumerate(["portrait", "landscape"]):
            for j in range(n_per):
                k += 1
                name = f"img/{style}/{genre}_{j}.jpg" if k != 2 else "img/Rococo/naïve_été.jpg"
                write_image(root / name, PALETTE[s], mode="L" if k == 3 else "RGB", seed=k)
                split = "test" if j % 3 == 0 else "train"
                lines.append(f"{name},{style},{genre},{style.lower()}|{genre}|oil,{split}\r\n")
    (root / "labels.csv").write_bytes("".join(lines).encode("utf-8"))
    return root


WIKI_STYLES = ["Art_Nouveau", "Baroque", "Rococo"]
WIKI_GENRES = ["landscape", "portrait"]


def wikiart_artgan(root: Path, per: int = 5) -> Path:
    """ArtGAN layout: CRLF CSVs, the Art_Nouveau_Modern folder, mojibake and NFD names,
    images without a genre label, and a tags.csv sidecar."""
    import unicodedata

    csv_dir = root / "wikiart_csv"
    csv_dir.mkdir(parents=True)
    (csv_dir / "style_class.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(WIKI_STYLES)))
    (csv_dir / "genre_class.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(WIKI_GENRES)))
    style_rows, genre_rows, tag_rows = [], [], ["path,genre,style,media,tags\n"]
    k = 0
    for s, style in enumerate(WIKI_STYLES):
        folder = "Art_Nouveau_Modern" if style == "Art_Nouveau" else style
        for j in range(per * 2):
            k += 1
            g = j % 2
            rel = f"{folder}/artist-{k}_painting-{j}.jpg"
            disk = rel
            if k == 2:  # lower-cased mojibake in the CSV, original case on disk
                rel, disk = f"{folder}/grã©goire-{k}.jpg", f"{folder}/GRã©GOIRE-{k}.jpg"
            if k == 3:  # NFC in the CSV, NFD on disk
                rel = f"{folder}/café-{k}.jpg"
                disk = unicodedata.normalize("NFD", rel)
            write_image(root / "wikiart" / disk, PALETTE[s], mode="CMYK" if k == 4 else "RGB", seed=k)
            style_rows.append(f"{rel},{s}\r\n")
            if k % 7 != 0:  # some images have no genre label
                genre_rows.append(f"{rel},{g}\r\n")
            tag_rows.append(f"{rel},{WIKI_GENRES[g]},{style},oil on canvas,\"Flowers, nan, Woman\"\n")
    half = len(style_rows) // 2
    (csv_dir / "style_train.csv").write_bytes("".join(style_rows[:half]).encode())
    (csv_dir / "style_val.csv").write_bytes("".join(style_rows[half:]).encode())
    (csv_dir / "genre_train.csv").write_bytes("".join(genre_rows[1::2]).encode())
    (csv_dir / "genre_val.csv").write_bytes("".join(genre_rows[0::2]).encode())
    (root / "tags.csv").write_text("".join(tag_rows), encoding="utf-8")
    return root


def wikiart_parquet(root: Path, n: int = 30) -> Path:
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    images, styles, genres = [], [], []
    for i in range(n):
        s, g = i % 3, i % 2
        buf = io.BytesIO()
        Image.fromarray(np.full((24, 24, 3), PALETTE[s], np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        styles.append(s)
        genres.append(g if i % 5 else 2)
    features = {"image": {"_type": "Image"},
                "style": {"_type": "ClassLabel", "names": WIKI_STYLES},
                "genre": {"_type": "ClassLabel", "names": WIKI_GENRES + ["Unknown Genre"]}}
    table = pa.table({"image": images, "style": styles, "genre": genres})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    (root / "data").mkdir()
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    return root


DOMAIN_NAMES = ("photo", "sketch", "cartoon")
DOMAIN_CLASSES = ("cat", "dog", "car")


def domains(root: Path, layout: str = "separate", per_pair: int = 6, train_list: bool = False) -> Path:
    """The file lists of the domain-conversion literature (``path domain class`` lines):
    ``separate`` (query_files.csv + database_files.csv) or ``full`` (full_files.csv), with
    3 domains x 3 classes x ``per_pair`` images under ``<root>/imgs/<domain>/<class>/``.
    Colour says the class, brightness the domain, so a small model learns both."""
    lines: dict[str, list[str]] = {"query": [], "database": [], "full": [], "train": []}
    for d, domain in enumerate(DOMAIN_NAMES):
        for c, klass in enumerate(DOMAIN_CLASSES):
            for j in range(per_pair):
                rel = f"imgs/{domain}/{klass}/{domain}_{j:03d}.jpg"
                color = tuple(int(v * (0.45 + 0.3 * d)) for v in PALETTE[c])
                write_image(root / rel, color, seed=100 * d + 10 * c + j)
                line = f"{rel} {domain} {klass}"
                if layout == "full":
                    lines["full"].append(line)
                else:
                    lines["query" if j == 0 else "database"].append(line)
            if train_list:
                for j in range(per_pair):
                    rel = f"train/{domain}/{klass}/{j:03d}.jpg"
                    write_image(root / rel, tuple(int(v * (0.45 + 0.3 * d)) for v in PALETTE[c]),
                                seed=1000 + 100 * d + 10 * c + j)
                    lines["train"].append(f"{rel} {domain} {klass}")
    for name, rows in lines.items():
        if rows:
            (root / f"{name}_files.csv").write_text("".join(r + "\n" for r in rows))
    return root
