"""Eq 4's objective as the run's Backward Search leaves it (the preset: Adam, stopping on a
loss plateau) against Eq 4 solved to its tolerance (the ``converged`` preset), per query set
and λ, measured side by side in one run on the same queries; prints JSON.

Per λ: each solver's mean objective, the converged / preset ratio of the means, the share of
queries on which the converged solver's objective is at most the preset's, each solver's
mean relative gap to the better of the two for the same query, precision@k, how the
converged solver's queries stopped, and the seconds each solver took over the whole grid.

Uses the same cached model and embeddings as ``cir-bench run`` with the same flags (trains
them first when the cache is cold) and the run's query sets and λ curve grid.

    .venv/bin/python benchmarks/eq4_objective.py [--set key=value ...] [--out F]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cir_bench.config import load_config
from cir_bench.metrics import find_twins
from cir_bench.pipeline import prepare
from cir_bench.pipeline.lambda_curve import lambda_curve
from cir_bench.pipeline.steps import query_sets


def main(stdout=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.set, "eval.lambda_curve_solvers=[preset,converged]"])
    prepared = prepare(cfg, progress=False)
    ctx, dataset = prepared.ctx, prepared.dataset
    out: dict = {"benchmark": "eq4_objective", "config": {"dataset": cfg.dataset.name, "seed": cfg.seed,
                                                          "search": cfg.search.preset,
                                                          "lambdas": list(cfg.eval.lambda_curve)},
                 "eq4_objective": {}}
    k = cfg.eval.k
    for props, queries, _ in query_sets(cfg, dataset, lambda *_: None):
        name = "+".join(props)
        curve, seconds = lambda_curve(cfg, dataset, ctx, queries, name, find_twins(dataset, queries, ctx.database),
                                      log=lambda *_: None)
        best = curve.groupby(["lam", "query_index"])["objective"].transform("min")
        curve = curve.assign(gap=(curve["objective"] - best) / best.abs().clip(lower=1e-12))
        rows = []
        for lam, g in curve.groupby("lam", sort=True):
            pre = g[g["solver"] == "preset"].set_index("query_index")
            con = g[g["solver"] == "converged"].set_index("query_index").loc[pre.index]
            rows.append({
                "lam": float(lam),
                "preset_objective": float(pre["objective"].mean()),
                "converged_objective": float(con["objective"].mean()),
                "converged_over_preset": float(con["objective"].mean() / pre["objective"].mean()),
                "share_converged_at_most_preset": float(np.mean(con["objective"].to_numpy()
                                                                <= pre["objective"].to_numpy())),
                "preset_gap_to_best": float(pre["gap"].mean()),
                "converged_gap_to_best": float(con["gap"].mean()),
                f"preset_precision_at_{k}": float(pre[f"metric_precision_at_{k}"].mean()),
                f"converged_precision_at_{k}": float(con[f"metric_precision_at_{k}"].mean()),
                "preset_mean_iterations": float(pre["iterations"].mean()),
                "converged_mean_iterations": float(con["iterations"].mean()),
                "converged_stopped": {str(r): int(n) for r, n in con["stop"].value_counts().items()},
            })
        out["eq4_objective"][name] = {"n_queries": len(queries), "seconds": seconds, "per_lambda": rows}
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text, file=stdout or sys.stdout)


if __name__ == "__main__":
    main()
