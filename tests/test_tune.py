"""cir-bench tune through real Ray Tune on SynthArt tiny: sweep, calibration, report, resume."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from cir_bench.cli import main


def _experiment(tmp_path, cache_dir, **extra) -> str:
    exp = {
        "name": "tiny",
        "base": {"dataset": {"name": "synthart", "options": {"preset": "tiny"}},
                 "train": {"epochs": 2, "batch_size": 32},
                 "queries": {"sets": [["style"]], "n_queries": 20, "min_relevant": 2}, "device": "cpu"},
        "grid": {"model.embed_dim": [32, 64]},
        "lambdas": [0.0, 0.01, 1.0],
        "calibration": {"metric": "mts_at_10", "target": 0.2, "tolerance": 0.02, "lam_min": 1e-4, "lam_max": 10.0,
                        "max_evals": 5, "fraction": 0.5},
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 0,
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(exp))
    return str(path)


def test_tune_two_trials_sweep_calibrate_report(local_ray, tmp_path, cache_dir, capsys):
    config = _experiment(tmp_path, cache_dir)
    storage = tmp_path / "tune"
    assert main(["tune", config, "--storage-path", str(storage), "--cache-dir", str(cache_dir),
                 "--no-progress"]) == 0
    out = storage / "tiny" / "report"
    tidy = pd.read_parquet(out / "tune_results.parquet")
    sweep = tidy[tidy["kind"] == "sweep"]
    assert len(sweep) == 2 * 3 and set(sweep["model.embed_dim"]) == {32, 64}
    assert set(sweep["lam"]) == {0.0, 0.01, 1.0} and sweep["precision_at_10"].between(0, 1).all()
    cal = tidy[tidy["kind"] == "calibrated"]
    assert len(cal) == 2 and set(cal["cal_status"]) <= {"ok", "unreachable", "max_evals"}
    table = (out / "table.md").read_text()
    assert "configuration" in table and "calibrated" in table
    assert (out / "lambda_curves.png").stat().st_size > 0


def test_resume_finishes_without_rerunning_finished_trials(local_ray, tmp_path, cache_dir):
    """A failed trial (max_failures 0) fails the command; --resume runs only that trial again."""
    import ray.cloudpickle

    from cir_bench.tune import Experiment
    from cir_bench.tune.runner import run_experiment

    from . import tune_faults

    ray.cloudpickle.register_pickle_by_value(tune_faults)  # workers need not import tests/
    marker, trace = tmp_path / "fail-now", tmp_path / "trace.jsonl"
    marker.write_text("x")
    exp = Experiment.load(_experiment(tmp_path, cache_dir, calibration=None))
    storage = tmp_path / "tune"
    kwargs = {"cache_dir": str(cache_dir), "verbose": 0,
              "trainable": tune_faults.faulty_trainable(str(marker), exp.trials()[1], str(trace))}
    tidy, errors = run_experiment(exp, storage, **kwargs)
    assert len(errors) == 1 and "injected failure" in errors[0]
    first = [json.loads(line) for line in trace.read_text().splitlines()]
    assert first == [exp.trials()[0]]  # the failing trial raised before writing its trace line
    marker.unlink()
    tidy, errors = run_experiment(exp, storage, resume=True, **kwargs)
    assert errors == []
    runs = [json.loads(line) for line in trace.read_text().splitlines()]
    assert runs == [exp.trials()[0], exp.trials()[1]]  # only the failed trial ran again
    assert set(tidy["model.embed_dim"]) == {32, 64}


def test_shipped_experiment_files_parse_and_expand():
    import cir_bench_tune_configs
    from cir_bench.tune import Experiment, trial_config

    assert cir_bench_tune_configs.names() == ["emoji", "lambda_sweep", "quick", "table3"]
    emoji = Experiment.load(cir_bench_tune_configs.resolve("emoji"))
    trials = [trial_config(emoji, t, None) for t in emoji.trials()]
    assert len(trials) == 2 * 2 * 2 and {t.model.backbone for t in trials} == {"efficientnet_lite0"}
    assert {(t.model.finetune, t.train.epochs) for t in trials} == {(False, 20), (True, 1)}
    table3 = Experiment.load(cir_bench_tune_configs.resolve("table3"))
    assert len(table3.trials()) == 4 * 4 * 2 * 3
    cfg = trial_config(table3, table3.trials()[0], None)
    assert cfg.dataset.name == "cub" and cfg.dataset.root == "/data/CUB" and cfg.queries.n_queries == 1000
    assert cfg.model.backbone == "vgg16_bn" and cfg.search.preset == "authors-code"
    sweep = Experiment.load(cir_bench_tune_configs.resolve("lambda_sweep.yaml"))
    assert sweep.calibration is None and len(sweep.lambdas) == 11
    quick = Experiment.load(cir_bench_tune_configs.resolve("quick"))
    assert trial_config(quick, quick.trials()[0], None).dataset.options == {"preset": "default"}


def test_calibration_on_synthart_tiny(tiny_config, tiny, tiny_trained):
    from cir_bench.tune.calibrate import calibrate
    from cir_bench.search.backward import BackwardSearch
    from cir_bench.pipeline import make_queries, prepare
    from cir_bench.tune.runner import _evaluate

    prepared = prepare(tiny_config, progress=False, dataset=tiny)
    queries, _ = make_queries(tiny_config, tiny, ["style"])

    def mts(lam: float) -> float:
        return _evaluate(prepared.ctx, queries, BackwardSearch(lam=lam, stopping="none", max_iter=30), 10)["mts_at_10"]

    lo, hi = mts(1e-4), mts(1.0)
    assert hi > lo  # the trade-off: tag similarity rises with λ
    target = (lo + hi) / 2
    result = calibrate(mts, target, tolerance=(hi - lo) / 8, lam_min=1e-4, lam_max=1.0, max_evals=10)
    assert result.status == "ok" and abs(result.value - target) <= (hi - lo) / 8
    unreachable = calibrate(mts, hi + 0.5, tolerance=0.01, lam_min=1e-4, lam_max=1.0)
    assert unreachable.status == "unreachable" and unreachable.lam is None


def test_resume_refuses_a_storage_folder_others_can_write(tmp_path, cache_dir, capsys):
    """Tune's tuner.pkl is unpickled on --resume: from a folder another user can write, that runs
    their code. Refused, naming the folder, before anything is loaded; --trust-storage says what
    it trusts."""
    import pickle

    from cir_bench.paths import UntrustedFolderError, check_private_tree

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    storage = tmp_path / "shared-tune"
    exp_dir = storage / "tiny"
    exp_dir.mkdir(parents=True)
    (exp_dir / "tuner.pkl").write_bytes(pickle.dumps(Payload()))
    exp_dir.chmod(0o777)
    config = _experiment(tmp_path, cache_dir)
    assert main(["tune", config, "--storage-path", str(storage), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{exp_dir}: writable by others" in err and "--trust-storage" in err and len(err.splitlines()) == 1
    assert not marker.exists()
    exp_dir.chmod(0o755)
    check_private_tree(exp_dir, flag="--trust-storage")  # private now
    (exp_dir / "tuner.pkl").chmod(0o666)
    try:
        check_private_tree(exp_dir, flag="--trust-storage")
        raise AssertionError("a file others can write was accepted")
    except UntrustedFolderError as refused:
        assert refused.path == exp_dir / "tuner.pkl" and "writable by others" in refused.reason


def test_a_joined_grid_key_sets_its_keys_together():
    from cir_bench.config import ConfigError
    from cir_bench.tune import Experiment, trial_config

    exp = Experiment.from_dict({"name": "e", "base": {"dataset": {"name": "emoji"}},
                                "grid": {"model.finetune+train.epochs": [[False, 20], [True, 1]],
                                         "model.embed_dim": [64, 128]}, "seeds": [0]})
    got = [(c.model.finetune, c.train.epochs, c.model.embed_dim)
           for c in (trial_config(exp, t, None) for t in exp.trials())]
    assert got == [(False, 20, 64), (False, 20, 128), (True, 1, 64), (True, 1, 128)]
    bad = Experiment.from_dict({"name": "e", "grid": {"model.finetune+train.epochs": [[False]]}})
    with pytest.raises(ConfigError, match=r"grid.model.finetune\+train.epochs: each value must list 2 values"):
        bad.trials()
