"""Linear probes of frozen backbone features on SynthArt: do pretrained features beat the
same architecture at random initialisation? Prints JSON (accuracy per factor).

    .venv/bin/python benchmarks/backbone_probe.py [--backbone efficientnet_lite0] [--preset default]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from cir_bench.data.synthart import CONTEXT_FACTORS, SynthArt
from cir_bench.train.probe import backbone_features, linear_probe


def main(stdout=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    ds = SynthArt.load(args.preset)
    frame = ds.to_frame()
    targets = {f: frame[f"factor_{f}"] for f in CONTEXT_FACTORS}
    result = {"backbone": args.backbone, "preset": args.preset, "n_images": len(ds), "input_size": args.size,
              "probe": "standardised logistic regression (C=0.1), 80/20 split by scene", "accuracy": {},
              "seconds": {}}
    for label, pretrained in (("pretrained", True), ("random_init", False)):
        t0 = time.perf_counter()
        x = backbone_features(args.backbone, pretrained, ds, args.size, args.seed)
        result["seconds"][label] = round(time.perf_counter() - t0, 1)
        result["accuracy"][label] = linear_probe(x, targets, frame["group"], args.seed)
    print(json.dumps(result, indent=2), file=stdout or sys.stdout)


if __name__ == "__main__":
    import contextlib

    _json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # logs go to stderr: stdout holds only the JSON
        main(_json_out)
