"""Backward Search, floor 2 of 3: the engines that run the step of search/backward_step.py.

How the loop runs, never what it computes: each engine takes the settings
(``BackwardSearchConfig``) and the step function, not the method.

- eager (``run_eager``): the batch shrinks to its active rows as queries freeze, so frozen
  queries cost nothing (the CPU default);
- fixed (``run_fixed``): one shape, the chunk padded to a bucket, every row stepped every
  time with frozen and padding rows masked; its step can be compiled (torch.compile, checked
  against the eager step before it is trusted) and, on CUDA, captured as a CUDA graph
  (``graph``, the CUDA default). Built steps are cached (``STEP_CACHE``) per heads, bucket
  and settings.
"""
from __future__ import annotations

import json
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence, get_args

import torch

from cir_bench.config import Engine
from cir_bench.search.backward_step import (BackwardSearchConfig, InversionResult, adam_table, finish,
                                            head_sizes, initial_state, masked_step)
from cir_bench.search.objective import state_version

ENGINES: tuple[str, ...] = get_args(Engine)
# padded batch sizes of the fixed-shape loop (chunks of 4096); 16 and 32 fit served request
# batches (up to batching.teacher.max_batch_size) without padding them to 64
BUCKETS = (1, 8, 16, 32, 64, 512, 4096)
STEP_CACHE_SIZE = 32
PROBE_STEPS = 8  # steps of the probe run that checks a compiled step against the eager one
PROBE_SEED = 20240611  # the probe batch is a fixed draw: the check is the same on every machine
PROBE_MIN_SAME_TOPK = 0.9
PROBE_GALLERY = 256  # random vectors the probe ranks, top-10 each
StepFunction = Callable[..., dict]  # masked_step's signature


def resolve_engine(engine: str, compile: bool, device: torch.device) -> str:
    """``auto``: the captured graph on CUDA, the eager loop elsewhere (on CPU the eager loop's
    shrinking batch beats a fixed shape; there is no launch cost to save) unless ``compile``
    asks for the fixed shape."""
    if engine == "auto":
        return "graph" if device.type == "cuda" else ("fixed" if compile else "eager")
    if engine == "graph" and device.type != "cuda":
        raise ValueError("Backward Search engine 'graph' needs CUDA (use 'fixed' for the same loop uncaptured)")
    return engine


def run_eager(cfg: BackwardSearchConfig, objective, heads: Mapping[str, torch.nn.Module], z0: torch.Tensor,
              properties: Sequence[str], conditions: torch.Tensor, step: StepFunction = masked_step
              ) -> InversionResult:
    """The eager loop: the full state is kept, the loop works on the rows still active (the
    working set) and writes them back when it shrinks the set."""
    full = initial_state(z0, conditions)
    rows = torch.arange(full["z"].shape[0], device=full["z"].device)
    w = dict(full)
    # reading the active mask back stalls a CUDA stream: there every 10 steps only (extra
    # steps change nothing, frozen rows are not updated)
    check_every = 10 if full["z"].device.type == "cuda" else 1

    def write_back() -> None:
        for key, value in w.items():
            if key not in ("z0", "cond") and value is not full[key]:
                full[key][rows] = value

    adam = adam_table(cfg, full["z"].device)
    for it in range(cfg.max_iter):
        if cfg.freezes and it % check_every == 0:
            n_active = int(w["active"].sum())
            if n_active == 0:
                break
            if n_active < 0.75 * rows.numel():  # shrink the working set
                write_back()
                keep = w["active"]
                rows = rows[keep]
                w = {key: value[keep] for key, value in w.items()}
        w.update(step(cfg, objective, w, adam))
    write_back()
    return finish(cfg, objective, heads, full, properties)


@dataclass
class FixedRun:
    """A fixed-shape run's answer and what building its step cost or found."""

    result: InversionResult
    bucket: int
    capture_s: float  # compiling / capturing paid by this call (0 when the step was cached)
    compiled: bool  # the compiled step ran (it was asked for, built and verified)
    compile_note: str  # with compile: verified, or why it fell back


def run_fixed(cfg: BackwardSearchConfig, objective, heads: Mapping[str, torch.nn.Module], z0: torch.Tensor,
              properties: Sequence[str], conditions: torch.Tensor, *, capture: bool, compile: bool,
              check_every: int | None, step: StepFunction = masked_step) -> FixedRun:
    """The fixed-shape loop: the chunk padded to the next bucket size, every row stepped every
    time (a frozen or padding row is masked, so it does not move and keeps its best iterate and
    counters), the active mask read back every ``check_every`` steps only (0: never; run to
    max_iter; default 10 on CUDA, 1 elsewhere). With ``capture`` (CUDA) one step is a CUDA
    graph captured once per (heads, properties, bucket, settings) and replayed; with
    ``compile`` the step goes through torch.compile, compiled once per (heads, properties,
    bucket, settings but λ: λ is a tensor input)."""
    n = z0.shape[0]
    bucket = next(b for b in BUCKETS if b >= n)
    every = check_every if check_every is not None else (10 if z0.device.type == "cuda" else 1)
    capture_s = 0.0
    if capture or compile:
        runner = cached_step(cfg, step, objective, heads, tuple(properties), bucket, z0.device, conditions.dtype,
                             capture=capture, compile=compile)
        capture_s, runner.capture_s = runner.capture_s, 0.0  # reported once, by the call that paid it
    else:
        runner = FixedStep(cfg, step, objective, heads, tuple(properties), bucket, z0.device, conditions.dtype)
    state = runner.state
    runner.reset(z0.detach().float(), conditions, n, cfg.lam)
    for it in range(cfg.max_iter):
        if cfg.freezes and every and it % every == 0 and not bool(state["active"].any()):
            break
        runner.step()
    rows = {key: value[:n].clone() for key, value in state.items()}
    return FixedRun(finish(cfg, objective, heads, rows, properties), bucket, capture_s, runner.compiled,
                    runner.compile_note or "")


class FixedStep:
    """Static state buffers of one bucket and one masked step on them, run op by op."""

    def __init__(self, cfg: BackwardSearchConfig, step: StepFunction, objective, heads,
                 properties: tuple[str, ...], bucket: int, device: torch.device, cond_dtype: torch.dtype,
                 compile: bool = False) -> None:
        self.cfg, self.step_fn, self.objective, self.heads = cfg, step, objective, heads
        self.properties = list(properties)
        self.adam = adam_table(cfg, device)
        self.compiled = compile
        # λ of the current chunk; a tensor only for the compiled step (a Python float there
        # would be a constant of the compiled code: one compilation per λ)
        self.lam = torch.zeros((), device=device) if compile else None
        d, _ = head_sizes(heads, properties)
        self.state = {key: torch.zeros(bucket, *value.shape[1:], dtype=value.dtype, device=device)
                      for key, value in initial_state(torch.zeros(1, d),
                                                      torch.zeros(1, len(properties), dtype=cond_dtype)).items()}
        self.capture_s = 0.0
        self.compile_note: str | None = None  # a compiled step: verified, or why it fell back

    def reset(self, z0: torch.Tensor, conditions: torch.Tensor, n: int, lam: float = 0.0) -> None:
        """Load a chunk of n rows; the padding rows are inactive from the start."""
        st = self.state
        if self.lam is not None:
            self.lam.fill_(lam)
        for key in ("z0", "z", "best_z"):
            st[key].zero_()
            st[key][:n].copy_(z0)
        st["cond"].zero_()
        st["cond"][:n].copy_(conditions)
        for key in ("m1", "m2", "steps", "counter"):
            st[key].zero_()
        st["best_loss"].fill_(float("inf"))
        st["active"].zero_()
        st["active"][:n] = True

    def step(self) -> None:
        if self.compiled:
            if not hasattr(self, "_compiled_update"):
                self._compiled_update = torch.compile(self._update, dynamic=False)
            self._compiled_update(self.state, self.lam)
        else:
            self._update(self.state, None)

    def _update(self, state: dict[str, torch.Tensor], lam: torch.Tensor | None) -> None:
        new = self.step_fn(self.cfg, self.objective, state, self.adam, lam)
        for key, value in new.items():
            if key not in ("z0", "cond"):
                state[key].copy_(value)  # in place: the graph replays on these buffers


class CompileUnavailable(RuntimeError):
    """torch.compile could not build the step here (no C++ compiler on the CPU, no Triton on
    CUDA, a compiler error): ``error`` is the underlying exception's type, ``detail`` its
    first line."""

    def __init__(self, error: str, detail: str) -> None:
        self.error, self.detail = error, detail
        super().__init__(f"torch.compile failed ({error}: {detail}); it needs a C++ compiler (g++) on the CPU "
                         "and Triton on CUDA")


class CompiledStepMismatch(RuntimeError):
    """The compiled step does not compute what the eager step computes on the probe batch."""

    def __init__(self, median_distance: float, tolerance: float, same_topk: float) -> None:
        self.median_distance, self.tolerance, self.same_topk = median_distance, tolerance, same_topk
        super().__init__(f"the compiled step disagrees with the eager step on a probe batch (median normalised "
                         f"distance of z {median_distance:.3g} > {tolerance:.3g}, or identical top-10 of a probe "
                         f"gallery {same_topk:.0%} < {PROBE_MIN_SAME_TOPK:.0%})")


def _compiling(build: Callable[[], None]) -> None:
    """Run ``build`` (whose first step compiles) and turn any failure into CompileUnavailable."""
    try:
        build()
    except Exception as err:  # noqa: BLE001 -- whatever the compiler stack raises
        lines = str(err).splitlines()
        raise CompileUnavailable(type(err).__name__, lines[0][:300] if lines else "") from err


class CompiledStep(FixedStep):
    """The step through torch.compile, compiled on first use (timed as capture_s), with its
    kernels in cir-bench's own cache (paths.kernel_cache_dir) and checked against the eager
    step before it is trusted (``verify_compiled_step``)."""

    def __init__(self, *args) -> None:
        from cir_bench.paths import use_kernel_cache

        _allow_recompiles()
        use_kernel_cache()
        super().__init__(*args, compile=True)
        t0 = time.perf_counter()
        self.reset(self.state["z0"][:0].clone(), self.state["cond"][:0].clone(), 0)  # every row inactive
        _compiling(super().step)
        self.capture_s = time.perf_counter() - t0
        self.compile_note = verify_compiled_step(self, FixedStep(*args))


class GraphStep(FixedStep):
    """The same step (compiled or not) captured once in a CUDA graph and replayed (one launch
    per step); the warm-up before the capture is where a compiled step compiles."""

    def __init__(self, *args, compile: bool = False) -> None:
        super().__init__(*args, compile=compile)
        t0 = time.perf_counter()
        self.reset(self.state["z0"][:0].clone(), self.state["cond"][:0].clone(), 0)  # every row inactive
        _compiling(self._capture) if compile else self._capture()
        self.capture_s = time.perf_counter() - t0

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (autograd, cuBLAS handles)
            for _ in range(3):
                super().step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            super().step()
        torch.cuda.synchronize()

    def step(self) -> None:
        self.graph.replay()


def verify_compiled_step(compiled: FixedStep, eager: FixedStep) -> str:
    """Run the compiled and the eager step ``PROBE_STEPS`` times on the same probe batch (a
    seeded draw of z0 and conditions filling the bucket) and compare: the median over rows of
    |z_c − z_e| / |z_e| must stay within PROBE_STEPS · fan-in · ε(float32) · 8 (a forward error
    bound of the heads' dot products, accumulated over the steps, with room for Adam's
    normalisation), and the top-10 of a seeded probe gallery (by dot product) must be the same
    for ≥ 90 % of the rows. Raises ``CompiledStepMismatch``; returns what it measured."""
    state = compiled.state
    bucket, d = state["z0"].shape
    gen = torch.Generator().manual_seed(PROBE_SEED)
    z0 = torch.randn(bucket, d, generator=gen)
    _, classes = head_sizes(compiled.heads, compiled.properties)
    cond = torch.stack([torch.randint(0, n, (bucket,), generator=gen) for n in classes], 1)
    dev = state["z0"].device
    z0, cond = z0.to(dev), cond.to(device=dev, dtype=state["cond"].dtype)
    for runner in (compiled, eager):
        runner.reset(z0, cond, bucket, compiled.cfg.lam)
        for _ in range(PROBE_STEPS):
            runner.step()
    zc, ze = compiled.state["z"].float().cpu(), eager.state["z"].float().cpu()
    fan_in = max(m.in_features for p in compiled.properties for m in compiled.heads[p].modules()
                 if isinstance(m, torch.nn.Linear))
    tolerance = PROBE_STEPS * fan_in * torch.finfo(torch.float32).eps * 8
    dist = (zc - ze).norm(dim=1) / ze.norm(dim=1).clamp_min(1e-12)
    median = float(dist.median()) if torch.isfinite(dist).all() else float("inf")
    k = 10
    gallery = torch.randn(PROBE_GALLERY, d, generator=gen)
    top_c, top_e = (zc @ gallery.T).topk(k, dim=1).indices, (ze @ gallery.T).topk(k, dim=1).indices
    same = float((top_c.sort(dim=1).values == top_e.sort(dim=1).values).all(dim=1).float().mean())
    if not median <= tolerance or same < PROBE_MIN_SAME_TOPK:
        raise CompiledStepMismatch(median, tolerance, same)
    return (f"verified against the eager step on a {bucket}-row probe ({PROBE_STEPS} steps: median distance "
            f"{median:.1e} <= {tolerance:.1e}, identical top-{k} of a probe gallery {same:.0%})")


STEP_CACHE: dict[tuple, tuple[Any, FixedStep]] = {}


def cached_step(cfg: BackwardSearchConfig, step: StepFunction, objective, heads, properties: tuple[str, ...],
                bucket: int, device: torch.device, cond_dtype: torch.dtype, *, capture: bool,
                compile: bool) -> FixedStep:
    """The captured and/or compiled step for (heads and their weights, properties, bucket,
    device, settings, gradient, compile), reused across calls and methods; a weak reference
    checks that ``heads`` is still the same object, the state version that its weights did not
    change (the analytic objective captured copies of them). A compiled step takes λ as an
    input, so λ is not part of its key. A step that cannot be compiled or disagrees with the
    eager step falls back to the uncompiled one, with the reason in ``compile_note``."""
    settings = asdict(cfg)
    if compile:
        settings.pop("lam")
    key = (id(heads), properties, bucket, str(device), str(cond_dtype), type(objective).__name__, step, capture,
           compile, state_version({p: heads[p] for p in properties}), json.dumps(settings, sort_keys=True,
                                                                                default=str))
    hit = STEP_CACHE.get(key)
    if hit is not None and hit[0]() is heads:
        return hit[1]
    args = (cfg, step, objective, heads, properties, bucket, device, cond_dtype)
    try:
        if capture and compile:
            _allow_recompiles()
            runner = GraphStep(*args, compile=True)
            runner.compile_note = verify_compiled_step(runner, FixedStep(*args))
        elif capture:
            runner = GraphStep(*args)
        else:
            runner = CompiledStep(*args)
    except (CompileUnavailable, CompiledStepMismatch) as err:
        runner = GraphStep(*args) if capture else FixedStep(*args)
        runner.compile_note = f"fell back to the uncompiled step: {err}"
    if compile and not runner.compiled:
        print(f"cir-bench: Backward Search compile (bucket {bucket}, {', '.join(properties)}): "
              f"{runner.compile_note}", file=sys.stderr, flush=True)
    if len(STEP_CACHE) >= STEP_CACHE_SIZE:
        STEP_CACHE.pop(next(iter(STEP_CACHE)))
    STEP_CACHE[key] = (weakref.ref(heads), runner)
    return runner


def _allow_recompiles() -> None:
    """Every compiled step is the same code (``FixedStep._update``) with other heads,
    properties, bucket or settings: torch.compile counts each as a recompilation of that code
    and, past its limit (8), would quietly run the rest uncompiled. Allow as many as the cache
    holds."""
    import torch._dynamo

    conf = torch._dynamo.config
    name = "recompile_limit" if hasattr(conf, "recompile_limit") else "cache_size_limit"
    setattr(conf, name, max(getattr(conf, name), 2 * STEP_CACHE_SIZE))
