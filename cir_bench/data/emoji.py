"""Emoji: the same content drawn by several vendors, with exact "this one in another style"
targets (docs/datasets.md).

Source: the emoji-datasource-<vendor> packages of the npm registry (16.0.0), fetched with npm
and checked against the sha512 pinned below (cir_bench.data.npm_packages), or given as
tarballs / unpacked packages with ``--root``. Each has ``emoji.json`` (1,911 emoji with their
code, name, short names, category, subcategory and skin-tone variations) and
``img/<vendor>/64/<code>.png`` (RGBA, 64 × 64).

- Items: one per (vendor, emoji, skin tone) image the vendor has (``has_img_<vendor>``); what
  is skipped is counted in ``report`` (the run manifest).
- Properties: ``vendor`` (the style), ``skin_tone`` (none, light, medium-light, medium,
  medium-dark, dark; an emoji with two different tones is labelled ``mixed``, which is never a
  condition target), ``category``, ``subcategory``.
- Tags: the short names and the words of the name.
- Exact factors: group = the emoji (its base code), factors vendor, skin tone and emoji, so a
  Google grinning face queried with vendor = twitter has one twin: Twitter's grinning face.
- Splits: seeded, by emoji: no emoji is in both train and test, otherwise the heads would have
  seen the test twins' content in another style.
- Images are composited on a fixed background (``background``, white) and kept at 64 × 64.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from cir_bench.data.base import BadImageError, Dataset, Item, Property
from cir_bench.data.npm_packages import NpmPackage, obtain

VERSION = "16.0.0"
# dist.integrity of each package at VERSION, as the registry published it
INTEGRITY = {
    "google": "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    "twitter": "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    "apple": "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw==",
    "facebook": "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
}
LICENCES = {  # as the packages' README states them
    "google": "Noto Emoji images, Apache-2.0",
    "twitter": "Twemoji images, CC-BY 4.0",
    "apple": "Apple's images, © Apple Inc., not licensed for commercial usage",
    "facebook": "Facebook's images, © Facebook, Inc., no clear licensing",
}
OPEN_VENDORS = ("google", "twitter")
# Three styles: the two openly licensed packages and Apple's. OpenMoji (CC-BY-SA) ships SVG
# only, which would need an SVG renderer; a user who wants only open images sets the vendors.
DEFAULT_VENDORS = ("google", "twitter", "apple")
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark",
              "1F3FF": "dark"}
TONE_CLASSES = ("none", "light", "medium-light", "medium", "medium-dark", "dark", "mixed")


def package(vendor: str, integrity: str | None = None) -> NpmPackage:
    """The npm package of one vendor's images (``integrity`` for packages not pinned here)."""
    pinned = integrity or INTEGRITY.get(vendor)
    if pinned is None:
        raise ValueError(f"dataset 'emoji': no pinned integrity for vendor '{vendor}' (pinned: "
                         f"{', '.join(INTEGRITY)}); give it as options.integrity.{vendor}")
    return NpmPackage(f"emoji-datasource-{vendor}", VERSION, pinned, ("emoji.json", f"img/{vendor}/64/"),
                      LICENCES.get(vendor, "see the package's README"))


class Emoji(Dataset):
    name = "emoji"
    context_factors = ("vendor", "skin_tone", "emoji")
    image_size = 64
    class_key = "emoji"  # a correct result is the query's emoji ...
    domain_property = "vendor"  # ... drawn by the target vendor

    def __init__(self, properties: Sequence[Property], items: Sequence[Item], images: dict[str, Path],
                 background: tuple[int, int, int], report: dict[str, Any], content_id: str) -> None:
        super().__init__(properties, items)
        self._images = images
        self._background = background
        self.report = report
        self._content_id = content_id

    def _content_fingerprint(self) -> str:
        """The packages' pinned sha512 and the background: the images' bytes, without reading them."""
        return hashlib.sha256(f"{self._content_id}|{self._background}".encode()).hexdigest()

    def load_image(self, index: int) -> Image.Image:
        item = self.items[index]
        path = self._images[item.id]
        try:
            with Image.open(path) as img:
                rgba = img.convert("RGBA")
        except (OSError, ValueError) as err:
            raise BadImageError(f"cannot read image {path} of item {item.id}: {err}") from None
        canvas = Image.new("RGBA", rgba.size, (*self._background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")

    @classmethod
    def from_folders(cls, folders: dict[str, Path], test_fraction: float = 0.3, seed: int = 0,
                     background: Sequence[int] = (255, 255, 255), content_id: str = "") -> "Emoji":
        """The dataset from unpacked packages (vendor -> folder holding emoji.json and img/);
        ``content_id``: what identifies their images (the packages' integrity)."""
        vendors = list(folders)
        entries = _read_entries(next(iter(folders.values())) / "emoji.json")
        rows, skipped = [], {v: 0 for v in vendors}
        for entry in entries:
            variants = [(entry, "none")]
            for key, variant in (entry.get("skin_variations") or {}).items():
                tones = {SKIN_TONES.get(code) for code in key.split("-")}
                variants.append((variant, tones.pop() if len(tones) == 1 and None not in tones else "mixed"))
            for vendor in vendors:
                for variant, tone in variants:
                    if not variant.get(f"has_img_{vendor}", False):
                        skipped[vendor] += 1
                        continue
                    rows.append((vendor, entry, variant, tone))
        categories = sorted({e["category"] for e in entries})
        subcategories = sorted({e["subcategory"] for e in entries})
        props = [Property("vendor", tuple(vendors)), Property("skin_tone", TONE_CLASSES, excluded=("mixed",)),
                 Property("category", tuple(categories)), Property("subcategory", tuple(subcategories))]
        items, images = [], {}
        for vendor, entry, variant, tone in rows:
            item_id = f"{vendor}/{variant['unified'].lower()}"
            group = entry["unified"].lower()
            words = {w for w in re.split(r"[^a-z0-9]+", entry["name"].lower()) if w}
            items.append(Item(item_id, _split(group, seed, test_fraction),
                              {"vendor": vendors.index(vendor), "skin_tone": TONE_CLASSES.index(tone),
                               "category": categories.index(entry["category"]),
                               "subcategory": subcategories.index(entry["subcategory"])},
                              frozenset(entry.get("short_names") or []) | words,
                              {"vendor": vendor, "skin_tone": tone, "emoji": group}, group))
            images[item_id] = folders[vendor] / "img" / vendor / "64" / variant["image"]
        report = {"vendors": vendors, "package_version": VERSION, "licences": {v: LICENCES.get(v) for v in vendors},
                  "images_the_vendor_lacks": skipped}
        return cls(props, items, images, tuple(int(c) for c in background), report, content_id)

    def default_query_sets(self) -> list[list[str]]:
        """Domain conversion (vendor), attribute change (skin tone), both together."""
        return [["vendor"], ["skin_tone"], ["vendor", "skin_tone"]]


def _read_entries(path: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"dataset 'emoji': cannot read {path}: {err}") from None
    need = ("unified", "image", "name", "category", "subcategory")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and all(k in e for k in need) for e in entries):
        raise ValueError(f"dataset 'emoji': {path} is not an emoji-datasource emoji.json (a list of objects with "
                         f"{', '.join(need)})")
    return entries


def _split(group: str, seed: int, test_fraction: float) -> str:
    """train or test for a whole emoji, from a hash of (seed, emoji): stable across vendors."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2 ** 64
    return "test" if h < test_fraction else "train"


OPTIONS = {"vendors": (list, tuple), "test_fraction": (float, int), "seed": (int,), "background": (list, tuple),
           "integrity": (dict,)}


def check(options: dict[str, Any]) -> dict[str, Any]:
    """The options checked (names, types) without reading or fetching anything."""
    for key, value in options.items():
        if key not in OPTIONS:
            raise ValueError(f"dataset 'emoji': unknown option '{key}'; valid: {', '.join(OPTIONS)}")
        if not isinstance(value, OPTIONS[key]) or isinstance(value, bool):
            raise ValueError(f"dataset 'emoji': option '{key}' has the wrong type ({type(value).__name__})")
    vendors = list(options.get("vendors", DEFAULT_VENDORS))
    if len(vendors) < 2 or len(set(vendors)) != len(vendors):
        raise ValueError(f"dataset 'emoji': options.vendors needs at least two different vendors, got {vendors}")
    if not 0 < float(options.get("test_fraction", 0.3)) < 1:
        raise ValueError("dataset 'emoji': options.test_fraction must be in (0, 1)")
    return options


def load(root: str | None, options: dict[str, Any], cache_dir: str | Path | None = None) -> Emoji:
    """Fetch (or take from ``root``) the vendors' packages, then build the dataset."""
    from cir_bench.paths import cache_root

    check(options)
    vendors = list(options.get("vendors", DEFAULT_VENDORS))
    integrity = dict(options.get("integrity") or {})
    folders, pins = {}, {}
    closed = [v for v in vendors if v not in OPEN_VENDORS]
    if closed:
        print("emoji: " + "; ".join(f"{v}: {LICENCES.get(v, 'see the package README')}" for v in closed)
              + " (research use only; openly licensed images only: --set 'dataset.options.vendors=[google,twitter]')",
              file=sys.stderr)
    for vendor in vendors:
        pkg = package(vendor, integrity.get(vendor))
        folders[vendor] = obtain(pkg, cache_root(cache_dir), Path(root) if root else None)
        pins[vendor] = pkg.integrity
    return Emoji.from_folders(folders, float(options.get("test_fraction", 0.3)), int(options.get("seed", 0)),
                              options.get("background", (255, 255, 255)), json.dumps(pins, sort_keys=True))
