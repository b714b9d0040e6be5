"""SynthArt: the embedded default dataset, generated procedurally (docs/datasets.md).

A WikiArt-like structure whose every factor is known, so "this image, but with style X"
has an exact answer. Base *scenes* (shape, colour, background, size, cell, distractors,
rotation) are each rendered in 3 of the 6 styles; a quarter of the scenes also get a
shape intervention and a colour intervention (rendered in the scene's first style), so
exact counterfactual twins exist for every labelled property.

Labelled properties: ``style`` (6), ``shape`` (8), ``color`` (8). Context factors:
``background`` (5), ``size`` (3), ``cell`` (9) and 0-2 distractor objects. Nuisance (not
labelled, recorded): rotation, illumination field, Gaussian noise, JPEG quality.

Generation is seeded: each render draws from ``default_rng([seed, scene, variant])``, so
an image does not depend on how many workers rendered the set. Pillow/libjpeg versions
may still change pixels, so tests assert labels, counts and statistics, not pixel hashes.
"""
from __future__ import annotations

import colorsys
import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from cir_bench.config import ConfigError
from cir_bench.data.base import Dataset, Item, Property, decode_image
from cir_bench.paths import atomic_write, cache_root, load_cached, write_checked

GENERATOR_VERSION = 2

STYLES = ("flat", "outline", "hatched", "dotted", "gradient", "mosaic")
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "diamond")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOR_HUES = (0.0, 30.0, 55.0, 120.0, 180.0, 225.0, 275.0, 320.0)  # degrees
BACKGROUNDS = ("plain", "sky", "grid", "texture", "horizon")
SIZES = ("small", "medium", "large")
SIZE_RADIUS = (0.13, 0.19, 0.26)  # fraction of the canvas
CONTEXT_FACTORS = ("style", "shape", "color", "background", "size", "cell")


@dataclass(frozen=True)
class SynthArtParams:
    """Everything that determines the generated set (hashed into its cache key)."""

    n_scenes: int = 400
    image_size: int = 128
    styles_per_scene: int = 3
    intervention_fraction: float = 0.25
    test_fraction: float = 0.3  # split by scene, so twins share a split
    seed: int = 0
    shape_style_alpha: float | None = None  # Dirichlet confound of shape | style; None = independent
    workers: int = 2

    def cache_key(self) -> str:
        data = asdict(self)
        data.pop("workers")
        data["version"] = GENERATOR_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


PRESETS: dict[str, SynthArtParams] = {
    "tiny": SynthArtParams(n_scenes=60, image_size=64, test_fraction=0.5),
    "small": SynthArtParams(n_scenes=200, image_size=96),
    "default": SynthArtParams(n_scenes=800, image_size=128),
}


# --------------------------------------------------------------------------- scenes
def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32)


def sample_scenes(p: SynthArtParams) -> list[dict[str, Any]]:
    """Draw the base scenes; pure function of the params."""
    confound = None
    if p.shape_style_alpha is not None:
        crng = np.random.default_rng([p.seed, 10_000_019])
        confound = crng.dirichlet([p.shape_style_alpha] * len(SHAPES), size=len(STYLES))
    scenes = []
    for sid in range(p.n_scenes):
        rng = np.random.default_rng([p.seed, sid, 0])
        styles = [int(s) for s in rng.choice(len(STYLES), size=p.styles_per_scene, replace=False)]
        if confound is not None:
            shape = int(rng.choice(len(SHAPES), p=confound[styles[0]]))
        else:
            shape = int(rng.integers(len(SHAPES)))
        color = int(rng.integers(len(COLORS)))
        size = int(rng.integers(len(SIZES)))
        cell = int(rng.integers(9))
        radius = SIZE_RADIUS[size] * (1.0 + rng.uniform(-0.1, 0.1))
        cx = (cell % 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06)
        cy = (cell // 3 + 0.5) / 3 + rng.uniform(-0.06, 0.06)
        margin = radius + 0.02
        cx, cy = float(np.clip(cx, margin, 1 - margin)), float(np.clip(cy, margin, 1 - margin))
        n_distractors = int(rng.choice(3, p=[0.4, 0.4, 0.2]))
        distractors = []
        for _ in range(n_distractors):
            dr = radius * rng.uniform(0.25, 0.45)
            for _try in range(12):
                dx, dy = rng.uniform(dr + 0.02, 1 - dr - 0.02, size=2)
                if np.hypot(dx - cx, dy - cy) > radius + dr * 0.5:
                    break
            distractors.append(
                {
                    "shape": int(rng.integers(len(SHAPES))),
                    "color": int(rng.integers(len(COLORS))),
                    "hue_jitter": float(rng.uniform(-8, 8)),
                    "sat": float(rng.uniform(0.6, 1.0)),
                    "val": float(rng.uniform(0.65, 1.0)),
                    "radius": float(dr),
                    "center": (float(dx), float(dy)),
                    "rotation": float(rng.uniform(0, 360)),
                }
            )
        interventions: list[tuple[str, int]] = []
        if rng.uniform() < p.intervention_fraction:
            interventions.append(("shape", int((shape + rng.integers(1, len(SHAPES))) % len(SHAPES))))
            interventions.append(("color", int((color + rng.integers(1, len(COLORS))) % len(COLORS))))
        scenes.append(
            {
                "scene": sid,
                "styles": styles,
                "shape": shape,
                "color": color,
                "hue_jitter": float(rng.uniform(-8, 8)),
                "sat": float(rng.uniform(0.6, 1.0)),
                "val": float(rng.uniform(0.65, 1.0)),
                "background": int(rng.integers(len(BACKGROUNDS))),
                "bg_hue": float(rng.uniform(0, 360)),
                "bg_sat": float(rng.uniform(0.1, 0.45)),
                "bg_val": float(rng.uniform(0.55, 0.95)),
                "bg_param": float(rng.uniform(0, 1)),
                "bg_seed": int(rng.integers(2**31)),
                "size": size,
                "radius": float(radius),
                "cell": cell,
                "center": (cx, cy),
                "rotation": float(rng.uniform(0, 360)),
                "distractors": distractors,
                "interventions": interventions,
            }
        )
    return scenes


def scene_variants(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """The renders of one scene: one per style, plus the single-factor interventions."""
    out = []
    for st in scene["styles"]:
        out.append({"style": st, "shape": scene["shape"], "color": scene["color"], "variant": STYLES[st]})
    first = scene["styles"][0]
    for factor, value in scene["interventions"]:
        v = {"style": first, "shape": scene["shape"], "color": scene["color"]}
        v[factor] = value
        v["variant"] = f"{STYLES[first]}-{factor}-{(SHAPES if factor == 'shape' else COLORS)[value]}"
        out.append(v)
    return out


# -------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float, rot_deg: float) -> list[tuple[float, float]]:
    if shape == "square":
        ang = np.deg2rad(45 + 90 * np.arange(4))
        rad = np.ones(4)
    elif shape == "triangle":
        ang = np.deg2rad(-90 + 120 * np.arange(3))
        rad = np.ones(3) * 1.1
    elif shape == "star":
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
    elif shape == "hexagon":
        ang = np.deg2rad(60 * np.arange(6))
        rad = np.ones(6)
    elif shape == "diamond":
        pts = np.array([(0, -1.05), (0.6, 0), (0, 1.05), (-0.6, 0)])
        ang, rad = np.arctan2(pts[:, 1], pts[:, 0]), np.hypot(pts[:, 0], pts[:, 1])
    elif shape == "cross":
        w = 0.36
        pts = np.array(
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        )
        ang, rad = np.arctan2(pts[:, 1], pts[:, 0]), np.hypot(pts[:, 0], pts[:, 1])
    else:
        raise ValueError(shape)
    ang = ang + np.deg2rad(rot_deg)
    return [(cx + r * rr * np.cos(a), cy + r * rr * np.sin(a)) for a, rr in zip(ang, rad)]


def object_mask(shape: str, center: tuple[float, float], radius: float, rot: float, size: int) -> np.ndarray:
    """Antialiased alpha mask in [0, 1], drawn at 2x supersampling."""
    ss = 2 * size
    img = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, r = center[0] * ss, center[1] * ss, radius * ss
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ri = r * 0.55
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _lowfreq(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    field = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(field, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)


def render_background(scene: dict[str, Any], size: int) -> np.ndarray:
    rng = np.random.default_rng(scene["bg_seed"])
    h, s, v = scene["bg_hue"], scene["bg_sat"], scene["bg_val"]
    base = _hsv(h, s, v)
    kind = BACKGROUNDS[scene["background"]]
    yy = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    if kind == "plain":
        img = np.broadcast_to(base, (size, size, 3)).copy()
    elif kind == "sky":
        top, bottom = _hsv(h, s, v * 0.75), _hsv(h, s * 0.4, min(1.0, v + 0.15))
        img = np.broadcast_to(top * (1 - yy) + bottom * yy, (size, size, 3)).copy()
    elif kind == "grid":
        img = np.broadcast_to(base, (size, size, 3)).copy()
        step = size / (6 + 3 * scene["bg_param"])
        width = max(1, size // 64)
        lines = (np.arange(size) % step) < width
        dark = base * 0.6
        img[lines, :, :] = dark
        img[:, lines, :] = dark
    elif kind == "texture":
        tex = _lowfreq(rng, 6, size)[..., None]
        img = base * (0.7 + 0.6 * tex)
    else:  # horizon
        sky, ground = _hsv(h, s * 0.5, min(1.0, v + 0.1)), _hsv(h + 110, s + 0.15, v * 0.7)
        hy = 0.45 + 0.25 * scene["bg_param"]
        img = np.where(yy < hy, sky, ground) * np.ones((size, size, 3), np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _over(img: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1 - a) + color * a


def _erode(alpha: np.ndarray, k: int) -> np.ndarray:
    im = Image.fromarray((alpha * 255).astype(np.uint8), mode="L").filter(ImageFilter.MinFilter(k))
    return np.asarray(im, dtype=np.float32) / 255.0


def _stripes(size: int, period: float, direction: int, offset: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    t = (x + direction * y + offset) / period
    return ((t % 1.0) < 0.5).astype(np.float32)


def _dots(flat: np.ndarray, rng: np.random.Generator, paper: np.ndarray) -> np.ndarray:
    """Pointillist re-rendering: jittered disks coloured from the flat render."""
    size = flat.shape[0]
    g = max(3, size // 24)
    r = max(1, int(round(g * 0.42)))
    n = size // g + 1
    gy, gx = np.mgrid[0:n, 0:n]
    cy = np.clip((gy * g + g / 2 + rng.uniform(-g / 3, g / 3, size=gy.shape)).astype(int), 0, size - 1)
    cx = np.clip((gx * g + g / 2 + rng.uniform(-g / 3, g / 3, size=gx.shape)).astype(int), 0, size - 1)
    cy, cx = cy.ravel(), cx.ravel()
    order = rng.permutation(cy.size)
    cy, cx = cy[order], cx[order]
    colors = np.clip(flat[cy, cx] * rng.uniform(0.9, 1.1, size=(cy.size, 1)), 0, 1)
    out = np.broadcast_to(paper, flat.shape).copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > r * r:
                continue
            yy, xx = cy + dy, cx + dx
            ok = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
            out[yy[ok], xx[ok]] = colors[ok]
    return out


def render(scene: dict[str, Any], variant: dict[str, Any], size: int, seed: int, vcode: int) -> tuple[bytes, dict]:
    """Render one variant of a scene; returns JPEG bytes and the nuisance values drawn."""
    rng = np.random.default_rng([seed, scene["scene"], 1 + vcode])
    style = STYLES[variant["style"]]
    bg = render_background(scene, size)
    objects = []
    for d in scene["distractors"]:
        objects.append(
            (
                object_mask(SHAPES[d["shape"]], d["center"], d["radius"], d["rotation"], size),
                _hsv(COLOR_HUES[d["color"]] + d["hue_jitter"], d["sat"], d["val"]),
                d["center"],
                d["radius"],
            )
        )
    main_color = _hsv(COLOR_HUES[variant["color"]] + scene["hue_jitter"], scene["sat"], scene["val"])
    objects.append(
        (
            object_mask(SHAPES[variant["shape"]], scene["center"], scene["radius"], scene["rotation"], size),
            main_color,
            scene["center"],
            scene["radius"],
        )
    )
    if style in ("flat", "dotted", "mosaic"):
        img = bg
        for alpha, col, _, _ in objects:
            img = _over(img, alpha, col)
        if style == "dotted":
            paper = np.array([0.93, 0.91, 0.86], np.float32) * rng.uniform(0.9, 1.0)
            img = _dots(img, rng, paper)
        elif style == "mosaic":
            block = max(4, size // 16)
            n = size // block
            small = np.asarray(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize(
                (n, n), Image.BOX), dtype=np.float32) / 255.0
            # every tile gets its own brightness: the tiling shows even on smooth regions
            small = small * rng.uniform(0.88, 1.12, size=(n, n, 1))
            img = np.asarray(Image.fromarray((np.clip(small, 0, 1) * 255).astype(np.uint8)).resize(
                (size, size), Image.NEAREST), dtype=np.float32) / 255.0
    elif style == "outline":
        img = bg * 0.9 + 0.1
        k = max(3, (size // 32) | 1)
        for alpha, col, _, _ in objects:
            edge = np.clip(alpha - _erode(alpha, k), 0, 1)
            img = _over(img, edge, col)
    elif style == "hatched":
        period = max(4.0, size / 20)
        canvas = _stripes(size, period * 0.8, -1, rng.uniform(0, period))
        img = bg * (1 - 0.12 * canvas[..., None])
        stripes = _stripes(size, period, 1, rng.uniform(0, period))[..., None]
        for alpha, col, _, _ in objects:
            fill = col * stripes + (col * 0.35 + 0.65) * (1 - stripes)
            img = img * (1 - alpha[..., None]) + fill * alpha[..., None]
    elif style == "gradient":
        # shaded volumes under one light from the top left: a soft drop shadow behind each
        # object, a highlight-to-rim ramp across it, and a light falloff over the canvas
        yy = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        img = bg * (0.8 + 0.35 * (1 - yy))
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
        for alpha, col, (cx, cy), r in objects:
            shift = max(1, int(round(0.3 * r * size)))
            shadow = np.zeros_like(alpha)
            shadow[shift:, shift:] = alpha[:-shift, :-shift]
            img = img * (1 - 0.45 * shadow[..., None])
            lx, ly = cx - 0.5 * r, cy - 0.5 * r
            dist = np.hypot(x - lx, y - ly) / (2 * r)
            shade = np.clip(1.4 - 1.1 * dist, 0.25, 1.4)[..., None]
            img = img * (1 - alpha[..., None]) + np.clip(col * shade, 0, 1) * alpha[..., None]
    else:
        raise ValueError(style)
    illumination = 0.8 + 0.4 * _lowfreq(rng, 3, size)
    img = img * illumination[..., None]
    sigma = float(rng.uniform(2, 8))
    img = img * 255.0 + rng.normal(0, sigma, size=img.shape)
    quality = int(rng.integers(60, 93))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), {
        "illumination_mean": float(illumination.mean()),
        "noise_sigma": sigma,
        "jpeg_quality": quality,
    }


def _render_scenes(args: tuple[list[dict[str, Any]], int, int]) -> list[dict[str, Any]]:
    scenes, size, seed = args
    rows = []
    for scene in scenes:
        for vcode, var in enumerate(scene_variants(scene)):
            data, nuisance = render(scene, var, size, seed, vcode)
            tags = {
                f"style:{STYLES[var['style']]}",
                f"shape:{SHAPES[var['shape']]}",
                f"color:{COLORS[var['color']]}",
                f"bg:{BACKGROUNDS[scene['background']]}",
                f"size:{SIZES[scene['size']]}",
                f"cell:{scene['cell']}",
                f"n_objects:{1 + len(scene['distractors'])}",
            }
            for d in scene["distractors"]:
                tags.add(f"has:{SHAPES[d['shape']]}")
                tags.add(f"has_color:{COLORS[d['color']]}")
            rows.append(
                {
                    "id": f"{scene['scene']:05d}-{var['variant']}",
                    "scene": scene["scene"],
                    "variant": var["variant"],
                    "style": STYLES[var["style"]],
                    "shape": SHAPES[var["shape"]],
                    "color": COLORS[var["color"]],
                    "background": BACKGROUNDS[scene["background"]],
                    "size": SIZES[scene["size"]],
                    "cell": str(scene["cell"]),
                    "n_distractors": len(scene["distractors"]),
                    "rotation": scene["rotation"],
                    "tags": sorted(tags),
                    **nuisance,
                    "image": data,
                }
            )
    return rows


def generate(params: SynthArtParams) -> pd.DataFrame:
    """Generate the whole set as a DataFrame (one row per image, JPEG bytes in ``image``)."""
    scenes = sample_scenes(params)
    split_rng = np.random.default_rng([params.seed, 20_000_003])
    n_test = int(round(params.test_fraction * params.n_scenes))
    test_scenes = set(split_rng.permutation(params.n_scenes)[:n_test].tolist())
    workers = max(1, min(params.workers, os.cpu_count() or 1))
    chunks = [scenes[i::workers * 4] for i in range(workers * 4)]
    if workers == 1 or params.n_scenes < 100:
        rows = _render_scenes((scenes, params.image_size, params.seed))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = pool.map(_render_scenes, [(c, params.image_size, params.seed) for c in chunks])
            rows = [r for part in parts for r in part]
    df = pd.DataFrame(rows)
    df["split"] = np.where(df["scene"].isin(test_scenes), "test", "train")
    return df.sort_values("id").reset_index(drop=True)


# -------------------------------------------------------------------------- dataset
class SynthArt(Dataset):
    """The embedded SynthArt dataset, generated once per parameter set and cached."""

    name = "synthart"
    context_factors = CONTEXT_FACTORS

    def __init__(self, frame: pd.DataFrame, params: SynthArtParams, content_hash: str) -> None:
        self.params = params
        self.image_size = params.image_size
        self._content_hash = content_hash
        props = (Property("style", STYLES), Property("shape", SHAPES), Property("color", COLORS))
        items = []
        for row in frame.itertuples(index=False):
            items.append(
                Item(
                    id=row.id,
                    split=row.split,
                    labels={
                        "style": STYLES.index(row.style),
                        "shape": SHAPES.index(row.shape),
                        "color": COLORS.index(row.color),
                    },
                    tags=frozenset(row.tags),
                    factors={f: str(getattr(row, f)) for f in CONTEXT_FACTORS},
                    group=f"scene{row.scene:05d}",
                )
            )
        self._images = dict(zip(frame["id"], frame["image"]))
        super().__init__(props, items)
        self._image_list = [self._images[it.id] for it in self.items]

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self._image_list[index], f"synthart item {self.items[index].id}")

    def _content_fingerprint(self) -> str:
        return self._content_hash

    @classmethod
    def load(
        cls,
        preset: str = "default",
        cache_dir: str | Path | None = None,
        verbose: bool = False,
        **overrides: Any,
    ) -> "SynthArt":
        check_options({"preset": preset, **overrides})
        params = replace(PRESETS[preset], **overrides)
        folder = cache_root(cache_dir) / "synthart" / f"{preset}-{params.cache_key()}"
        path = folder / "synthart.parquet"
        frame = load_cached(path, lambda p: pq.read_table(p).to_pandas())
        if frame is None:
            t0 = time.perf_counter()
            frame = generate(params)
            write_checked(path, lambda tmp: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp))
            meta = {"params": asdict(params), "version": GENERATOR_VERSION, "n_images": len(frame),
                    "seconds": round(time.perf_counter() - t0, 2)}
            with atomic_write(folder / "meta.json") as tmp:
                tmp.write_text(json.dumps(meta, indent=2))
            if verbose:
                print(f"SynthArt '{preset}': generated {len(frame)} images in {meta['seconds']} s -> {folder}",
                      file=sys.stderr)  # stdout holds a command's data (train's JSON)
            frame = pq.read_table(path).to_pandas()  # as a later run reads it (column types)
        h = hashlib.sha256()
        for data in frame.sort_values("id")["image"]:
            h.update(hashlib.sha256(data).digest())
        return cls(frame, params, h.hexdigest())


def check_options(options: dict[str, Any]) -> None:
    """SynthArt's options: ``preset`` and any generator parameter (``SynthArtParams``)."""
    preset = options.get("preset", "default")
    if preset not in PRESETS:
        raise ConfigError(f"config key 'dataset.options.preset': unknown SynthArt preset {preset!r}; "
                          f"available: {', '.join(PRESETS)}", key="dataset.options.preset")
    known = set(SynthArtParams.__dataclass_fields__)
    unknown = sorted(set(options) - known - {"preset"})
    if unknown:
        raise ConfigError(f"config key 'dataset.options.{unknown[0]}': unknown SynthArt option; known: preset, "
                          + ", ".join(SynthArtParams.__dataclass_fields__), key=f"dataset.options.{unknown[0]}")
