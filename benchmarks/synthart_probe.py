"""Pixel-level linear probes on SynthArt (docs/datasets.md): is any factor trivially
readable from pixel statistics? Prints JSON: accuracy per factor and feature, with chance.

    .venv/bin/python benchmarks/synthart_probe.py [--preset default] [--n-scenes 1000 --size 64]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import replace

import numpy as np
from PIL import Image
from sklearn.linear_model import RidgeClassifier
from sklearn.model_selection import GroupShuffleSplit

from cir_bench.data.synthart import CONTEXT_FACTORS, PRESETS, generate


def features(images: list[bytes]) -> dict[str, np.ndarray]:
    raw, hist = [], []
    for data in images:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        raw.append(np.asarray(img.resize((16, 16), Image.BOX), dtype=np.float32).ravel() / 255.0)
        q = (np.asarray(img) // 32).reshape(-1, 3).astype(np.int64)  # 8 bins per channel
        h = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512).astype(np.float32)
        hist.append(h / h.sum())
    return {"raw_pixels_16x16": np.stack(raw), "color_histogram_8x8x8": np.stack(hist)}


def main(stdout=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--n-scenes", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    params = PRESETS[args.preset]
    if args.n_scenes:
        params = replace(params, n_scenes=args.n_scenes)
    if args.size:
        params = replace(params, image_size=args.size)
    t0 = time.perf_counter()
    frame = generate(params)
    gen_s = time.perf_counter() - t0
    feats = features(list(frame["image"]))
    out: dict = {"n_images": len(frame), "image_size": params.image_size, "generation_s": round(gen_s, 2),
                 "probe": "RidgeClassifier(alpha=1), 80/20 split by scene (renders of one scene never straddle it)", "chance": {}, "accuracy": {}}
    train, test = next(GroupShuffleSplit(1, test_size=0.2, random_state=args.seed)
                       .split(frame, groups=frame["scene"]))
    for factor in CONTEXT_FACTORS:
        y = frame[factor].to_numpy()
        out["chance"][factor] = round(float(frame[factor].value_counts(normalize=True).max()), 3)
        for name, x in feats.items():
            acc = RidgeClassifier(alpha=1.0).fit(x[train], y[train]).score(x[test], y[test])
            out["accuracy"].setdefault(name, {})[factor] = round(float(acc), 3)
    print(json.dumps(out, indent=2), file=stdout or sys.stdout)


if __name__ == "__main__":
    import contextlib

    _json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # logs go to stderr: stdout holds only the JSON
        main(_json_out)
