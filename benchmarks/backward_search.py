"""Backward Search speed and agreement, measured side by side in one run; prints JSON.

- batched Backward Search vs a per-query loop on the same queries: speed ratio and the
  fraction of identical top-10 lists;
- student vs batched teacher vs per-query teacher: ms per query and ratios;
- iterations per query (mean, std) per query set (the paper's Table 5 analogue);
- the engines side by side (``engines``): the eager loop against the fixed-shape masked loop
  (``fixed`` on CPU) or its captured CUDA graph (``graph`` on CUDA), each also through
  torch.compile (``fixed+compile``, ``graph+compile``), end to end (inversion +
  top-10) at batch 1 (median of repeated single queries) and at 1,000 / 10,000 queries (the
  query set tiled), the speed-up, the fraction of identical top-10 lists, and capture time;
- the gradient side by side (``gradients``): autograd against the gradient by hand, the same
  measurements.

Uses the same cached model, embeddings and student as ``cir-bench run`` with the same
flags (it trains them first if the cache is cold).

    .venv/bin/python benchmarks/backward_search.py [--n-queries 1000] [--set key=value ...] [--out F]

``--out F`` also writes the JSON to F after every stage (``"complete": false`` until the end),
so a run cut short by a time limit (a lent GPU machine) keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cir_bench.config import load_config
from cir_bench.data.queries import build_query_set
from cir_bench.pipeline import distil_or_load, prepare, teacher
from cir_bench.search.backward import BackwardSearch


def side_by_side(cfg, variants: dict[str, dict], heads, z0, props, cond, index, exclude, sizes, sync) -> dict:
    """Backward Search run several ways (``variants``: label -> BackwardSearch keyword
    arguments; the first is the baseline), end to end (inversion + top-10) at each batch size
    (batch 1: median of 20 single queries; larger: the query set tiled, median of 3), the
    trials of the variants interleaved so that the machine's drift hits them alike; the
    speed-up of each over the first, the fraction of identical top-10 lists, capture time."""
    what = cfg.search.model_copy(update=dict(engine=None, check_every=None, gradient=None, compile=None))
    searches = {label: BackwardSearch.from_config(what, **kw) for label, kw in variants.items()}
    capture = dict.fromkeys(searches, 0.0)
    failed: dict[str, str] = {}
    for label, bs in searches.items():
        try:
            for n in sizes:  # warm-up: every bucket once (the graph engine captures, compile compiles here)
                reps = (n + len(z0) - 1) // len(z0)
                bs.invert(heads, z0.repeat(reps, 1)[:n], props, cond.repeat(reps, 1)[:n])
                capture[label] += bs.last_capture_s
        except Exception as err:  # e.g. torch.compile without a compiler for this device: say so, go on
            failed[label] = f"{type(err).__name__}: {str(err)[:300]}"
    searches = {label: bs for label, bs in searches.items() if label not in failed}
    sync()
    times: dict[str, dict[int, list[float]]] = {label: {n: [] for n in sizes} for label in searches}
    for n in sizes:
        reps = max(1, (n + len(z0) - 1) // len(z0))
        zz, cc = z0.repeat(reps, 1)[:max(n, len(z0))], cond.repeat(reps, 1)[:max(n, len(z0))]
        ex = np.tile(exclude, reps)[:max(n, len(z0))]
        for t in range(20 if n == 1 else 3):
            sl = slice(t, t + 1) if n == 1 else slice(0, n)  # batch 1: a different query each time
            for label, bs in searches.items():
                sync()
                t0 = time.perf_counter()
                r = bs.invert(heads, zz[sl], props, cc[sl])
                index.search(r.z, 10, exclude=ex[sl])
                sync()
                times[label][n].append(time.perf_counter() - t0)
    out: dict = {"sizes": list(sizes), **{label: {"error": why} for label, why in failed.items()}}
    tops = {}
    for label, bs in searches.items():
        out[label] = {**{f"batch_{n}_ms": 1000 * float(np.median(times[label][n])) for n in sizes},
                      "capture_s": capture[label]}
        tops[label], _ = index.search(bs.invert(heads, z0, props, cond).z, 10, exclude=exclude)
    first, *others = searches
    for label in others:
        key = "" if len(others) == 1 else f"_{label}"
        out["speedup" + key] = {f"batch_{n}": out[first][f"batch_{n}_ms"] / out[label][f"batch_{n}_ms"] for n in sizes}
        out["identical_top10" + key] = float((tops[first] == tops[label]).all(dim=1).float().mean())
    return out


def engines(cfg, heads, z0, props, cond, index, exclude, sizes, device, sync) -> dict:
    """Eager vs the fixed-shape (CPU) / graph-captured (CUDA) loop, plain and through
    torch.compile, measured side by side (compile time counted in capture_s)."""
    fast = "graph" if device.type == "cuda" else "fixed"
    variants = {"eager": {"engine": "eager"}, fast: {"engine": fast}, f"{fast}+compile": {"engine": fast, "compile": True}}
    return {"fast_engine": fast, **side_by_side(cfg, variants, heads, z0, props, cond, index, exclude, sizes, sync)}


def gradients(cfg, heads, z0, props, cond, index, exclude, sizes, sync) -> dict:
    """The gradient through autograd vs by hand (search/objective.py), the device's default
    engine, measured side by side."""
    return side_by_side(cfg, {"autograd": {"gradient": "autograd"}, "by_hand": {"gradient": "auto"}},
                        heads, z0, props, cond, index, exclude, sizes, sync)


def main(stdout=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--loop-queries", type=int, default=None,
                    help="per-query loop on only the first N queries (default: all)")
    ap.add_argument("--engine-sizes", default="1,1000,10000",
                    help="batch sizes of the engine comparison (empty: skip it)")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write the JSON here after every stage (complete: false until the end)")
    args = ap.parse_args()

    def checkpoint(complete: bool = False) -> None:
        if args.out is not None:
            tmp = args.out.with_name(args.out.name + ".tmp")
            tmp.write_text(json.dumps({**out, "complete": complete}, indent=2))
            os.replace(tmp, args.out)

    cfg = load_config(args.config, args.set)
    prepared = prepare(cfg, progress=False)
    dataset, trained, store, device = prepared.dataset, prepared.trained, prepared.store, prepared.device
    index = prepared.ctx.index
    bs = teacher(cfg)
    heads = trained.model.heads
    out: dict = {"device": str(device), "torch_threads": torch.get_num_threads(), "teacher": bs.params(),
                 "query_sets": {}}
    for props in cfg.queries.sets or dataset.default_query_sets():
        name = "+".join(props)
        qs = build_query_set(dataset, props, args.n_queries, cfg.seed, cfg.queries.min_relevant,
                             cfg.queries.query_split, cfg.queries.database_split)
        z0 = store.z[torch.as_tensor(qs.positions)].to(device)
        cond = torch.as_tensor(qs.conditions, device=device)
        exclude = qs.positions

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        bs.invert(heads, z0[:8], props, cond[:8])  # warm-up
        sync()
        t0 = time.perf_counter()
        batched = bs.invert(heads, z0, props, cond)
        sync()
        t_batched = time.perf_counter() - t0
        top_batched, _ = index.search(batched.z, 10, exclude=exclude)

        n_loop = min(args.loop_queries or len(qs), len(qs))
        loop_z, loop_it = [], []
        t0 = time.perf_counter()
        for i in range(n_loop):
            r = bs.invert(heads, z0[i:i + 1], props, cond[i:i + 1])
            loop_z.append(r.z)
            loop_it.append(int(r.iterations[0]))
        sync()
        t_loop = time.perf_counter() - t0
        top_loop, _ = index.search(torch.cat(loop_z), 10, exclude=exclude[:n_loop])
        same = (top_loop == top_batched[:n_loop]).all(dim=1).float().mean().item()

        student, _ = distil_or_load(cfg, dataset, trained, store, list(props), device, progress=False)
        with torch.no_grad():
            student(z0[:8], cond[:8])
            sync()
            t0 = time.perf_counter()
            z_student = student(z0, cond)
            sync()
            t_student = time.perf_counter() - t0
        top_student, _ = index.search(z_student, 10, exclude=exclude)
        retrieved_sim = np.mean([len(set(a) & set(b)) / len(set(a) | set(b))
                                 for a, b in zip(top_student.tolist(), top_batched.tolist())])

        ms_batched = 1000 * t_batched / len(qs)
        ms_loop = 1000 * t_loop / n_loop
        ms_student = 1000 * t_student / len(qs)
        it = batched.iterations.float().cpu().numpy()
        out["query_sets"][name] = {
            "n_queries": len(qs),
            "n_loop_queries": n_loop,
            "ms_per_query": {"student": ms_student, "teacher_batched": ms_batched, "teacher_per_query": ms_loop},
            "speedup_batched_vs_per_query": ms_loop / ms_batched,
            "speedup_student_vs_batched_teacher": ms_batched / ms_student,
            "speedup_student_vs_per_query_teacher": ms_loop / ms_student,
            "identical_top10_batched_vs_per_query": same,
            "iterations_equal_batched_vs_per_query": bool(np.array_equal(it[:n_loop], np.array(loop_it))),
            "iterations": {"mean": float(it.mean()), "std": float(it.std()), "max": float(it.max())},
            "satisfied_rate": float(batched.satisfied.float().mean()),
            "retrieved_similarity_at_10_student_vs_teacher": float(retrieved_sim),
        }
        checkpoint()
        sizes = [int(v) for v in args.engine_sizes.split(",") if v.strip()]
        if sizes:
            out["query_sets"][name]["engines"] = engines(cfg, heads, z0, props, cond, index, exclude, sizes,
                                                         device, sync)
            checkpoint()
            out["query_sets"][name]["gradients"] = gradients(cfg, heads, z0, props, cond, index, exclude, sizes,
                                                             sync)
            checkpoint()
    checkpoint(complete=True)
    print(json.dumps(out, indent=2), file=stdout or sys.stdout)


if __name__ == "__main__":
    import contextlib

    _json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # logs go to stderr: stdout holds only the JSON
        main(_json_out)
