"""Model-only micro-benchmark of the serving components (no HTTP, no Ray): the code each
Serve deployment runs, timed side by side in one run; prints JSON.

- per method (teacher = Backward Search, student, knn): ms per query at batch sizes 1..64,
  teacher iterations per query (the paper's Table 5 analogue) and the student's speed-up
  over the teacher (Table 6 analogue), item-id queries;
- the image encoder on uploaded PNG bytes (decode + transform + forward) per batch size;
- the student and the exact index as the ingress runs them: z handed over as numpy with a
  wait per stage (before) vs left on the device with one wait per batch (``on_device`` +
  ``one_sync``; the CUDA default), ms per call per batch size and identical top-10;
- the index: exact torch top-10 vs FAISS (Flat, HNSW32, IVF1024) on the run's store and on
  synthetic stores of ``--large`` rows (recall@10 of FAISS against exact, ms per query).

    .venv/bin/python benchmarks/serve_components.py [--set key=value ...] [--large 200000]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np
import torch

from cir_bench.config import load_config
from cir_bench.index import build_index
from cir_bench.pipeline import load_dataset
from cir_bench.serving import SearchService, build_bundle, example_requests


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def student_index(bundle, service, requests, sizes, repeat) -> list[dict]:
    """Student -> exact index in one process, per request batch: before (numpy between the
    stages, a wait for the device in each) and after (z stays on the device, one wait)."""
    from cir_bench.serving import IndexStage, StudentStage
    from cir_bench.serving.orchestrate import rank_job, search_job

    device = str(service.teacher.device)
    student, index = StudentStage(bundle, device), IndexStage(bundle, device)
    if not hasattr(index.index, "one_sync"):
        return []  # a FAISS backend: nothing to compare
    rows = []
    for b in sizes:
        parsed = [service.parser.parse({**r, "method": "student"}) for r in requests[:b]]
        jobs = [search_job(p, index.vectors([p.position])[0]) for p in parsed]

        def call(on_device: bool) -> list:
            out = student.transform_many(jobs, on_device=on_device)
            return index.search_many([rank_job(bundle.catalog, p, o.z) for p, o in zip(parsed, out)])

        row = {"batch": b}
        answers = {}
        for name, one_sync in (("before", False), ("after", True)):
            index.index.one_sync = one_sync
            row[f"{name}_ms_per_call"] = 1000 * _time(lambda: call(one_sync), max(repeat, 20))
            answers[name] = call(one_sync)
        row["speedup"] = row["before_ms_per_call"] / row["after_ms_per_call"]
        row["identical_top10"] = float(np.mean([a.positions == c.positions
                                                for a, c in zip(answers["before"], answers["after"])]))
        rows.append(row)
    return rows


def main(stdout=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--batch-sizes", default="1,4,16,64")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--large", type=int, default=200_000, help="rows of the synthetic store (0: skip)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(args.config, args.set)
    dataset = load_dataset(cfg)
    bundle = build_bundle(cfg, dataset=dataset)
    service = SearchService(bundle)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    requests = example_requests(bundle.catalog, max(sizes), seed=cfg.seed)
    out: dict = {"dataset": cfg.dataset.name, "items": len(bundle.catalog.ids),
                 "database": len(bundle.catalog.database), "device": str(service.teacher.device),
                 "torch_threads": torch.get_num_threads(), "methods": {}}
    for method in ("teacher", "student", "knn"):
        rows = []
        for b in sizes:
            batch = [{**r, "method": method} for r in requests[:b]]
            seconds = _time(lambda: service.search_many(batch), args.repeat)
            row = {"batch": b, "ms_per_query": 1000 * seconds / b, "ms_per_call": 1000 * seconds}
            if method == "teacher":
                answers = service.search_many(batch)
                its = np.array([a["iterations"] for a in answers])
                row.update(iterations_mean=float(its.mean()), iterations_std=float(its.std()),
                           satisfied=float(np.mean([a["satisfied"] for a in answers])))
            rows.append(row)
        out["methods"][method] = rows
    t_teacher = {r["batch"]: r["ms_per_query"] for r in out["methods"]["teacher"]}
    out["student_speedup_over_teacher"] = {b: t_teacher[b] / r["ms_per_query"] for b, r in
                                           ((r["batch"], r) for r in out["methods"]["student"])}
    # uploads: PNG bytes through the encoder
    pngs = []
    for pos in bundle.catalog.database[: max(sizes)]:
        buf = io.BytesIO()
        dataset.load_image(int(pos)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    out["encoder"] = [{"batch": b, "ms_per_image": 1000 * _time(lambda: service.encoder.embed(pngs[:b]),
                                                                 args.repeat) / b} for b in sizes]
    out["student_index"] = student_index(bundle, service, requests, sizes, args.repeat)
    # index backends
    z = service.index.z
    stores = {"run_store": (z, np.asarray(bundle.catalog.database))}
    if args.large:
        rng = np.random.default_rng(cfg.seed)
        # the run's embeddings resampled with noise: clustered like real embeddings, unlike iid
        # Gaussian vectors (on which graph indexes lose much recall); both are reported
        rows = torch.as_tensor(rng.integers(len(z), size=args.large))
        noise = torch.from_numpy(rng.standard_normal((args.large, z.shape[1]), dtype=np.float32))
        stores[f"resampled_{args.large}"] = (z[rows] + 0.3 * z.std() * noise, np.arange(args.large))
        stores[f"gaussian_{args.large}"] = (noise, np.arange(args.large))
    out["index"] = {}
    for name, (zz, db) in stores.items():
        sel = torch.as_tensor(db[:256])
        q = zz[sel] + 0.1 * torch.randn(len(sel), zz.shape[1])
        exact = build_index("exact", zz, db, service.teacher.device)  # on the GPU when there is one
        ref, _ = exact.search(q, 10)
        res = {"exact": {"ms_per_query": 1000 * _time(lambda: exact.search(q, 10), 3) / len(q), "recall_at_10": 1.0}}
        for factory in ("Flat", "HNSW32", "IVF1024,Flat"):
            if factory.startswith("IVF") and len(db) < 50_000:
                continue  # too few rows to train 1024 lists
            t0 = time.perf_counter()
            idx = build_index("faiss", zz, db, factory=factory, ef_search=128, nprobe=32, seed=cfg.seed)
            build_s = time.perf_counter() - t0
            got, _ = idx.search(q, 10)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref.tolist(), got.tolist())]))
            res[f"faiss_{factory}"] = {"ms_per_query": 1000 * _time(lambda: idx.search(q, 10), 3) / len(q),
                                       "recall_at_10": recall, "build_s": build_s}
        for k, v in res.items():
            v["speedup_vs_exact"] = res["exact"]["ms_per_query"] / v["ms_per_query"]
        out["index"][name] = res
    print(json.dumps(out, indent=2), file=stdout or sys.stdout)


if __name__ == "__main__":
    import contextlib

    _json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # logs go to stderr: stdout holds only the JSON
        main(_json_out)
