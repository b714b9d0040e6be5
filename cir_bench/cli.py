"""cir-bench command line: thin, it parses, builds a config and calls pipeline functions."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from cir_bench.config import ConfigError, ConfigLayer, RunConfig
from cir_bench.paths import DamagedCacheError, DiskFullError, FolderInUseError, UntrustedFolderError
from cir_bench.registry import MissingExtraError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, KeyError,
                                               DamagedCacheError, ConnectionError, UntrustedFolderError,
                                               FolderInUseError, DiskFullError, MissingExtraError)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see README); flags below override it")
    p.add_argument("--task", help="a query task of the paper's Table 1: cub-bird, apy-category, wikiart-style, "
                   "wikiart-multi (sets the dataset and the 1000-query set)")
    p.add_argument("--paper-recipe", action="store_true",
                   help="the paper's model and training settings (ConvNeXt-base, frozen, d=256, 100 epochs)")
    p.add_argument("--dataset", help="dataset name (default synthart); `cir-bench list datasets`")
    p.add_argument("--root", help="folder of a dataset on disk")
    p.add_argument("--preset", help="SynthArt preset: tiny, small, default")
    p.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    p.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--cache-dir", help="cache of datasets/checkpoints/embeddings "
                   "(default $CIR_BENCH_CACHE or ~/.cache/cir-bench)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--address", help="Ray cluster address: embeddings are extracted there with Ray Data")
    p.add_argument("--ray-embed", action="store_true", help="extract embeddings with Ray Data on a local Ray")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip missing or undecodable images (counted in the manifest) instead of failing")
    p.add_argument("--strict-queries", action="store_true",
                   help="fail when a query set cannot get queries.n_queries queries (default: use those that "
                   "qualify, skip a default set with none, and warn)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_layers(args: argparse.Namespace) -> list[ConfigLayer]:
    """The command line as config layers, by precedence whatever the order of the flags:
    --task < --paper-recipe < --config FILE < named flags < --lambda < --set (in order)."""
    from cir_bench.config import PAPER_RECIPE, read_yaml, task_preset

    layers = []
    if args.task:
        layers.append(ConfigLayer(f"--task {args.task}", task_preset(args.task)))
    if args.paper_recipe:
        layers.append(ConfigLayer("--paper-recipe", PAPER_RECIPE))
    if args.config:
        layers.append(ConfigLayer(args.config, read_yaml(args.config)))
    named = {"--dataset": ("dataset.name", args.dataset), "--root": ("dataset.root", args.root),
             "--preset": ("dataset.options.preset", args.preset),
             "--skip-bad-images": ("dataset.options.skip_bad_images", args.skip_bad_images or None),
             "--address": ("ray.address", args.address), "--ray-embed": ("ray.embed", args.ray_embed or None),
             "--strict-queries": ("queries.strict", args.strict_queries or None)}
    for flag in ("seed", "device", "cache_dir", "out"):
        named[f"--{flag.replace('_', '-')}"] = (flag, getattr(args, flag, None))
    if getattr(args, "methods", None):
        named["--methods"] = ("eval.methods", [m.strip() for m in args.methods.split(",") if m.strip()])
    layers += [ConfigLayer(flag, values={key: value}) for flag, (key, value) in named.items() if value is not None]
    if getattr(args, "lambdas", None):
        layers.append(ConfigLayer("--lambda", overrides=(f"eval.lambdas=[{args.lambdas}]",)))
    layers.append(ConfigLayer("--set", overrides=tuple(args.set)))
    return layers


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run config of a command (``config.layered_config`` of ``config_layers``), validated
    and checked before any work."""
    from cir_bench.config import layered_config
    from cir_bench.paths import cache_root, remove_stale_temporaries
    from cir_bench.pipeline.checks import check_run_config

    cfg = layered_config(config_layers(args), lambda c: check_run_config(
        c, need_out=getattr(args, "command", None) in ("run", "compare"), overwrite=getattr(args, "overwrite", False)))
    remove_stale_temporaries(cache_root(cfg.cache_dir))  # of writes killed midway, hours ago
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    """One run; with --seeds one per training seed under <out>/seed-<n>/ on the same queries,
    and one report that pools them."""
    from cir_bench.pipeline import run
    from cir_bench.pipeline.run import seed_configs
    from cir_bench.results import format_metrics_table

    if args.seeds and args.seed is not None:
        raise ConfigError("--seed and --seeds: give one of them")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else []
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    cfg = build_config(args)
    configs = seed_configs(cfg, seeds, overwrite=args.overwrite) if args.seeds else [cfg]
    t0, outs = time.perf_counter(), []
    for one in configs:
        if args.seeds:
            print(f"seed {one.seed}: {one.out}")
        outs.append(run(one, progress=not args.no_progress))
    k = cfg.eval.k
    if not args.seeds:
        print()
        print(format_metrics_table(outs[0], ["query_set", "n_queries", f"precision_at_{k}", f"ap_at_{k}_R",
                                             f"ap_at_{k}_minRk", f"mts_at_{k}", f"context_at_{k}",
                                             f"twin_hit_at_{k}", "mean_iterations", f"retrieved_similarity_at_{k}",
                                             "ms_per_query"]))
        print(f"(precision_at_{k} is the paper's \"mAP@{k}\", paper def.)")
    base = outs[0].parent if args.seeds else outs[0]
    what = f"{len(outs)} runs" if args.seeds else "results.parquet, metrics.csv, items.parquet, map_points.parquet, " \
        "manifest.json"
    print(f"\nwrote {base}/ ({what}) in {time.perf_counter() - t0:.1f} s")
    if not args.no_report:
        from cir_bench.report import ReportOptions, classify, write_html_report

        t0 = time.perf_counter()
        paths = write_html_report(classify(outs), base, ReportOptions(seed=configs[0].seed))
        print(f"report{', the seeds pooled' if args.seeds else ''} ({time.perf_counter() - t0:.0f} s): "
              f"{paths[0].resolve()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cir_bench.models import pick_device
    from cir_bench.pipeline import load_dataset, train_or_load

    cfg = build_config(args)
    dataset = load_dataset(cfg)
    trained = train_or_load(cfg, dataset, pick_device(cfg.device), progress=not args.no_progress)
    print(json.dumps({"checkpoint": str(trained.checkpoint), "reused": trained.reused,
                      "final": trained.history[-1] if trained.history else {}}, indent=2))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from cir_bench.models import pick_device
    from cir_bench.pipeline import embed, load_dataset, train_or_load

    cfg = build_config(args)
    device = pick_device(cfg.device)
    dataset = load_dataset(cfg)
    trained = train_or_load(cfg, dataset, device, progress=not args.no_progress)
    store, hit = embed(cfg, dataset, trained, device)
    print(json.dumps({"fingerprint": store.fingerprint, "reused": hit, "shape": list(store.z.shape)}))
    return 0


def cmd_queries(args: argparse.Namespace) -> int:
    import pandas as pd

    from cir_bench.pipeline import load_dataset, query_sets

    cfg = build_config(args)
    dataset = load_dataset(cfg)
    frames = []
    for props, queries, path in query_sets(cfg, dataset):
        frame = queries.to_frame(dataset)
        frame.insert(0, "query_set", "+".join(props))
        frames.append(frame)
        print(f"{len(queries)} queries on {'+'.join(queries.properties)} (cached at {path})")
        print(frame.head(5).to_string(index=False))
    print(f"dataset {dataset.name}: {len(dataset)} items; report: {dataset.report or '{}'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pd.concat(frames, ignore_index=True).to_parquet(args.out, index=False)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cir_bench.report.tune_tables import write_tune_report
    from cir_bench.tune import Experiment
    from cir_bench.tune.runner import run_experiment

    import cir_bench_tune_configs

    exp = Experiment.load(cir_bench_tune_configs.resolve(args.config))
    storage = Path(args.storage_path)
    t0 = time.perf_counter()
    tidy, errors = run_experiment(exp, storage, resume=args.resume, address=args.address,
                                  cache_dir=args.cache_dir, verbose=0 if args.no_progress else 1,
                                  trust_storage=args.trust_storage)
    for err in errors:
        print(f"failed trial {err.splitlines()[0][:300]}", file=sys.stderr)
    if tidy.empty:
        print("cir-bench: error: no trial reported a result", file=sys.stderr)
        return 2
    out = storage / exp.name / "report"
    paths = write_tune_report(tidy, out, exp.report_metric)
    print((out / "table.md").read_text())
    print(f"wrote {', '.join(p.name for p in paths)} to {out} in {time.perf_counter() - t0:.0f} s")
    if errors:
        print(f"{len(errors)} trial(s) failed; fix the cause and run again with --resume", file=sys.stderr)
    return 1 if errors else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the Ray Serve app (blocks until Ctrl+C, SIGTERM or `serve --stop`), or stop it."""
    from cir_bench_serve.driver import run_server, stop_server
    from cir_bench_serve.settings import load_serve_config

    if args.stop:
        stop_server(args.address)
        print("cir-bench serve: stopped")
        return 0
    settings = load_serve_config(args.serve_config)  # both configs are checked before any work
    cfg = build_config(args)
    run_server(cfg, settings, args.host or settings.http.host, args.port or settings.http.port, args.address,
               progress=not args.no_progress)
    if not args.address:
        print("cir-bench serve: stopped", flush=True)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from cir_bench.serving.loadtest import run_loadtest, stages_from_flags

    stages = stages_from_flags(args.methods, args.concurrency, args.rates, args.duration, args.warmup,
                               args.max_requests, args.via)
    out = Path(args.out)
    rows = run_loadtest(args.url, stages, out, allow_remote=args.allow_remote)
    cols = ["method", "via", "mode", "concurrency", "rate", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "qps"]
    import pandas as pd

    print(pd.DataFrame(rows)[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"wrote loadtest.json, loadtest.csv, loadtest.png to {out}")
    failed = [f"{r['method']} {r['mode']}" for r in rows if r["requests"] and r["errors"] == r["requests"]]
    if failed:
        print(f"cir-bench: error: every request failed in stage(s) {', '.join(failed)}; see the server's log",
              file=sys.stderr)
        return 1
    return 0


def _names(value: str | None, default: list[str]) -> list[str]:
    if not value or value == "all":
        return list(default)
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_compare(args: argparse.Namespace) -> int:
    """Backward Search vs the CoIR baselines on one dataset; writes comparison.md/.csv/.parquet."""
    from cir_bench_baselines import BASELINES
    from cir_bench_baselines.condition_text import TEMPLATES
    from cir_bench.pipeline.compare import COMPOSED, REFERENCES, run_compare

    names = _names(args.baselines, COMPOSED + REFERENCES)
    for n in names:
        BASELINES.get(n)  # unknown names fail before any work
    templates = _names(args.templates, list(TEMPLATES))
    if set(templates) - set(TEMPLATES):
        raise ValueError(f"--templates: unknown template(s) {sorted(set(templates) - set(TEMPLATES))}; valid: "
                         f"{', '.join(TEMPLATES)}")
    cfg, t0 = build_config(args), time.perf_counter()
    out = run_compare(cfg, names, templates, args.weights_dir, progress=not args.no_progress)
    print()
    print((out / "comparison.md").read_text())
    print(f"wrote comparison.md, comparison.csv, comparison.parquet, significance.csv and the run files to {out} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """report.html + report.md (and the comparison tables of the runs) from the files of runs,
    compares, Tune experiments, load tests and benchmark JSON."""
    from cir_bench.report import ReportOptions, classify, write_html_report, write_report

    inputs = classify([Path(p) for p in args.inputs])
    first = Path(args.inputs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    written = []
    if inputs.runs:
        written += write_report([r.path for r in inputs.runs], out)
    opts = ReportOptions(resamples=args.resamples, seed=args.seed, grid_queries=args.grid_queries,
                         grid_methods=[m.strip() for m in args.grid_methods.split(",") if m.strip()]
                         if args.grid_methods else None)
    t0 = time.perf_counter()
    written += write_html_report(inputs, out, opts)
    print(f"wrote {', '.join(p.name for p in written)} and report_figures/ to {out} "
          f"in {time.perf_counter() - t0:.0f} s")
    print(f"report: {(out / 'report.html').resolve()}")
    return 0


def cmd_check_weights(args: argparse.Namespace) -> int:
    """Which baseline weights are present under the weights root and usable (baselines/check.py)."""
    from cir_bench_baselines import BASELINES
    from cir_bench_baselines.check import check_weights
    from cir_bench_baselines.base import resolve_weights_root

    root, how = resolve_weights_root(args.weights_dir)
    print(f"weights root: {root.resolve()} (from {how})")
    reports = check_weights(root, _names(args.baselines, BASELINES.names()), hash_files=not args.no_hash,
                            load=not args.no_load)
    for report in reports:
        print(f"{report.name}: {report.status}")
        print("\n".join(f"  {line}" for line in report.lines))
    ready = sum(r.status == "ready" for r in reports)
    damaged = sum(r.status == "DAMAGED" for r in reports)
    print(f"{ready} of {len(reports)} baselines ready" + (f", {damaged} with damaged files" if damaged else ""))
    return 1 if damaged else 0


def cmd_list(args: argparse.Namespace) -> int:
    from cir_bench.data import DATASETS
    from cir_bench.search import METHODS
    from cir_bench.metrics import METRICS
    from cir_bench.models import BACKBONES

    from cir_bench_baselines import BASELINES

    registries = {"datasets": DATASETS, "backbones": BACKBONES, "methods": METHODS, "metrics": METRICS,
                  "baselines": BASELINES}
    for kind in [args.kind] if args.kind else list(registries):
        print(f"{kind}: {', '.join(registries[kind].names())}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cir-bench", description="Conditional image retrieval benchmark")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole pipeline: data, train, embed, queries, search, score, write")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/<timestamp>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing run in --out")
    p.add_argument("--methods", help="comma-separated search methods (default: random, knn, filtered_knn, "
                   "oracle_filtered_knn, backward at lambda 0 and at search.lam, student, and the frontier sweep: "
                   "backward and student over lambda, soft_filtered_knn over beta)")
    p.add_argument("--lambda", dest="lambdas", metavar="L1,L2,...",
                   help="also run Backward Search at each of these lambdas, e.g. 0,0.25,1,4,16")
    p.add_argument("--no-report", action="store_true", help="skip report.html/report.md at the end")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="train and evaluate once per seed (under OUT/seed-N/, the same query sets) and write one "
                   "report that pools the seeds, e.g. 0,1,2")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="Backward Search vs the CoIR baselines with weights present (Table 4)")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/<timestamp>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing run in --out")
    p.add_argument("--baselines", help="comma-separated (default all: clip4cir, pic2word, searle, searle-xl, "
                   "searle-oti, lincir, covr, freedom, basic, clip-image, clip-text, clip-sum, clip-product)")
    p.add_argument("--templates", help="condition-text templates (default T1,T2,T3; T1 is the headline)")
    p.add_argument("--weights-dir", help="root of the baseline weights (default $CIR_BENCH_WEIGHTS or "
                   "~/.cache/cir-bench/weights)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="report.html + report.md from the outputs of run, compare, tune, "
                       "loadtest and benchmarks")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="run or compare directories (several seeds of one config are pooled), a tune experiment "
                   "(its folder or report/), a load test (its folder or loadtest.json), a benchmark JSON file")
    p.add_argument("--out", help="where to write the report (default the first input's folder)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstraps, tests and chosen queries")
    p.add_argument("--grid-queries", type=int, default=3, help="retrieval grids per query set (default 3)")
    p.add_argument("--grid-methods", help="comma-separated method labels of the grids (default knn, filtered_knn, "
                   "soft_filtered_knn[beta=1], backward at 0 and the run's λ, student, compared baselines)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("check-weights", help="list the baseline weights found: paths, sizes, sha256")
    p.add_argument("--weights-dir", help="root of the baseline weights")
    p.add_argument("--baselines", help="comma-separated (default all)")
    p.add_argument("--no-hash", action="store_true", help="skip sha256 (fast on multi-GB files)")
    p.add_argument("--no-load", action="store_true",
                   help="do not build the adapters (by default each reads its files: keys and shapes are checked)")
    p.set_defaults(func=cmd_check_weights)

    p = sub.add_parser("train", help="train encoder + heads (or reuse the cached checkpoint)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("embed", help="extract (or reuse) the embedding store")
    _add_config_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("queries", help="build (or reuse) the conditional query set")
    _add_config_args(p)
    p.add_argument("--out", help="also write the query set to this parquet file")
    p.set_defaults(func=cmd_queries)

    p = sub.add_parser("tune", help="Ray Tune: backbone/size grid, λ sweep and λ calibration (tune_configs/*.yaml)")
    p.add_argument("config", nargs="?", default="quick",
                   help="experiment YAML file, or the name of a shipped one: quick (default), emoji, table3, lambda_sweep")
    p.add_argument("--storage-path", default="runs/tune", help="experiment directory root (default runs/tune)")
    p.add_argument("--resume", action="store_true", help="resume an interrupted experiment; finished trials stay")
    p.add_argument("--trust-storage", action="store_true",
                   help="resume even if others can write to the storage folder (its pickled files run as code)")
    p.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    p.add_argument("--cache-dir", help="shared cache of checkpoints/embeddings "
                   "(default $CIR_BENCH_CACHE or ~/.cache/cir-bench)")
    p.add_argument("--no-progress", action="store_true", help="quiet Tune output")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("serve", help="serve conditional search over HTTP with Ray Serve (127.0.0.1 by default)")
    _add_config_args(p)
    p.add_argument("--serve-config", help="Ray Serve settings (default serve/config.yaml)")
    p.add_argument("--host", help="bind address (default from the serve config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from the serve config: 8000)")
    p.add_argument("--stop", action="store_true",
                   help="stop the app: the one at --address, else your one local `cir-bench serve`")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="closed- and open-loop load test of a running `cir-bench serve` (loopback)")
    p.add_argument("url", nargs="?", default="http://127.0.0.1:8000")
    p.add_argument("--methods", default="student,teacher", help="comma-separated: teacher, student, knn")
    p.add_argument("--concurrency", default="1,4,16", help="closed-loop concurrency levels")
    p.add_argument("--rates", default="20", help="open-loop arrival rates (requests/s); empty for none")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per stage")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per stage (excluded)")
    p.add_argument("--max-requests", type=int, default=2000, help="request cap per stage")
    p.add_argument("--via", default="post", help="post (JSON body), get (GET /search?… query string), or "
                   "post,get to measure both side by side")
    p.add_argument("--out", default="runs/loadtest", help="folder for loadtest.json/.csv/.png")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback URL")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("list", help="list registered datasets, backbones, methods, metrics")
    p.add_argument("kind", nargs="?", choices=["datasets", "backbones", "methods", "metrics", "baselines"])
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "address", None) and not getattr(args, "stop", False):
            from cir_bench.cluster import connect

            connect(args.address)  # first: a wrong address or a missing token fails in seconds
        return int(args.func(args))
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"cir-bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
