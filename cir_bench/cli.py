"""cir-bench command line: thin, it parses, builds a config and calls pipeline functions."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from cir_bench.config import ConfigError, RunConfig
from cir_bench.paths import DamagedCacheError, DiskFullError, FolderInUseError, UntrustedFolderError

APP_NAME = "cir-bench"
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, KeyError,
                                               DamagedCacheError, ConnectionError, UntrustedFolderError,
                                               FolderInUseError, DiskFullError)


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


def final_dataset_name(args: argparse.Namespace, config_file: dict[str, Any]) -> str:
    """The dataset a command will run on, by the same precedence as ``build_config``."""
    from cir_bench.config import parse_override, task_preset

    name = RunConfig().dataset.name
    if args.task:
        name = task_preset(args.task)["dataset"]["name"]
    section = config_file.get("dataset") if isinstance(config_file, dict) else None
    if isinstance(section, dict) and isinstance(section.get("name"), str):
        name = section["name"]
    if args.dataset:
        name = args.dataset
    for item in args.set:
        key, value = parse_override(item)
        if key == "dataset.name" and isinstance(value, str):
            name = value
    return name


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run config of a command, validated before any work. Precedence, whatever the
    order on the command line: defaults < --task < --paper-recipe < --config FILE < named
    flags < --set (in the order given)."""
    from cir_bench.config import PAPER_RECIPE, apply_mapping, apply_overrides, blame, dataset_defaults, flat_keys, \
        parse_override, read_yaml, select_dataset, task_preset, validate
    from cir_bench.pipeline.checks import check_run_config

    cfg = RunConfig()
    sources: list[tuple[str, set[str]]] = []  # who set which key, to name it in an error
    data = read_yaml(args.config) if args.config else {}
    name = final_dataset_name(args, data)
    if dataset_defaults(name):
        apply_mapping(cfg, dataset_defaults(name))
        sources.append((f"the defaults of dataset '{name}'", flat_keys(dataset_defaults(name))))
    if args.task:
        apply_mapping(cfg, task_preset(args.task))
        sources.append((f"--task {args.task}", flat_keys(task_preset(args.task))))
    if args.paper_recipe:
        apply_mapping(cfg, PAPER_RECIPE)
        sources.append(("--paper-recipe", flat_keys(PAPER_RECIPE)))
    if args.config:
        try:
            apply_mapping(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{args.config}: {err}", err.key, args.config) from None
        sources.append((args.config, flat_keys(data)))
    if args.dataset:
        select_dataset(cfg, args.dataset)
    if args.root:
        cfg.dataset.root = args.root
    if args.preset:
        cfg.dataset.options = {**cfg.dataset.options, "preset": args.preset}
    if args.skip_bad_images:
        cfg.dataset.options = {**cfg.dataset.options, "skip_bad_images": True}
    if args.address:
        cfg.ray.address = args.address
    if args.ray_embed:
        cfg.ray.embed = True
    if args.strict_queries:
        cfg.queries.strict = True
    for flag in ("seed", "device", "cache_dir", "out"):
        if getattr(args, flag, None) is not None:
            setattr(cfg, flag, getattr(args, flag))
    if getattr(args, "methods", None):
        cfg.eval.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if getattr(args, "lambdas", None):
        try:
            apply_overrides(cfg, [f"eval.lambdas=[{args.lambdas}]"])
        except ConfigError as err:
            raise ConfigError(f"--lambda: {err}", err.key, "--lambda") from None
        sources.append(("--lambda", {"eval.lambdas"}))
    apply_overrides(cfg, list(args.set))
    sources.append(("--set", {parse_override(o)[0] for o in args.set}))
    try:
        cfg = check_run_config(validate(cfg), need_out=getattr(args, "command", None) in ("run", "compare"),
                               overwrite=getattr(args, "overwrite", False))
    except ConfigError as err:
        raise blame(err, sources) from None
    from cir_bench.paths import cache_root, remove_stale_temporaries

    remove_stale_temporaries(cache_root(cfg.cache_dir))  # of writes killed midway, hours ago
    return cfg


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: give at least two different non-negative seeds")
    return seeds


def cmd_run_seeds(args: argparse.Namespace, seeds: list[int]) -> int:
    """One run per training seed under <out>/seed-<n>/ (the query sets drawn once, with the
    first seed, so the seeds differ in training only), then one report that pools them."""
    import copy

    from cir_bench.pipeline import run
    from cir_bench.pipeline.checks import check_run_config
    from cir_bench.pipeline.run import default_out_dir

    cfg = build_config(args)
    base = Path(cfg.out) if cfg.out else default_out_dir(cfg)
    if cfg.queries.seed is None:
        cfg.queries.seed = seeds[0]
    outs, t0 = [], time.perf_counter()
    configs = []
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.seed, one.out = seed, str(base / f"seed-{seed}")
        configs.append(check_run_config(one, need_out=True, overwrite=args.overwrite))  # all checked first
    for one in configs:
        print(f"seed {one.seed}: {one.out}")
        outs.append(run(one, progress=not args.no_progress))
    print(f"\nwrote {len(outs)} runs under {base}/ in {time.perf_counter() - t0:.1f} s")
    if not args.no_report:
        from cir_bench.report import ReportOptions, classify, write_html_report

        t0 = time.perf_counter()
        paths = write_html_report(classify(outs), base, ReportOptions(seed=seeds[0]))
        print(f"report, the seeds pooled ({time.perf_counter() - t0:.0f} s): {paths[0].resolve()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cir_bench.pipeline import run
    from cir_bench.results import format_metrics_table

    if args.seeds:
        if args.seed is not None:
            raise ConfigError("--seed and --seeds: give one of them")
        return cmd_run_seeds(args, _parse_seeds(args.seeds))
    cfg = build_config(args)
    t0 = time.perf_counter()
    out = run(cfg, progress=not args.no_progress)
    print()
    k = cfg.eval.k
    print(format_metrics_table(out, ["query_set", "n_queries", f"precision_at_{k}", f"ap_at_{k}_R",
                                     f"ap_at_{k}_minRk", f"mts_at_{k}", f"context_at_{k}", f"twin_hit_at_{k}",
                                     "mean_iterations", f"retrieved_similarity_at_{k}", "ms_per_query"]))
    print(f"(precision_at_{k} is the paper's \"mAP@{k}\", paper def.)")
    print(f"\nwrote {out}/ (results.parquet, metrics.csv, items.parquet, map_points.parquet, manifest.json) "
          f"in {time.perf_counter() - t0:.1f} s")
    if not args.no_report:
        from cir_bench.report import ReportOptions, classify, write_html_report

        t0 = time.perf_counter()
        paths = write_html_report(classify([out]), out, ReportOptions(seed=cfg.seed))
        print(f"report ({time.perf_counter() - t0:.0f} s): {paths[0].resolve()}")
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

    import tune_configs

    exp = Experiment.load(tune_configs.resolve(args.config))
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


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: Serve's proxy shares a port with another
    proxy (SO_REUSEPORT), and two apps would then answer in turn. Connections of a server
    stopped moments ago (TIME_WAIT, thousands after a load test) do not count: the proxy
    binds past them too (SO_REUSEADDR), and so does this probe."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"--port {port}: {host}:{port} is not free ({err.strerror}); another cir-bench serve? "
                              "Stop it (Ctrl+C, or `cir-bench serve --stop --address ADDR`) or pick another "
                              "--port") from None


def _app_running(name: str) -> bool:
    from ray import serve

    try:
        return name in serve.status().applications
    except Exception:  # noqa: BLE001 -- the controller is gone: Serve was shut down
        return False


def _print_teacher(url: str) -> None:
    """Whether the served teacher compiled its search step (teacher.compile), from /stats."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
            teacher = json.loads(response.read()).get("teacher", {})
    except (OSError, ValueError):
        return  # e.g. a cluster's HTTP proxy this machine cannot reach: the server is up anyway
    if "compile" in teacher:
        print(f"cir-bench serve: teacher torch.compile {teacher['compile']}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the Ray Serve app (blocks until Ctrl+C, SIGTERM or `serve --stop`), or stop it."""
    import os

    from serve.settings import load_serve_config

    # Serve kills a proxy that is not ready within 5 s (its default); a small, busy machine
    # can take longer to start one. Ray's processes inherit this from the one that starts Ray.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    if args.stop:
        from serve.runtime import LOCAL_RAY, is_loopback, local_servers

        if not args.address:  # Ray's "auto" may find another user's cluster: only this user's servers
            mine = local_servers()
            if len(mine) != 1:
                raise ConfigError("serve --stop: " + ("no `cir-bench serve` of yours is running on this machine"
                                                      if not mine else "several of your servers run: " +
                                                      ", ".join(f"pid {pid} (Ray at {addr})" for pid, addr in mine))
                                  + "; name one with --address HOST:PORT (the server printed it)")
            args.address = mine[0][1]
        if is_loopback(args.address):
            os.environ[LOCAL_RAY] = "0"  # a local server's Ray is on 127.0.0.1: join it as a driver there
        from ray import serve

        from cir_bench.embed.ray_extract import ensure_ray

        ensure_ray(args.address or "auto")
        serve.shutdown()
        print("cir-bench serve: stopped")
        return 0
    sc = load_serve_config(args.serve_config)  # both configs are checked before any work
    cfg = build_config(args)
    host, port = args.host or sc.http.host, args.port or sc.http.port
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if not args.address:
        _check_port_free(host, port)
        # Serve's switches (serve/runtime.py) are read from the environment when a process
        # imports Serve: set before ray is imported here and before the local Ray starts, and
        # only once the arguments are known to be good (a refused call leaves the environment
        # as it was: callers in the same process, e.g. tests, would otherwise inherit them)
        from serve.runtime import serve_environment

        os.environ.update(serve_environment(sc.ray_serve.haproxy, sc.ray_serve.throughput_optimized,
                                            http_port=port))
    else:  # before any work: the replicas load the bundle's files from the cache on their nodes
        from cir_bench.embed.cluster import join
        from cir_bench.pipeline import cache_dir_for

        join(args.address, cache_dir_for(cfg), [cfg.dataset.root] if cfg.dataset.root else [])
    from ray import serve

    from cir_bench.embed.ray_extract import ensure_ray
    from cir_bench.serving import build_bundle
    from serve.app import build_app, with_index

    # train or load the model, embeddings and students once, here; the deployments load the files
    bundle = build_bundle(cfg, progress=not args.no_progress)
    bundle = with_index(bundle, sc, cfg.eval.search_batch)
    ensure_ray(args.address)
    if not args.address:
        _check_port_free(host, port)  # again: another server may have started meanwhile
    try:
        serve.start(http_options={"host": host, "port": int(port)})
        import dataclasses

        served = dataclasses.replace(sc, http=dataclasses.replace(sc.http, host=host, port=int(port)))
        serve.run(build_app(bundle, served), route_prefix="/", name=APP_NAME)
    except RuntimeError as err:
        if "HAProxy" not in str(err):
            raise
        alerts = [line.split(":", 1)[-1].strip() for line in str(err).splitlines() if "[ALERT]" in line]
        raise ConfigError(f"Ray's HAProxy (ray_serve.haproxy) did not start: {'; '.join(alerts[:2]) or err}. "
                          "Set ray_serve.haproxy: false in the serve config to use Ray's Python proxy") from None
    import ray

    url = f"http://{host}:{port}"
    print(f"cir-bench serve: {url}  (POST /search, GET /healthz, GET /properties, GET /stats, OpenAPI at /docs)",
          flush=True)
    _print_teacher(url)
    if args.address:
        if sc.ray_serve.haproxy or sc.ray_serve.throughput_optimized:
            print("cir-bench serve: on a cluster Serve's switches (ray_serve in the serve config) are the ones "
                  "`ray start` was given on each node: RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 "
                  "ray start ... (README, Running on a Ray cluster)", flush=True)
        return 0  # deployed on the cluster; `cir-bench serve --stop --address ...` removes it
    from serve.runtime import runtime_dir

    (runtime_dir() / "ray-address").write_text(ray.get_runtime_context().gcs_address)  # for serve --stop
    print(f"cir-bench serve: Ray at {ray.get_runtime_context().gcs_address}; stop with Ctrl+C or "
          f"`cir-bench serve --stop --address {ray.get_runtime_context().gcs_address}`", flush=True)
    import signal

    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ray installs its own handlers; ours decide
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    checked = time.monotonic()
    while not stop:
        time.sleep(0.2)
        if time.monotonic() - checked > 1.0:
            checked = time.monotonic()
            if not _app_running(APP_NAME):  # removed by `serve --stop` from another process
                break
    if stop:
        serve.shutdown()
    ray.shutdown()
    import shutil

    from serve.runtime import runtime_folder_root

    shutil.rmtree(runtime_folder_root() / str(os.getpid()), ignore_errors=True)  # HAProxy's files, the address
    print("cir-bench serve: stopped", flush=True)
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from cir_bench.serving.loadtest import default_stages, run_loadtest

    def numbers(flag: str, text: str, kind=float) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None

    stages = default_stages([m.strip() for m in args.methods.split(",") if m.strip()],
                            numbers("--concurrency", args.concurrency, int),
                            numbers("--rates", args.rates) if args.rates else [], args.duration, args.warmup,
                            args.max_requests, tuple(v.strip() for v in args.via.split(",") if v.strip()))
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
    from baselines import BASELINES
    from baselines.condition_text import TEMPLATES
    from cir_bench.pipeline.compare import COMPOSED, REFERENCES, run_compare

    cfg = build_config(args)
    names = _names(args.baselines, COMPOSED + REFERENCES)
    for n in names:
        BASELINES.get(n)  # unknown names fail before any work
    templates = _names(args.templates, list(TEMPLATES))
    for t in templates:
        if t not in TEMPLATES:
            raise ValueError(f"--templates: unknown template {t!r}; valid: {', '.join(TEMPLATES)}")
    t0 = time.perf_counter()
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
    """Which baseline weights are present under the weights root and usable: paths, sizes,
    sha256; a file that cannot be the weights (HTML page, truncated, damaged) is DAMAGED."""
    from baselines import BASELINES
    from baselines.base import BadWeightsError, resolve_weights_root, sha256

    root, how = resolve_weights_root(args.weights_dir)
    print(f"weights root: {root.resolve()} (from {how})")
    names = _names(args.baselines, BASELINES.names())
    ready = damaged = 0
    for name in names:
        files = BASELINES.get(name).required_files()
        lines, status = [], "ready"
        for f in files:
            path = f.find(root)
            if path is None:
                status = "MISSING" if status == "ready" else status
                lines.append(f"  missing  {(root / f.path).resolve()}  ({f.source}; licence: {f.licence})")
                continue
            try:
                f.check(path)
            except BadWeightsError as err:
                status = "DAMAGED"
                lines.append(f"  damaged  {path.resolve()}: {err}")
                continue
            lines.append(f"  found    {path.resolve()}  {path.stat().st_size:,} bytes  sha256 "
                         f"{sha256(path) if not args.no_hash else '(not computed)'}")
        if status == "ready" and not args.no_load:  # the adapter reads its files: keys and shapes
            from baselines import get_composer

            try:
                get_composer(name, root, device="cpu")
            except BadWeightsError as err:
                status = "DAMAGED"
                lines.append(f"  damaged  {err}")
        ready += status == "ready"
        damaged += status == "DAMAGED"
        print(f"{name}: {status}")
        print("\n".join(lines))
    print(f"{ready} of {len(names)} baselines ready" + (f", {damaged} with damaged files" if damaged else ""))
    return 1 if damaged else 0


def cmd_list(args: argparse.Namespace) -> int:
    from cir_bench.data import DATASETS
    from cir_bench.search import METHODS
    from cir_bench.metrics import METRICS
    from cir_bench.models import BACKBONES

    from baselines import BASELINES

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
                   "clip-image, clip-text, clip-sum)")
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
            from cir_bench.embed.cluster import connect

            connect(args.address)  # first: a wrong address or a missing token fails in seconds
        return int(args.func(args))
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"cir-bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
