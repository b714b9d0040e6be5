"""The Backward Search objective with its gradient by hand (search/objective.py) against autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cir_bench.search.backward import PRESETS, BackwardSearch
from cir_bench.search.objective import AnalyticObjective, AutogradObjective, head_chain, objective_for
from cir_bench.index import ExactIndex

from .equivalence import SCORE_TOL, assert_same_rankings, normalised_distance

SETTINGS = [
    ("paper", {"lam": 0.01}),
    ("paper", {"lam": 0.5, "reduction": "mean"}),
    ("paper", {"regularizer": "l2", "lam": 0.1}),
    ("paper", {"stopping": "satisfied", "confidence": 0.6}),
    ("paper", {"condition_weights": {"style": 0.7, "shape": 1.3}, "average_conditions": True, "lam": 0.01}),
    ("authors-code", {"lam": 1.1}),
]


@pytest.fixture(scope="module")
def setup(tiny_search):
    return tiny_search


def _conditions(ds, model, z0, props):
    with torch.no_grad():
        return torch.stack([(model.heads[p](z0).argmax(1) + 1 + m) % ds.property(p).num_classes
                            for m, p in enumerate(props)], 1)


def _config(preset, settings):
    from dataclasses import replace

    return replace(PRESETS[preset], **settings)


@pytest.mark.parametrize("preset,settings", SETTINGS)
@pytest.mark.parametrize("props", [["style"], ["style", "shape"]])
def test_loss_and_gradient_match_autograd(setup, preset, settings, props):
    """Per-query loss, satisfied flags and dL/dz of the hand-written gradient against autograd
    on the trained heads, at z0 and at points around it. Tolerance: float32 rounding of the
    same sums in another order, relative to the gradient's scale (~1e-6); on the CPUs checked
    they are the same bits."""
    ds, store, model = setup
    cfg = _config(preset, settings)
    z0 = store.z[:64]
    cond = _conditions(ds, model, z0, props)
    analytic, auto = objective_for(model.heads, props, cfg), objective_for(model.heads, props, cfg, analytic=False)
    assert isinstance(analytic, AnalyticObjective) and isinstance(auto, AutogradObjective)
    gen = torch.Generator().manual_seed(0)
    for z in (z0, z0 + 0.05 * torch.randn(z0.shape, generator=gen), z0 + 0.5 * torch.randn(z0.shape, generator=gen)):
        la, sa, ga = analytic(z, z0, cond, grad=True)
        lb, sb, gb = auto(z, z0, cond, grad=True)
        scale = float(gb.abs().max()) + 1e-12
        assert float((la - lb).abs().max()) <= 1e-6 * (1 + float(lb.abs().max()))
        assert float((ga - gb).abs().max()) <= 1e-6 * scale, float((ga - gb).abs().max())
        assert torch.equal(sa, sb)
        assert not ga.requires_grad and ga.shape == z.shape
        # the product used off the CPU for BatchNorm's backward (cuDNN's kernel there)
        analytic.exact_bn_backward = False
        _, _, gc = analytic(z, z0, cond, grad=True)
        analytic.exact_bn_backward = True
        assert float((gc - gb).abs().max()) <= 1e-5 * scale


def _judge(store, ds, a, b, what):
    assert bool(((a.iterations - b.iterations).abs() <= 1).all()), what
    dist = normalised_distance(a.z.cpu(), b.z.cpu())
    index = ExactIndex(store.z, np.arange(len(ds)))
    pa, sa = index.search(a.z.cpu(), 10)
    pb, sb = index.search(b.z.cpu(), 10)
    assert_same_rankings(pa.tolist(), sa.tolist(), pb.tolist(), sb.tolist(), min_identical=1.0, min_overlap=1.0,
                         score_tol=float(dist.max()) + SCORE_TOL, what=what)


@pytest.mark.parametrize("preset,settings", SETTINGS)
@pytest.mark.parametrize("props", [["style"], ["style", "shape"]])
def test_search_by_hand_gives_autograds_lists(setup, preset, settings, props):
    """The whole search with the gradient by hand (the default) against ``gradient="autograd"``:
    iteration counts within one step, the same top-10 lists up to near-ties (tests/equivalence.py)
    for every query (the CPUs checked give the same bits); the eager loop, and the fixed-shape
    loop (the one CUDA captures) for the two presets."""
    ds, store, model = setup
    z0 = store.z[:80]
    cond = _conditions(ds, model, z0, props)
    for engine in ("eager", "fixed") if settings in (SETTINGS[0][1], SETTINGS[-1][1]) else ("eager",):
        a = BackwardSearch(preset, engine=engine, **settings).invert(model.heads, z0, props, cond)
        b = BackwardSearch(preset, engine=engine, gradient="autograd", **settings).invert(model.heads, z0, props, cond)
        _judge(store, ds, a, b, f"{preset} {settings} {props} {engine}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,settings", [SETTINGS[0], SETTINGS[-1]])
def test_by_hand_on_cuda_matches_autograd(setup, preset, settings):
    """On CUDA (BatchNorm's backward as a product there, cuDNN's kernels in autograd): the
    gradient within float32 rounding of autograd's, and the captured graph by hand gives the
    eager autograd loop's lists."""
    ds, store, model = setup
    props = ["style", "shape"]
    heads = torch.nn.ModuleDict({p: h for p, h in model.heads.items()})
    import copy

    heads = copy.deepcopy(heads).cuda().eval()
    z0 = store.z[:80].cuda()
    cond = _conditions(ds, model, store.z[:80], props).cuda()
    cfg = _config(preset, settings)
    la, _, ga = objective_for(heads, props, cfg)(z0 + 0.05, z0, cond, grad=True)
    lb, _, gb = objective_for(heads, props, cfg, analytic=False)(z0 + 0.05, z0, cond, grad=True)
    assert float((ga - gb).abs().max()) <= 1e-5 * float(gb.abs().max())
    assert float((la - lb).abs().max()) <= 1e-5 * (1 + float(lb.abs().max()))
    a = BackwardSearch(preset, engine="graph", **settings).invert(heads, z0, props, cond)
    b = BackwardSearch(preset, engine="eager", gradient="autograd", **settings).invert(heads, z0, props, cond)
    dist = normalised_distance(a.z.cpu(), b.z.cpu())
    index = ExactIndex(store.z, np.arange(len(ds)))
    pa, sa = index.search(a.z.cpu(), 10)
    pb, sb = index.search(b.z.cpu(), 10)
    assert bool(((a.iterations.cpu() - b.iterations.cpu()).abs() <= 1).all())
    assert_same_rankings(pa.tolist(), sa.tolist(), pb.tolist(), sb.tolist(), min_identical=0.9, min_overlap=0.6,
                         score_tol=float(dist.max()) + SCORE_TOL, what=f"cuda {preset}")


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, z):
        return self.b(torch.relu(self.a(z)) + z)  # the leaves in order are not the forward


def test_heads_that_are_not_plain_chains_go_through_autograd():
    torch.manual_seed(0)
    bn_first = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    bn_first[1].running_mean.normal_()
    bn_first[1].running_var.uniform_(0.5, 2)
    plain = nn.Sequential(nn.Linear(8, 3))
    tanh = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    for head in (bn_first, plain, tanh, _Residual()):
        head.eval()
    assert head_chain(bn_first) is not None and head_chain(plain) is not None  # BN before the ReLU: fine
    assert head_chain(tanh) is None and head_chain(_Residual()) is None
    assert head_chain(bn_first.train()) is None  # batch statistics, live dropout
    bn_first.eval()
    cfg = _config("paper", {"lam": 0.01})
    z0 = torch.randn(16, 8)
    cond = torch.randint(0, 3, (16, 1))
    for head, kind in ((bn_first, AnalyticObjective), (plain, AnalyticObjective), (tanh, AutogradObjective),
                       (_Residual().eval(), AutogradObjective)):
        heads = nn.ModuleDict({"p": head})
        for p in heads.parameters():
            p.requires_grad_(False)
        assert isinstance(objective_for(heads, ["p"], cfg), kind)
        a = BackwardSearch(lam=0.01).invert(heads, z0, ["p"], cond)
        b = BackwardSearch(lam=0.01, gradient="autograd").invert(heads, z0, ["p"], cond)
        assert bool(((a.iterations - b.iterations).abs() <= 1).all())
        assert float(normalised_distance(a.z, b.z).max()) <= 1e-2


def test_changed_weights_are_seen(setup):
    """The chains are cached per heads object; changing a weight or a BatchNorm statistic in
    place (a training step, load_state_dict) is seen by the next search."""
    ds, store, model = setup
    heads = nn.ModuleDict({p: h for p, h in model.heads.items()})
    import copy

    heads = copy.deepcopy(heads).eval()
    cfg = _config("paper", {"lam": 0.01})
    z0 = store.z[:32]
    cond = _conditions(ds, model, z0, ["style"])
    first = objective_for(heads, ["style"], cfg)
    assert objective_for(heads, ["style"], cfg).chains is first.chains  # cached
    with torch.no_grad():
        bn = next(m for m in heads["style"].modules() if isinstance(m, nn.BatchNorm1d))
        bn.running_var.mul_(3.0)
        lin = next(m for m in heads["style"].modules() if isinstance(m, nn.Linear))
        lin.weight.add_(0.05)
    second = objective_for(heads, ["style"], cfg)
    assert second.chains is not first.chains
    la, _, ga = second(z0, z0 + 0.01, cond, grad=True)
    lb, _, gb = objective_for(heads, ["style"], cfg, analytic=False)(z0, z0 + 0.01, cond, grad=True)
    assert float((ga - gb).abs().max()) <= 1e-6 * float(gb.abs().max())


def test_gradient_choice_is_checked_and_not_part_of_the_settings():
    with pytest.raises(ValueError, match="gradient"):
        BackwardSearch(gradient="finite-differences")
    assert BackwardSearch(gradient="autograd").params() == BackwardSearch().params()  # cache keys unchanged


def test_config_sets_the_gradient(tmp_path):
    from cir_bench.config import load_config
    from cir_bench.pipeline import teacher

    assert teacher(load_config(None, ["search.gradient=autograd"])).gradient == "autograd"
    assert teacher(load_config(None, [])).gradient == "auto"
    with pytest.raises(Exception, match="gradient"):
        load_config(None, ["search.gradient=numeric"])
