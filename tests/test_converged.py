"""Eq 4 solved to its tolerance (search/proximal.py, preset ``converged``), the CE-only
plateau, and the λ grid solved as one batch."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cir_bench.search.backward import BackwardSearch, BackwardSearchConfig

LAMS = [1e-4, 1e-3, 1e-2]


@pytest.fixture(scope="module")
def problem(tiny_search):
    ds, store, model = tiny_search
    z0 = store.z[:24]
    with torch.no_grad():
        own = model.heads["style"](z0).argmax(1)
    cond = ((own + 1) % 6)[:, None]
    return model, z0, cond


def _objective64(model, z, z0, cond, lam):
    """Eq 4 (paper preset: CE + λ·sum|z − z0|) through the heads' own forward, in float64."""
    head = copy.deepcopy(model.heads["style"]).double().eval()
    z = z.double().detach().requires_grad_(True)
    ce = F.cross_entropy(head(z), cond[:, 0], reduction="none")
    return ce, torch.autograd.grad(ce.sum(), z)[0], (ce + lam * (z - z0.double()).abs().sum(1)).detach()


@pytest.mark.parametrize("lam", LAMS)
def test_converged_reaches_a_lower_objective_than_the_preset_and_a_stationary_point(problem, lam):
    model, z0, cond = problem
    preset = BackwardSearch("paper", lam=lam).invert(model.heads, z0, ["style"], cond)
    conv = BackwardSearch("converged", lam=lam).invert(model.heads, z0, ["style"], cond)
    # the objective each reports is Eq 4 at its vector (recomputed here through autograd)
    for r in (preset, conv):
        _, _, value = _objective64(model, r.z, z0, cond, lam)
        assert np.allclose(r.objective.numpy(), value.numpy(), rtol=1e-4, atol=1e-6)
    assert float(conv.objective.mean()) < float(preset.objective.mean())
    assert float((conv.objective <= preset.objective + 1e-6).float().mean()) >= 0.9
    # first-order optimality of the L1 problem, from autograd: where z_i != z0_i the CE's
    # slope should balance λ·sign, where z_i == z0_i it should be at most λ (a coordinate
    # within 1e-4 of z0 counts as at z0). The converged points come much closer to it than
    # the preset's, which stop on a loss plateau.
    def kkt(z):
        _, grad, _ = _objective64(model, z, z0, cond, lam)
        d = z.double() - z0.double()
        moved = d.abs() > 1e-4
        return torch.where(moved, (grad + lam * torch.sign(d)).abs(), (grad.abs() - lam).clamp_min(0)).amax(1)

    stationary = torch.tensor([s == "stationary" for s in conv.stop])
    # the rest stall where no step lowers the objective (a minimiser on a ReLU's kink, where the
    # one-sided gradient the solver sees does not vanish) or run out of steps
    assert set(conv.stop) <= {"stationary", "stalled", "max_iter"}
    assert bool(stationary.any()), conv.stop
    assert float(kkt(conv.z)[stationary].median()) < 0.5 * float(kkt(preset.z)[stationary].median())
    # many coordinates of a minimiser stay at z0 exactly (the L1 term's kink); Adam's never do
    assert float(((conv.z == z0)[stationary]).float().mean()) > 0.1
    assert float((preset.z == z0).float().mean()) < 0.01


def test_zero_lambda_has_an_explicit_budget(problem):
    model, z0, cond = problem
    r = BackwardSearch("converged", lam=0.0, budget_confidence=0.9).invert(model.heads, z0, ["style"], cond)
    confident = torch.tensor([s == "confident" for s in r.stop])
    assert bool(confident.any())
    with torch.no_grad():
        p = model.heads["style"](r.z[confident]).softmax(1).gather(1, cond[confident]).squeeze(1)
    assert bool((p >= 0.9 - 1e-4).all())
    assert set(r.stop) <= {"confident", "max_iter", "stalled"}


def test_a_lambda_grid_solved_as_one_batch_matches_each_lambda_alone(problem):
    model, z0, cond = problem
    search = BackwardSearch("converged")
    grid = search.invert_grid(model.heads, z0, ["style"], cond, [0.0, *LAMS])
    for lam, r in zip([0.0, *LAMS], grid):
        alone = search.at_lambda(lam).invert(model.heads, z0, ["style"], cond)
        # per-row arithmetic: the batch changes float64 sums in their last bits at most
        assert np.allclose(r.objective.numpy(), alone.objective.numpy(), rtol=1e-6, atol=1e-9)
        # where a query ends, stationary and stalled are two names for the same flat ground:
        # the last bits decide which; the objective is what must agree
        assert set(r.stop) | set(alone.stop) <= {"stationary", "stalled", "confident", "max_iter"}
    adam = BackwardSearch("paper").invert_grid(model.heads, z0, ["style"], cond, LAMS)
    for lam, r in zip(LAMS, adam):
        alone = BackwardSearch("paper", lam=lam).invert(model.heads, z0, ["style"], cond)
        assert torch.equal(r.z, alone.z)


def test_the_ce_plateau_watches_the_ce_alone(problem):
    model, z0, cond = problem
    at_zero = [BackwardSearch("paper", lam=0.0, stopping=s).invert(model.heads, z0, ["style"], cond)
               for s in ("plateau", "plateau-ce")]
    assert torch.equal(at_zero[0].z, at_zero[1].z)  # no regulariser: the same rule
    # at λ > 0 it returns, of the iterates it saw, the one of lowest CE: replaying the same
    # Adam steps without stopping (stopping "none" runs every step) for as many steps as the
    # query took shows no earlier iterate with a lower CE beyond the float32 noise
    ce_only = BackwardSearch("paper", lam=0.01, stopping="plateau-ce").invert(model.heads, z0, ["style"], cond)
    ce = lambda z: _objective64(model, z, z0, cond, 0.01)[0]  # noqa: E731
    best = torch.full((z0.shape[0],), float("inf"), dtype=torch.float64)
    for steps in range(0, int(ce_only.iterations.max()) + 1, 5):
        at = BackwardSearch("paper", lam=0.01, stopping="none", max_iter=steps).invert(model.heads, z0, ["style"], cond)
        seen = torch.tensor([steps <= int(i) for i in ce_only.iterations])
        best = torch.where(seen, torch.minimum(best, ce(at.z)), best)
    assert bool((ce(ce_only.z) <= best + 1e-5).all())


def test_settings_that_do_not_go_together_are_refused():
    with pytest.raises(ValueError, match="proximal"):
        BackwardSearchConfig(optimizer="proximal", stopping="plateau")
    with pytest.raises(ValueError, match="converged"):
        BackwardSearchConfig(optimizer="adam", stopping="converged")
    with pytest.raises(ValueError, match="own loop"):
        BackwardSearch("converged", engine="fixed")
    with pytest.raises(ValueError, match="budget_confidence"):
        BackwardSearchConfig(optimizer="proximal", stopping="converged", budget_confidence=1.0)


def test_the_adam_presets_keep_their_parameters():
    """Cache keys of students hold the teacher's parameters: the converged solver's settings
    appear only where it runs."""
    assert "tol" not in BackwardSearch("paper").params()
    assert BackwardSearch("converged").params()["tol"] > 0


def test_a_run_writes_the_lambda_curve_and_the_report_draws_it(cache_dir, tmp_path, tiny_trained):
    import json

    import pandas as pd

    from cir_bench.cli import main
    from cir_bench.report import write_html_report
    from cir_bench.report.inputs import classify

    from .conftest import tiny_overrides

    out = tmp_path / "run"
    overrides = [*tiny_overrides(cache_dir, out), "eval.methods=[knn, backward]", "queries.sets=[[style]]",
                 "search.lam=0.001", "eval.lambda_curve_solvers=[preset, converged]"]
    assert main(["run", "--no-progress", *sum((["--set", o] for o in overrides), [])]) == 0
    curve = pd.read_parquet(out / "lambda_curve.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    lams = [0.0, 0.0001, 0.001, 0.01]
    assert manifest["lambda_curve"]["lambdas"] == lams
    assert set(manifest["lambda_curve"]["solvers"]) == {"preset", "converged"}
    assert set(curve["lam"]) == set(lams)
    # the preset at the run's own λ is the run's Backward Search: the same per-query values
    results = pd.read_parquet(out / "results.parquet")
    ours = curve[(curve["solver"] == "preset") & (curve["lam"] == 0.001)]
    run_bs = results[results["method"] == "backward[lam=0.001]"]  # the same query order
    assert run_bs["query_id"].tolist() == ours["query_id"].tolist()
    assert sorted(ours["query_index"]) == list(range(n_rows := len(ours)))
    assert np.allclose(run_bs["metric_precision_at_10"], ours["metric_precision_at_10"])
    assert np.allclose(run_bs["objective"], ours["objective"], rtol=1e-6)
    assert len(curve) == 2 * len(lams) * n_rows
    mean = curve.groupby(["solver", "lam"])["objective"].mean()
    for lam in lams[1:]:
        assert mean[("converged", lam)] < mean[("preset", lam)]
    assert set(ours["stop"]) == {"preset rule"} and ours["stationarity"].isna().all()
    # the converged solver's own measure is kept: a query stopped as stationary is within tolerance
    from cir_bench.search.backward_step import BackwardSearchConfig

    converged = curve[curve["solver"] == "converged"]
    assert converged["stationarity"].notna().all()
    stationary = converged[converged["stop"] == "stationary"]
    assert len(stationary) and (stationary["stationarity"] <= BackwardSearchConfig().tol).all()
    paths = write_html_report(classify([out]), tmp_path / "report")
    text = paths[1].read_text()
    assert "Eq 4 solved to its tolerance" in text and "converged / preset objective" in text
    assert (tmp_path / "report" / "report_figures" / "run0_lambda_solvers.png").is_file()
