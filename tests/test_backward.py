"""Backward Search: stopping rules, per-query freezing, batching, multi-condition, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cir_bench.data.base import UnknownLabelError
from cir_bench.data.queries import QuerySet
from cir_bench.search import SearchContext, get_method
from cir_bench.search.backward import BackwardSearch
from cir_bench.index import ExactIndex

from .equivalence import SCORE_TOL, assert_same_rankings, normalised_distance


@pytest.fixture(scope="module")
def setup(tiny_search):
    return tiny_search


def _pred(model, z, prop):
    with torch.no_grad():
        return model.heads[prop](z).argmax(1)


def test_satisfied_condition_stops_at_once_and_others_freeze_individually(setup):
    ds, store, model = setup
    z0 = store.z[:8]
    own = _pred(model, z0, "style")
    other = (own + 1) % 6
    cond = torch.cat([own[:4], other[4:]])[:, None]
    bs = BackwardSearch(lam=0.0, stopping="satisfied", max_iter=50)
    r = bs.invert(model.heads, z0, ["style"], cond)
    assert r.iterations[:4].tolist() == [0, 0, 0, 0]
    assert torch.equal(r.z[:4], z0[:4])  # never moved: untouched, bit for bit, by construction
    assert bool((r.iterations[4:] > 0).all()) and bool(r.satisfied.all())
    # a frozen query's result is the same query's result alone (up to float rounding, which
    # Adam magnifies: see tests/equivalence.py)
    index = ExactIndex(store.z, np.arange(len(ds)))
    alone = [bs.invert(model.heads, z0[i:i + 1], ["style"], cond[i:i + 1]) for i in range(4, 8)]
    assert all(abs(a.iterations.item() - r.iterations[i].item()) <= 1 for a, i in zip(alone, range(4, 8)))
    assert all(bool(a.satisfied.all()) for a in alone)
    z_alone = torch.cat([a.z for a in alone])
    assert float(normalised_distance(z_alone, r.z[4:]).max()) <= 1e-2
    pa, sa = index.search(z_alone, 10)
    pb, sb = index.search(r.z[4:], 10)
    assert_same_rankings(pa.tolist(), sa.tolist(), pb.tolist(), sb.tolist(), min_identical=0.75, min_overlap=0.7,
                         score_tol=float(normalised_distance(z_alone, r.z[4:]).max()) + SCORE_TOL,
                         what="alone vs batch")


def test_multi_condition_satisfies_every_head(setup):
    ds, store, model = setup
    z0 = store.z[:16]
    cond = torch.stack([(_pred(model, z0, "style") + 2) % 6, (_pred(model, z0, "shape") + 3) % 8], dim=1)
    r = BackwardSearch(lam=0.0, stopping="satisfied", max_iter=200).invert(model.heads, z0, ["style", "shape"], cond)
    assert bool(r.satisfied.all())
    assert torch.equal(_pred(model, r.z, "style"), cond[:, 0])
    assert torch.equal(_pred(model, r.z, "shape"), cond[:, 1])


@pytest.mark.parametrize("stopping", ["none", "plateau", "authors-code"])
def test_batched_equals_per_query(setup, stopping):
    """A query's result does not depend on the batch it runs in: iteration counts within one
    step, z within float rounding (as magnified by Adam), top-10 equal up to near-ties."""
    ds, store, model = setup
    z0 = store.z[:12]
    cond = ((_pred(model, z0, "style") + 1) % 6)[:, None]
    preset = "authors-code" if stopping == "authors-code" else "paper"
    bs = BackwardSearch(preset=preset, lam=0.5, stopping=stopping, max_iter=40)
    batch = bs.invert(model.heads, z0, ["style"], cond)
    alone = [bs.invert(model.heads, z0[i:i + 1], ["style"], cond[i:i + 1]) for i in range(12)]
    its = torch.cat([a.iterations for a in alone])
    assert bool(((its - batch.iterations).abs() <= 1).all()), (its.tolist(), batch.iterations.tolist())
    z_alone = torch.cat([a.z for a in alone])
    same_steps = its == batch.iterations
    assert float(normalised_distance(z_alone, batch.z)[same_steps].max()) <= 1e-2
    index = ExactIndex(store.z, np.arange(len(ds)))
    pa, sa = index.search(z_alone, 10)
    pb, sb = index.search(batch.z, 10)
    assert_same_rankings(pa.tolist(), sa.tolist(), pb.tolist(), sb.tolist(), min_identical=11 / 12,
                         min_overlap=0.7, score_tol=float(normalised_distance(z_alone, batch.z).max()) + SCORE_TOL,
                         what=f"stopping={stopping}: alone vs batch")


def _ctx(ds, store, model):
    db = ds.split_indices("test")
    return SearchContext(ds, store, ExactIndex(store.z, db), db, torch.device("cpu"), 0, "exclude", model)


def test_zero_iterations_is_knn_and_overlap_grows_with_lambda(setup):
    ds, store, model = setup
    test = ds.split_indices("test")
    cond = ((ds.labels("style")[test] + 1) % 6)[:, None]
    qs = QuerySet(["style"], test, cond)
    ctx = _ctx(ds, store, model)
    knn = get_method("knn").search(ctx, qs, 10).positions
    zero = BackwardSearch(max_iter=0).search(ctx, qs, 10)
    assert np.array_equal(zero.positions, knn) and (zero.extras["iterations"] == 0).all()
    overlaps = []
    for lam in (0.0, 0.02, 1.0, 100.0):
        r = BackwardSearch(lam=lam, stopping="plateau", max_iter=60).search(ctx, qs, 10)
        overlaps.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r.positions, knn)]))
    # context kept grows with lambda (up to a query or two moving the other way)
    assert all(b >= a - 0.02 for a, b in zip(overlaps, overlaps[1:])), overlaps
    assert overlaps[-1] == 1.0  # a huge lambda keeps z0 exactly: the best iterate is the start
    assert overlaps[-1] > overlaps[0]


def test_invalid_conditions_raise_clear_errors(setup):
    ds, store, model = setup
    bs = BackwardSearch()
    z0 = store.z[:2]
    with pytest.raises(UnknownLabelError, match="unknown property 'genre'"):
        bs.invert(model.heads, z0, ["genre"], torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(UnknownLabelError, match="out of range for 'style'"):
        bs.invert(model.heads, z0, ["style"], torch.full((2, 1), 6))
    with pytest.raises(ValueError, match="size 5, the heads expect"):
        bs.invert(model.heads, torch.zeros(2, 5), ["style"], torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown Backward Search preset"):
        BackwardSearch(preset="fast")
    with pytest.raises(ValueError, match="regularizer must be"):
        BackwardSearch(regularizer="l3")


def test_authors_code_preset_reproduces_the_public_code(setup):
    ds, store, model = setup
    z0 = store.z[:6]
    cond = _pred(model, z0, "style")[:, None]  # already satisfied: the code still steps once
    r = BackwardSearch(preset="authors-code", lam=1.1).invert(model.heads, z0, ["style"], cond)
    assert bool((r.z != z0).any(dim=1).all())  # the saved vector is post-step: never z0
    assert r.iterations.tolist() == [100] * 6  # the code never breaks out of its loop
    bs = BackwardSearch(preset="authors-code")
    assert bs.config.reduction == "mean" and bs.config.average_conditions


def test_student_roundtrip_and_search(setup, tmp_path):
    from cir_bench.train import distill_student
    from cir_bench.models.student import Student, StudentConfig
    from cir_bench.search.student import StudentSearch

    ds, store, model = setup
    train = torch.as_tensor(ds.split_indices("train"))
    teacher = BackwardSearch(lam=0.0)
    student, history = distill_student(lambda z0, c: teacher.invert(model.heads, z0, ["style"], c).z,
                                       store.z[train], ["style"], [6], StudentConfig(epochs=3), seed=0,
                                       device=torch.device("cpu"))
    assert len(history) == 3 and history[-1]["mse"] < history[0]["mse"]
    path = student.save(tmp_path / "s.pt", {"note": 1})
    back = Student.load(path)
    z0, cond = store.z[:5], torch.tensor([[0], [1], [2], [3], [4]])
    with torch.no_grad():
        assert torch.allclose(student(z0, cond), back(z0, cond))
    ctx = _ctx(ds, store, model)
    test = ds.split_indices("test")[:10]
    qs = QuerySet(["style"], test, ((ds.labels("style")[test] + 1) % 6)[:, None])
    r = StudentSearch(back).search(ctx, qs, 10)
    assert r.positions.shape == (10, 10)
    with pytest.raises(ValueError, match="distilled for"):
        StudentSearch(back).search(ctx, QuerySet(["shape"], test, np.zeros((10, 1), dtype=np.int64)), 10)


def test_filtered_knn_keeps_matching_items_first(setup):
    ds, store, model = setup
    ctx = _ctx(ds, store, model)
    test = ds.split_indices("test")
    qs = QuerySet(["style"], test[:15], ((ds.labels("style")[test[:15]] + 2) % 6)[:, None])
    oracle = get_method("oracle_filtered_knn").search(ctx, qs, 10)
    labels = ds.labels("style")
    for q in range(len(qs)):
        n_match = int((labels[ctx.database] == qs.conditions[q, 0]).sum())
        top = oracle.positions[q]
        assert qs.positions[q] not in top
        matched = labels[top] == qs.conditions[q, 0]
        assert matched[: min(10, n_match)].all()  # every match comes before any miss
    filtered = get_method("filtered_knn").search(ctx, qs, 10)
    with torch.no_grad():
        pred = model.heads["style"](store.z[torch.as_tensor(filtered.positions.ravel())]).argmax(1)
    pred = pred.numpy().reshape(filtered.positions.shape)
    n_pred = [(ctx.cache["predicted_labels"]["style"] == c).sum() for c in qs.conditions[:, 0]]
    for q in range(len(qs)):
        assert (pred[q][: max(0, min(10, n_pred[q] - 1))] == qs.conditions[q, 0]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_backward_search_on_cuda_matches_cpu(setup):
    ds, store, model = setup
    z0 = store.z[:32]
    cond = ((_pred(model, z0, "style") + 1) % 6)[:, None]
    bs = BackwardSearch(lam=0.001)
    cpu = bs.invert(model.heads, z0, ["style"], cond)
    gpu_model = model.to("cuda")
    try:
        gpu = bs.invert(gpu_model.heads, z0.cuda(), ["style"], cond.cuda())
    finally:
        model.to("cpu")
    assert gpu.z.device.type == "cuda"
    index = ExactIndex(store.z, np.arange(len(ds)))
    pc, sc = index.search(cpu.z, 10)
    pg, sg = index.search(gpu.z.cpu(), 10)
    assert bool(((cpu.iterations - gpu.iterations.cpu()).abs() <= 1).all())
    # float rounding differs between devices and Adam magnifies it: lists must agree
    assert_same_rankings(pc.tolist(), sc.tolist(), pg.tolist(), sg.tolist(), min_identical=0.9, min_overlap=0.6,
                         score_tol=float(normalised_distance(cpu.z, gpu.z.cpu()).max()) + SCORE_TOL,
                         what="cpu vs cuda")


def _authors_batch_compute(heads, z0, props, cond, lam, lr=0.2, max_iter=100, patience=10):
    """An independent re-implementation of the authors' batched Backward Search with
    torch.optim.Adam: mean-L1, CE averaged over conditions, loss measured before the step and
    the vector saved after it, frozen after patience + 1 non-improving steps, 100 steps."""
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    n = z0.shape[0]
    best, counter, out = torch.full((n,), float("inf")), torch.zeros(n), z0.clone()
    for _ in range(max_iter):
        ce = sum(torch.nn.functional.cross_entropy(heads[p](z), cond[:, m], reduction="none")
                 for m, p in enumerate(props)) / len(props)
        loss = ce + lam * (z - z0).abs().mean(dim=1)
        opt.zero_grad()
        loss.backward(torch.ones_like(loss))
        opt.step()
        with torch.no_grad():
            improved = (loss <= best) & (counter <= patience)
            best = torch.where(improved, loss.detach(), best)
            out = torch.where(improved[:, None], z.detach(), out)
            counter = torch.where(improved, torch.zeros_like(counter), counter + 1)
    return out


@pytest.mark.parametrize("props", [["style"], ["style", "shape"]])
def test_authors_code_preset_agrees_with_torch_adam_reference(setup, props):
    """The element-wise Adam (bias corrections in float64, torch's order of operations) gives
    the lists of a torch.optim.Adam re-implementation of the authors' loop at their published
    lambdas (CUB 0.51, WikiArt-style 1.1, WikiArt-multi 3.2) and at 0."""
    ds, store, model = setup
    test = ds.split_indices("test")
    z0 = store.z[torch.as_tensor(test)]
    style, shape = (torch.as_tensor(ds.labels(p)[test]) for p in ("style", "shape"))
    cond = ((style + 1) % 6)[:, None] if props == ["style"] else torch.stack([(style + 2) % 6, (shape + 3) % 8], 1)
    index = ExactIndex(store.z, test)
    for lam in (0.0, 0.51, 1.1, 3.2):
        ours = BackwardSearch(preset="authors-code", lam=lam).invert(model.heads, z0, props, cond).z
        reference = _authors_batch_compute(model.heads, z0, props, cond, lam)
        pa, sa = index.search(ours, 10, exclude=test)
        pb, sb = index.search(reference, 10, exclude=test)
        assert_same_rankings(pa.tolist(), sa.tolist(), pb.tolist(), sb.tolist(), min_identical=0.98,
                             min_overlap=0.5, score_tol=1.0, what=f"lambda={lam}")


def test_student_authors_architecture(setup, tmp_path):
    from cir_bench.config import StudentConfig
    from cir_bench.models.student import Student

    ds, store, model = setup
    cfg = StudentConfig(architecture="authors", residual=False)
    student = Student(store.z.shape[1], [6], ["style"], cfg).eval()
    kinds = [type(m).__name__ for m in student.modules() if not isinstance(m, torch.nn.Sequential)]
    assert kinds[1:] == ["Linear", "Sigmoid", "BatchNorm1d", "Linear", "Sigmoid", "BatchNorm1d", "Linear", "Tanh"]
    with torch.no_grad():
        out = student(store.z[:4], torch.zeros(4, 1, dtype=torch.long))
    assert out.abs().max() < 1  # tanh output, z* predicted directly
    back = Student.load(student.save(tmp_path / "a.pt"))
    with torch.no_grad():
        assert torch.equal(back(store.z[:4], torch.zeros(4, 1, dtype=torch.long)), out)


def _soft_scores_by_loop(ds, store, model, ctx, qs, beta):
    """cos(z0, x) + beta * sum_m log p_m(c_m | x), one query and one item at a time."""
    db = ctx.database
    zn = torch.nn.functional.normalize(store.z.double(), dim=1)
    with torch.no_grad():
        log_p = {p: torch.log_softmax(model.heads[p](store.z[torch.as_tensor(db)]).double(), 1).numpy()
                 for p in qs.properties}
    out = []
    for q in range(len(qs)):
        scores = {}
        for row, item in enumerate(db):
            if item == qs.positions[q]:
                continue  # the query itself is excluded
            s = float(zn[qs.positions[q]] @ zn[item])
            s += beta * sum(log_p[p][row, qs.conditions[q, m]] for m, p in enumerate(qs.properties))
            scores[int(item)] = s
        top = sorted(scores, key=lambda i: (-scores[i], i))[:10]
        out.append((top, [scores[i] for i in top]))
    return out


@pytest.mark.parametrize("beta,props", [(0.0, ["style"]), (0.3, ["style"]), (2.0, ["style", "shape"])])
def test_soft_filtered_knn_matches_a_plain_loop(setup, beta, props):
    ds, store, model = setup
    ctx = _ctx(ds, store, model)
    test = ds.split_indices("test")
    cond = np.stack([(ds.labels(p)[test[:12]] + 1) % ds.property(p).num_classes for p in props], axis=1)
    qs = QuerySet(props, test[:12], cond)
    got = get_method("soft_filtered_knn", beta=beta).search(ctx, qs, 10)
    loop = _soft_scores_by_loop(ds, store, model, ctx, qs, beta)
    # scores: float32 cosine (1e-4 covers it) + beta * float32 log-softmax per condition
    # (another 1e-4 each) against float64; an item may cross the k-th place only at a near-tie,
    # which near_tie_equal checks, so the overlap may fall below 1 there
    tie = 1e-4 * (1 + beta * len(props))
    assert_same_rankings(got.positions, got.scores, [a for a, _ in loop], [b for _, b in loop], tie=tie,
                         min_overlap=0.8, what=f"soft_filtered_knn beta={beta}")
    if beta == 0.0:  # beta = 0 is plain kNN
        knn = get_method("knn").search(ctx, qs, 10)
        assert_same_rankings(got.positions, got.scores, knn.positions, knn.scores, what="beta=0 vs knn")


def test_soft_filtered_knn_trades_context_for_the_condition_as_beta_grows(setup):
    """Top-k of cos + beta * log p maximises sum(cos) + beta * sum(log p) over k-sets, so for
    beta1 < beta2 the sum of log p over the top-k cannot fall and the sum of cosines cannot
    rise (exchange argument): checked per query on a beta sweep."""
    ds, store, model = setup
    ctx = _ctx(ds, store, model)
    test = ds.split_indices("test")
    qs = QuerySet(["style"], test[:30], ((ds.labels("style")[test[:30]] + 1) % 6)[:, None])
    with torch.no_grad():
        log_p = torch.log_softmax(model.heads["style"](store.z), 1).double().numpy()
    zn = torch.nn.functional.normalize(store.z.double(), dim=1).numpy()
    sums = []
    for beta in (0.0, 0.1, 1.0, 100.0):
        r = get_method("soft_filtered_knn", beta=beta).search(ctx, qs, 10)
        sums.append([(log_p[row, qs.conditions[q, 0]].sum(), (zn[row] @ zn[qs.positions[q]]).sum())
                     for q, row in enumerate(r.positions)])
    sums = np.array(sums)  # (beta, query, [sum log p, sum cos])
    assert (np.diff(sums[:, :, 0], axis=0) >= -1e-3).all()
    assert (np.diff(sums[:, :, 1], axis=0) <= 1e-3).all()
    assert (sums[-1, :, 0] > sums[0, :, 0]).mean() > 0.5  # and it does move for most queries
    with pytest.raises(ValueError, match="beta"):
        get_method("soft_filtered_knn", beta=-1)


def _judge_same(ds, store, a, b, what, min_identical=1.0):
    """Two inversions of the same queries: iterations within one step, z close where the step
    counts agree, top-10 equal up to near-ties (tests/equivalence.py)."""
    assert bool(((a.iterations - b.iterations).abs() <= 1).all()), what
    same = a.iterations == b.iterations
    dist = normalised_distance(a.z, b.z)
    assert float(dist[same].max()) <= 1e-2, what
    index = ExactIndex(store.z, np.arange(len(ds)))
    pa, sa = index.search(a.z.cpu(), 10)
    pb, sb = index.search(b.z.cpu(), 10)
    assert_same_rankings(pa.tolist(), sa.tolist(), pb.tolist(), sb.tolist(), min_identical=min_identical,
                         min_overlap=0.7, score_tol=float(dist.max()) + SCORE_TOL, what=what)


@pytest.mark.parametrize("preset,settings", [
    ("paper", {}), ("paper", {"stopping": "satisfied", "confidence": 0.6}), ("paper", {"stopping": "none", "max_iter": 30}),
    ("paper", {"optimizer": "sgd", "regularizer": "l2"}), ("authors-code", {})])
@pytest.mark.parametrize("props", [["style"], ["style", "shape"]])
def test_fixed_shape_masked_loop_gives_todays_results(setup, preset, settings, props):
    """The loop the CUDA graph replays (one padded shape, masks, the stop mask read every K
    steps or never), run uncaptured on the CPU, against the eager loop: every preset and
    stopping rule, one and two conditions, batch sizes in three buckets."""
    ds, store, model = setup
    z0 = store.z[:70]
    cond = torch.stack([(_pred(model, z0, p) + 1 + m) % ds.property(p).num_classes for m, p in enumerate(props)], 1)
    for n in (1, 5, 70):  # buckets 1, 8, 512 (padding rows never move and never count)
        eager = BackwardSearch(preset, engine="eager", lam=0.01, **settings).invert(model.heads, z0[:n], props, cond[:n])
        for every in (1, 7, 0):
            fixed = BackwardSearch(preset, engine="fixed", check_every=every, lam=0.01, **settings).invert(
                model.heads, z0[:n], props, cond[:n])
            _judge_same(ds, store, eager, fixed, f"{preset} {settings} {props} n={n} every={every}")
            assert torch.equal(eager.satisfied, fixed.satisfied) or n > 1  # one query: same decision


def test_fixed_shape_loop_keeps_frozen_rows_still(setup):
    """Queries the heads already satisfy stop before their first step: z stays z0 exactly,
    0 iterations, while the others in the same padded batch move."""
    ds, store, model = setup
    z0 = store.z[:20]
    pred = _pred(model, z0, "style")
    cond = torch.where(torch.arange(20) % 2 == 0, pred, (pred + 1) % 6)[:, None]
    r = BackwardSearch(engine="fixed", lam=0.0, stopping="satisfied").invert(model.heads, z0, ["style"], cond)
    still = torch.arange(20) % 2 == 0
    assert torch.equal(r.z[still], z0[still]) and bool((r.iterations[still] == 0).all())
    assert bool((r.iterations[~still] > 0).all()) and not torch.equal(r.z[~still], z0[~still])


def test_engine_choice_is_checked_and_not_part_of_the_settings(setup):
    ds, store, model = setup
    with pytest.raises(ValueError, match="engine"):
        BackwardSearch(engine="warp")
    with pytest.raises(ValueError, match="needs CUDA"):
        BackwardSearch(engine="graph").invert(model.heads, store.z[:2], ["style"], torch.zeros(2, 1, dtype=torch.long))
    assert BackwardSearch(engine="fixed").params() == BackwardSearch().params()  # cache keys unchanged
    assert BackwardSearch().resolved_engine(torch.device("cpu")) == "eager"
    assert BackwardSearch().resolved_engine(torch.device("cuda")) == "graph"
    # compile asks for the fixed shape: auto picks it on the CPU; the eager loop refuses it
    assert BackwardSearch(compile=True).resolved_engine(torch.device("cpu")) == "fixed"
    assert BackwardSearch(compile=True).params() == BackwardSearch().params()
    with pytest.raises(ValueError, match="compile needs the fixed-shape loop"):
        BackwardSearch(engine="eager", compile=True)


def _judge_compiled(ds, store, a, b, what):
    """A compiled step fuses kernels: other roundings, which Adam amplifies on a few queries
    (on the 2-epoch tiny model, nudging z0 by 1e-7 alone changes 5 % of the top-10 lists at
    λ = 0.01 and the compiled step 15 %). So: most queries on the same path up to rounding
    (median normalised distance <= 1e-4), iterations within one step for >= 90 %, >= 80 %
    identical top-10 and scores within the distance of the query vectors."""
    dist = normalised_distance(a.z.cpu(), b.z.cpu())
    assert float(dist.median()) <= 1e-4, f"{what}: median distance {float(dist.median())}"
    assert float(((a.iterations - b.iterations).abs() <= 1).float().mean()) >= 0.9, what
    index = ExactIndex(store.z, np.arange(len(ds)))
    pa, sa = index.search(a.z.cpu(), 10)
    pb, sb = index.search(b.z.cpu(), 10)
    assert_same_rankings(pa.tolist(), sa.tolist(), pb.tolist(), sb.tolist(), min_identical=0.8, min_overlap=0.6,
                         score_tol=float(dist.max()) + SCORE_TOL, what=what)


@pytest.mark.skipif(__import__("shutil").which("g++") is None and __import__("shutil").which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (g++)")
def test_compiled_step_gives_the_fixed_loops_lists_and_serves_every_lambda(setup):
    """torch.compile of the fixed-shape step (search.compile): compiled once per bucket and
    settings (the time reported as capture), then reused for another λ (λ is an input of the
    compiled code, not a constant), with the uncompiled loop's lists at both λ."""
    ds, store, model = setup
    props = ["style"]
    z0 = store.z[:6]  # bucket 8: one compilation (tests/test_service.py's compiled teacher reuses it)
    cond = torch.stack([(_pred(model, z0, p) + 1 + m) % ds.property(p).num_classes for m, p in enumerate(props)], 1)
    first = BackwardSearch(compile=True, lam=0.01)
    a = first.invert(model.heads, z0, props, cond)
    assert first.last_capture_s > 0
    assert first.compiled and first.setup_info()["compile"]["8"]["note"].startswith("verified against the eager")
    _judge_compiled(ds, store, a, BackwardSearch(engine="fixed", lam=0.01).invert(model.heads, z0, props, cond),
                    "compiled vs fixed, lambda=0.01")
    second = BackwardSearch(compile=True, lam=0.05)
    b = second.invert(model.heads, z0, props, cond)
    assert second.last_capture_s == 0.0  # the same compiled step, another λ
    _judge_compiled(ds, store, b, BackwardSearch(engine="fixed", lam=0.05).invert(model.heads, z0, props, cond),
                    "compiled vs fixed, lambda=0.05")
    assert float(normalised_distance(a.z, b.z).max()) > 1e-3  # λ did change the answer


def test_a_compiled_step_that_computes_something_else_is_not_used(setup, monkeypatch, capsys):
    """A compiled step is checked against the eager step on a probe batch when it is built:
    kernels that compute something else (a stale kernel cache, a miscompile; here a compile that
    perturbs every update) are not used: the search runs the uncompiled step, with its
    answers, and says why (stderr, setup_info for the manifest)."""
    from cir_bench.search import backward_engines

    ds, store, model = setup

    def miscompile(fn, **kwargs):
        def wrong(state, lam):
            fn(state, lam)
            state["z"].add_(0.05 * torch.sign(state["z"]))  # what a wrong kernel might do
        return wrong

    monkeypatch.setattr(backward_engines.torch, "compile", miscompile)
    backward_engines.STEP_CACHE.clear()
    props = ["style"]
    z0 = store.z[:6]
    cond = (_pred(model, z0, "style") + 1) % ds.property("style").num_classes
    bs = BackwardSearch(compile=True, lam=0.01)
    got = bs.invert(model.heads, z0, props, cond[:, None])
    backward_engines.STEP_CACHE.clear()
    assert not bs.compiled
    note = bs.setup_info()["compile"]["8"]
    assert note["compiled"] is False and "disagrees with the eager step" in note["note"], note
    assert "fell back to the uncompiled step: the compiled step disagrees" in capsys.readouterr().err
    fixed = BackwardSearch(engine="fixed", lam=0.01).invert(model.heads, z0, props, cond[:, None])
    assert torch.equal(got.z, fixed.z)  # the plain fixed-shape loop's answers, bit for bit


def test_the_kernel_cache_is_keyed_by_torch_and_cpu_capability(tmp_path):
    """torch.compile's kernels live in cir-bench's own folder per torch version, CPU capability
    and CPU: a kernel built under ATEN_CPU_CAPABILITY=avx2 is never loaded under another."""
    import os
    import subprocess
    import sys

    code = ("import torch; from cir_bench.paths import kernel_cache_dir; "
            "print(torch.backends.cpu.get_cpu_capability().lower(), kernel_cache_dir())")
    seen = {}
    for cap in ("default", "avx2", "avx512"):  # a CPU without one runs the best it has
        env = {**{k: v for k, v in os.environ.items() if k != "CIR_BENCH_KERNEL_CACHE"},
               "CIR_BENCH_CACHE": str(tmp_path), "ATEN_CPU_CAPABILITY": cap}
        used, path = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
        assert path.startswith(str(tmp_path / "kernels" / f"torch-{torch.__version__}-{used}-")), path
        seen[used] = path
    assert len(set(seen.values())) == len(seen)  # one folder per capability torch ran with


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["paper", "authors-code"])
def test_graph_captured_search_on_cuda_matches_eager_and_reuses_its_graph(setup, preset):
    ds, store, model = setup
    props = ["style", "shape"]
    z0 = store.z[:100]
    cond = torch.stack([(_pred(model, z0, p) + 1) % ds.property(p).num_classes for p in props], 1)
    gpu_model = model.to("cuda")
    try:
        eager = BackwardSearch(preset, engine="eager", lam=0.01).invert(gpu_model.heads, z0.cuda(), props, cond.cuda())
        bs = BackwardSearch(preset, engine="graph", lam=0.01)
        graph = bs.invert(gpu_model.heads, z0.cuda(), props, cond.cuda())
        first_capture = bs.last_capture_s
        again = bs.invert(gpu_model.heads, z0[:90].cuda(), props, cond[:90].cuda())  # same bucket (512)
        assert first_capture > 0 and bs.last_capture_s == 0.0  # captured once, replayed after
        assert torch.equal(again.z, graph.z[:90]) or float(normalised_distance(again.z, graph.z[:90]).max()) < 1e-2
    finally:
        model.to("cpu")
    _judge_same(ds, store, eager, graph, f"{preset}: eager vs graph on CUDA", min_identical=0.99)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_graph_on_cuda_matches_eager_and_serves_every_lambda(setup):
    ds, store, model = setup
    props = ["style", "shape"]
    z0 = store.z[:100]
    cond = torch.stack([(_pred(model, z0, p) + 1) % ds.property(p).num_classes for p in props], 1)
    gpu_model = model.to("cuda")
    try:
        eager = BackwardSearch(engine="eager", lam=0.01).invert(gpu_model.heads, z0.cuda(), props, cond.cuda())
        bs = BackwardSearch(engine="graph", compile=True, lam=0.01)
        graph = bs.invert(gpu_model.heads, z0.cuda(), props, cond.cuda())
        assert bs.last_capture_s > 0
        other = BackwardSearch(engine="graph", compile=True, lam=0.02)
        other.invert(gpu_model.heads, z0.cuda(), props, cond.cuda())
        assert other.last_capture_s == 0.0  # compiled and captured once for every λ
    finally:
        model.to("cpu")
    _judge_compiled(ds, store, eager, graph, "eager vs compiled graph on CUDA")
