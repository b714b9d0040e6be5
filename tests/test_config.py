"""The config means what it says: flags applied to the typed config in a fixed precedence,
every value checked before any work, the tune and serve files checked the same way."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cir_bench.cli import build_config, main, make_parser
from cir_bench.config import ConfigError, RunConfig, load_config

from . import replicas


def _cfg(argv: list[str]) -> RunConfig:
    return build_config(make_parser().parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["run", "--dataset", "csv", "--root", "{root}", "--set", "dataset.options.test_fraction=0.5"],
    ["run", "--set", "dataset.options.test_fraction=0.5", "--dataset", "csv", "--root", "{root}"],
    ["run", "--root", "{root}", "--set", "dataset.options.test_fraction=0.5", "--dataset", "csv"],
])
def test_flag_order_does_not_matter(argv, tmp_path):
    root = replicas.csv_folder(tmp_path / "csv")
    cfg = _cfg([a.format(root=root) for a in argv])
    assert cfg.dataset.name == "csv" and cfg.dataset.root == str(root)
    assert cfg.dataset.options == {"test_fraction": 0.5}


def test_switching_dataset_drops_the_previous_datasets_options(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: {name: synthart, options: {preset: small}}\ntrain: {epochs: 3}\n")
    root = replicas.csv_folder(tmp_path / "csv")
    cfg = _cfg(["run", "--config", str(config), "--dataset", "csv", "--root", str(root),
                "--set", "dataset.options.seed=4"])
    assert cfg.dataset.options == {"seed": 4} and cfg.train.epochs == 3
    same = _cfg(["run", "--config", str(config), "--dataset", "synthart", "--preset", "tiny"])
    assert same.dataset.options == {"preset": "tiny"}  # same dataset: its options stay, the flag wins


def test_precedence_task_recipe_file_flags_set(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {embed_dim: 512}\nqueries: {n_queries: 50}\n")
    root = replicas.cub(tmp_path / "cub")
    cfg = _cfg(["run", "--set", "model.embed_dim=64", "--task", "cub-bird", "--root", str(root),
                "--paper-recipe", "--config", str(config), "--seed", "3"])
    assert cfg.dataset.name == "cub" and cfg.queries.sets == [["bird"]]  # --task
    assert cfg.model.backbone == "convnext_base" and cfg.train.epochs == 100  # --paper-recipe
    assert cfg.queries.n_queries == 50  # the file over the task
    assert cfg.model.embed_dim == 64 and cfg.seed == 3  # --set over all


def test_run_records_the_option_whatever_the_flag_order(tmp_path, cache_dir):
    root = replicas.csv_folder(tmp_path / "csv")
    out = tmp_path / "run"
    code = main(["run", "--no-progress", "--set", "dataset.options.test_fraction=0.5", "--dataset", "csv",
                 "--root", str(root), "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu",
                 "--methods", "knn", "--set", "train.epochs=1", "--set", "model.input_size=32",
                 "--set", "queries.n_queries=4", "--set", "queries.min_relevant=2", "--set", "eval.k=3",
                 "--set", "eval.lambda_curve=[]"])  # the λ curve is not what this checks
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["dataset"]["options"] == {"test_fraction": 0.5}


@pytest.mark.parametrize("args, key", [
    (["--lambda", "nan,inf"], "eval.lambdas[0]"),
    (["--lambda", "-1"], "eval.lambdas[0]"),
    (["--set", "search.lam=-1"], "search.lam"),
    (["--set", "search.lam=.inf"], "search.lam"),
    (["--set", "eval.k=0"], "eval.k"),
    (["--set", "train.batch_size=0"], "train.batch_size"),
    (["--set", "model.embed_dim=0"], "model.embed_dim"),
    (["--set", "train.epochs=-1"], "train.epochs"),
    (["--set", "train.lr=fast"], "train.lr"),
    (["--set", "search.lr_typo=0.1"], "search.lr_typo"),
    (["--set", "search.overrides={lr: 0.1}"], "search.overrides"),
    (["--set", "search.stopping=sometimes"], "search.stopping"),
    (["--set", "student.dropout=1.5"], "student.dropout"),
    (["--set", "eval.methods=[knn, telepathy]"], "eval.methods"),
    (["--set", "eval.methods=[{method: knn, lam: 1}]"], "eval.methods"),
    (["--set", "model.backbone=resnet5000"], "model.backbone"),
    (["--set", "eval.index=annoy"], "eval.index"),
    (["--set", "dataset.options.presett=tiny"], "dataset.options.presett"),
    (["--preset", "huge"], "dataset.options.preset"),
    (["--set", "device=gpu"], "device"),
    (["--seed", "-3"], "seed"),
    (["--device", "tpu"], "device"),
    (["--lambda", "abc"], "eval.lambdas[0]"),
])
def test_bad_values_fail_before_any_work_naming_the_key(args, key, tmp_path, capsys):
    out = tmp_path / "never"
    t0 = time.perf_counter()
    assert main(["run", "--no-progress", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert f"'{key}" in err, err
    assert time.perf_counter() - t0 < 10 and not out.exists()


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("x")
    assert main(["run", "--out", str(file)]) == 2
    assert "'out'" in capsys.readouterr().err


def test_dataset_option_values_are_checked(tmp_path, capsys):
    root = replicas.csv_folder(tmp_path / "csv")
    assert main(["run", "--dataset", "csv", "--root", str(root), "--set", "dataset.options.test_fraction=1.5"]) == 2
    assert "'dataset.options.test_fraction' must be in (0, 1)" in capsys.readouterr().err
    assert main(["run", "--dataset", "csv", "--root", str(root), "--skip-bad-images",
                 "--set", "dataset.options.skip_bad_images=maybe"]) == 2
    assert "'dataset.options.skip_bad_images' expects true or false" in capsys.readouterr().err


def test_config_file_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: config key 'train.epochs' must be >= 1"):
        load_config(bad)
    bad.write_text("trian: {epochs: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'trian'"):
        load_config(bad)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_search_and_student_sections_are_typed():
    cfg = load_config(None, ["search.lr=0.1", "search.stopping=satisfied", "student.hidden=[64]",
                             "search.condition_weights={style: 2}"])
    assert cfg.search.overrides() == {"lr": 0.1, "stopping": "satisfied", "condition_weights": {"style": 2.0}}
    assert cfg.student.hidden == [64]
    from cir_bench.pipeline import teacher

    bs = teacher(cfg)
    assert bs.config.lr == 0.1 and bs.config.stopping == "satisfied" and bs.config.patience == 10  # preset's


def test_search_section_has_every_backward_search_setting():
    import dataclasses

    from cir_bench.config import SearchConfig
    from cir_bench.search.backward import BackwardSearchConfig

    # engine, check_every and gradient choose how the loop runs (BackwardSearch's own arguments), not what
    # it computes
    assert set(SearchConfig.model_fields) - {"preset", "engine", "check_every", "gradient",
                                                                  "compile"} == \
        {f.name for f in dataclasses.fields(BackwardSearchConfig)}


def test_tune_file_is_checked_before_ray_naming_file_and_key(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: x\nbase: {train: {epochs: 2}}\ngrid: {model.embed_dim: [32, 0]}\n")
    t0 = time.perf_counter()
    assert main(["tune", str(exp), "--storage-path", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "exp.yaml" in err and "'model.embed_dim' must be >= 1" in err and "model.embed_dim': 0" in err
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "t").exists()
    for text, message in [("name: x\nbase: {search: {lr_typo: 1}}\n", "unknown config key 'search.lr_typo'"),
                          ("name: x\ngrid: {model.backbone: [resnet5000]}\n", "model.backbone"),
                          ("name: x\nresources: {cpu: -1}\n", "'resources.cpu' must be >= 0"),
                          ("name: x\ncalibration: {lam_min: 2, lam_max: 1}\n", "lam_min must be < "),
                          ("name: x\nseeds: [0]\nlambdas: [0, -1]\n", "'lambdas[1]' must be >= 0"),
                          ("nam: x\n", "unknown config key 'nam'"),
                          ("name: [x\n", "is not valid YAML"),
                          ("name: x\ncalibration: {metricc: mts_at_10}\n", "unknown config key 'calibration.metricc'")]:
        exp.write_text(text)
        assert main(["tune", str(exp), "--storage-path", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err
        assert message in err and "exp.yaml" in err, err


def test_serve_config_is_checked_before_any_work(tmp_path, capsys):
    bad = tmp_path / "serve.yaml"
    bad.write_text("deployments:\n  teacher: {num_replicas: 0}\n")
    t0 = time.perf_counter()
    assert main(["serve", "--serve-config", str(bad), "--port", "8799"]) == 2
    err = capsys.readouterr().err
    assert "serve.yaml" in err and "'deployments.teacher.num_replicas' must be >= 1" in err
    assert time.perf_counter() - t0 < 10


def test_tune_starts_from_outside_the_checkout(tmp_path):
    """The shipped experiments are package data: found from any working directory."""
    code = ("import cir_bench_tune_configs as tc; from cir_bench.tune import Experiment; "
            "e = Experiment.load(tc.resolve('quick')); print(e.name, len(e.trials()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["quick", "2"], done.stderr
    cli = Path(sys.executable).with_name("cir-bench")
    if cli.exists():
        helped = subprocess.run([str(cli), "tune", "--help"], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert helped.returncode == 0 and "quick (default)" in helped.stdout
    with pytest.raises(FileNotFoundError, match="quick, table3"):
        __import__("cir_bench_tune_configs").resolve("no-such-experiment")


def test_wheel_carries_the_shipped_configs(tmp_path):
    """Installed from a wheel, outside any checkout, `cir-bench tune` finds its default
    experiment and `cir-bench serve` its settings."""
    import shutil

    # built from a copy without build/ (setuptools packs whatever an earlier build left in build/lib)
    root = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parent.parent, root, ignore=shutil.ignore_patterns(
        ".venv", "build", "runs", ".git", "*.egg-info", "__pycache__", "gpu-out", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(root)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr[-300:]}")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import cir_bench, cir_bench_tune_configs as tc, cir_bench_serve.settings as s; "
            "from cir_bench.tune import Experiment; "
            "print(cir_bench.__file__); print(Experiment.load(tc.resolve('quick')).name); "
            "print(len(s.load_serve_config().deployments))")
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    where, name, deployments = done.stdout.split()
    assert where.startswith(str(site)) and name == "quick" and deployments == "5"
    # the project's folders install under its own names: nothing squats a generic top-level name
    top = {p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__"))
           and p.name != "bin"}
    assert top == {"cir_bench", "cir_bench_serve", "cir_bench_baselines", "cir_bench_tune_configs"}, top
    helped = subprocess.run([sys.executable, "-m", "cir_bench.cli", "tune", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "quick (default)" in helped.stdout


def test_out_holding_a_run_needs_overwrite(tmp_path, cache_dir, capsys):
    root = replicas.csv_folder(tmp_path / "csv")
    out = tmp_path / "run"
    args = ["run", "--no-progress", "--dataset", "csv", "--root", str(root), "--out", str(out),
            "--cache-dir", str(cache_dir), "--device", "cpu", "--methods", "knn", "--set", "train.epochs=1",
            "--set", "model.input_size=32", "--set", "queries.n_queries=4", "--set", "queries.min_relevant=2",
            "--set", "eval.lambda_curve=[]"]  # the λ curve is not what this checks
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run (manifest.json); pass --overwrite" in err
    assert main([*args, "--overwrite"]) == 0


def test_report_names_a_broken_run_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("query_set,method,params\nstyle,knn,{}\n")
    (run / "manifest.json").write_text("{not json")
    for name in ("results.parquet", "items.parquet"):
        (run / name).write_bytes(b"PAR1")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'manifest.json'}: cannot be read" in err


def test_duplicate_ids_are_named(tmp_path):
    from cir_bench.data import get_dataset

    root = replicas.csv_folder(tmp_path / "csv")
    table = root / "labels.csv"
    lines = table.read_text().splitlines()
    header = lines[0].split(",")
    rows = [line.split(",") for line in lines[1:]]
    if "id" not in header:
        header.append("id")
        rows = [r + [f"x{i}"] for i, r in enumerate(rows)]
    col = header.index("id")
    rows[3][col] = rows[1][col]
    table.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")
    with pytest.raises(ValueError, match=rf"1 duplicate item id\(s\): '{rows[1][col]}' at items \[1, 3\]"):
        get_dataset("csv", str(root), {})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_a_clear_error(capsys):
    assert main(["run", "--device", "cuda"]) == 2
    assert "'device': 'cuda' asked for, but CUDA is not available" in capsys.readouterr().err


def test_invalid_port_is_refused(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err


def test_serve_ingress_local_stages_are_checked():
    from cir_bench.config import ConfigError
    from cir_bench_serve.settings import settings_from_dict

    assert settings_from_dict({}).ingress.local == ["student", "index", "teacher"]
    assert settings_from_dict({"ingress": {"local": []}}).ingress.local == []
    assert settings_from_dict({"ingress": {"local": ["teacher"]}}).ingress.local == ["teacher"]
    with pytest.raises(ConfigError, match=r"ingress.local\[0\].*student, index, teacher"):
        settings_from_dict({"ingress": {"local": ["encoder"]}})


def test_a_dataset_brings_its_own_defaults_beneath_everything_the_user_sets(tmp_path):
    """emoji starts from the pretrained Lite0 (frozen, 128 px), whatever names the dataset; the
    user's file, flags and --set win; other datasets keep the global defaults."""
    from cir_bench.tune import Experiment, trial_config

    cfg = _cfg(["run", "--dataset", "emoji"])
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.finetune, cfg.model.input_size) == \
        ("efficientnet_lite0", True, False, 128)
    assert _cfg(["run", "--dataset", "emoji", "--set", "model.finetune=true"]).model.finetune is True
    assert _cfg(["run", "--set", "dataset.name=emoji"]).model.backbone == "efficientnet_lite0"
    config = tmp_path / "c.yaml"
    config.write_text("dataset: {name: emoji}\nmodel: {embed_dim: 64}\n")
    from_file = _cfg(["run", "--config", str(config)])
    assert (from_file.model.backbone, from_file.model.embed_dim) == ("efficientnet_lite0", 64)
    assert _cfg(["run", "--config", str(config), "--dataset", "synthart"]).model.backbone == "small_cnn"
    assert _cfg(["run"]).model == RunConfig().model
    domains = _cfg(["run", "--dataset", "domains", "--root", str(tmp_path)])
    assert (domains.queries.query_split, domains.queries.database_split) == ("query", "database")
    exp = Experiment.from_dict({"name": "e", "base": {"dataset": {"name": "emoji"}},
                                "grid": {"model.finetune": [False, True]}})
    trials = [trial_config(exp, t, None) for t in exp.trials()]
    assert [(t.model.backbone, t.model.finetune) for t in trials] == [("efficientnet_lite0", False),
                                                                       ("efficientnet_lite0", True)]


def test_every_config_section_is_a_pydantic_section_that_refuses_unknown_keys():
    """The run config, tune experiments and the serve settings share one checker (pydantic via
    ``config.Section``): every nested section forbids unknown keys and checks assignments."""
    from pydantic import BaseModel

    from cir_bench.config import Section, _section_type, dotted_key
    from cir_bench.tune.experiment import Experiment
    from cir_bench_serve.settings import ServeSettings

    seen: set[type] = set()

    def walk(cls: type[BaseModel]) -> None:
        seen.add(cls)
        assert issubclass(cls, Section), cls
        assert cls.model_config["extra"] == "forbid" and cls.model_config["validate_assignment"], cls
        for field in cls.model_fields.values():
            inner = _section_type(field.annotation)
            args = [_section_type(a) for a in getattr(field.annotation, "__args__", ())]
            for sub in [inner, *args]:
                if sub is not None and sub not in seen:
                    walk(sub)

    for root in (RunConfig, Experiment, ServeSettings):
        walk(root)
    assert len(seen) >= 20
    cfg = RunConfig()
    with pytest.raises(Exception, match="greater than or equal"):
        cfg.train.epochs = 0  # an assignment in code is checked too
    assert dotted_key(("eval", "lambdas", 0)) == "eval.lambdas[0]"


def test_the_shipped_gpu_serve_config_puts_encoder_and_teacher_on_the_gpu(capsys):
    """serve/config.gpu.yaml: the encoder and the teacher batched on GPU replicas of their own, the
    student and index in the ingress; on a machine without CUDA `serve` refuses it before any work."""
    import torch

    from cir_bench_serve.settings import default_path, load_serve_config

    path = default_path().with_name("config.gpu.yaml")
    settings = load_serve_config(path)
    assert settings.deployments["teacher"].ray_actor_options.num_gpus > 0
    assert settings.deployments["encoder"].ray_actor_options.num_gpus > 0
    assert "teacher" not in settings.ingress.local and settings.batch("teacher").max_batch_size >= 64
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    t0 = time.perf_counter()
    assert main(["serve", "--serve-config", str(path), "--port", "8797", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "gives encoder, teacher a GPU" in err and "no CUDA device" in err
    assert time.perf_counter() - t0 < 10
