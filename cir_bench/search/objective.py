"""The Backward Search objective and its gradient in z, per query.

    L(z) = sum_m w_m * CE(phi_m(z), c_m)  [/ M]  +  lambda * R(z - z0)

Two ways to the same numbers:

- ``AnalyticObjective``: each head read as a chain of Linear, ReLU and eval-mode BatchNorm1d
  (eval-mode dropout is the identity) and the gradient written out by hand: dCE/dlogits =
  softmax - onehot, then back through the chain. A handful of kernels per step and no
  autograd graph: on one query on a CPU a step is several times cheaper (autograd's
  bookkeeping dominates there), and a CUDA step has fewer kernels to capture. The arithmetic
  is autograd's, operation for operation: the same kernels (BatchNorm through torch's own
  forward and backward ops: re-deriving its affine map moves the last bit), the same order of
  the sums that meet in z. On the CPU the two give the same bits (tested); the search is
  still judged on top-k lists.
- ``AutogradObjective``: any other head (or a head in training mode), through autograd.
"""
from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_IDENTITY = (nn.Dropout, nn.Identity)
# what autograd runs for an eval BatchNorm and for log_softmax
_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default
_LOG_SOFTMAX_BACKWARD = torch.ops.aten._log_softmax_backward_data.default
_RELU_BACKWARD = torch.ops.aten.threshold_backward.default


class AutogradObjective:
    """The objective through the heads' own forward and autograd."""

    def __init__(self, heads: Mapping[str, nn.Module], properties: Sequence[str], cfg: Any) -> None:
        self.heads, self.properties, self.cfg = heads, list(properties), cfg

    def logits(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [self.heads[p](z) for p in self.properties]

    def __call__(self, z: torch.Tensor, z0: torch.Tensor, cond: torch.Tensor, grad: bool = False,
                 satisfied: bool = True, lam: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Per-query loss (B,), whether every condition is satisfied (B,; None unless
        ``satisfied``), dL/dz (B, d; None unless ``grad``); ``lam``: λ as a 0-d tensor instead
        of the config's (a compiled step takes it as an input)."""
        with torch.enable_grad() if grad else torch.no_grad():
            zv = z.detach().requires_grad_(True) if grad else z.detach()
            ce, sat = _ce_and_satisfied(self.logits(zv), cond, self.properties, self.cfg, satisfied=satisfied)
            loss = ce + regulariser(zv - z0, self.cfg, lam)
            g = torch.autograd.grad(loss.sum(), zv)[0] if grad else None
        return loss.detach(), sat, g


class AnalyticObjective:
    """The objective through each head's chain of ops (``head_chain``), gradient by hand."""

    def __init__(self, chains: Mapping[str, list[tuple]], properties: Sequence[str], cfg: Any) -> None:
        self.chains, self.properties, self.cfg = chains, list(properties), cfg
        # dL/dCE_m as autograd forms it in float32: 1 (or 1/M), times w_m
        scale = np.float32(1.0) / np.float32(len(properties)) if cfg.average_conditions else np.float32(1.0)
        self.grad_scale = [float(scale * np.float32(cfg.condition_weights.get(p, 1.0))) for p in properties]
        # dR/dz's factor: lambda (rounded to float32 as autograd's MulBackward does), / d for a mean
        self.lam32 = float(np.float32(cfg.lam))
        self.exact_bn_backward = True  # False: the plain product off the CPU (tests take it on the CPU)

    def __call__(self, z: torch.Tensor, z0: torch.Tensor, cond: torch.Tensor, grad: bool = False,
                 satisfied: bool = True, lam: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        cfg = self.cfg
        z = z.detach()
        logits, saved = [], []
        for prop in self.properties:
            h, keep = z, []
            for op in self.chains[prop]:
                if op[0] == "linear":
                    h = F.linear(h, op[1], op[2])
                elif op[0] == "relu":
                    h = h.relu()
                    keep.append(h)
                else:  # eval BatchNorm (torch.batch_norm: F.batch_norm without its Python checks)
                    keep.append(h)
                    h = torch.batch_norm(h, op[1], op[2], op[3], op[4], False, 0.0, op[5],
                                         torch.backends.cudnn.enabled)
            logits.append(h)
            saved.append(keep)
        logp = [lg.log_softmax(dim=1) for lg in logits]
        ce, sat = _ce_and_satisfied(logits, cond, self.properties, cfg, logp=logp, satisfied=satisfied)
        diff = z - z0
        loss = ce + regulariser(diff, cfg, lam)
        if not grad:
            return loss, sat, None
        # the sums meeting in z in the order autograd adds them: the regulariser's (made
        # last, run first), then the heads from the last to the first
        if lam is not None:
            coef = lam if cfg.reduction == "sum" else lam / z.shape[1]
        else:
            coef = self.lam32 if cfg.reduction == "sum" else float(np.float32(self.lam32) / np.float32(z.shape[1]))
        g = coef * diff.sign() if cfg.regularizer == "l1" else coef * (2 * diff)
        for m in range(len(self.properties) - 1, -1, -1):
            gs = self.grad_scale[m]
            c = cond[:, m:m + 1]
            # nll's gradient (-gs at c), then log_softmax's backward (g - exp(logp) * sum g) by
            # torch's own kernel: written out, its vectorised sum moves the last bit
            gl = torch.zeros_like(logp[m]).scatter_(1, c, -gs)
            gl = _LOG_SOFTMAX_BACKWARD(gl, logp[m], 1, gl.dtype)
            keep = saved[m]
            for op in reversed(self.chains[self.properties[m]]):
                if op[0] == "linear":
                    gl = gl @ op[1]
                elif op[0] == "relu":
                    gl = _RELU_BACKWARD(gl, keep.pop(), 0)
                elif self.exact_bn_backward and gl.device.type == "cpu":
                    gl = _BN_BACKWARD(gl, keep.pop(), op[1], op[3], op[4], None, None, False, op[5],
                                      [True, False, False])[0]
                else:  # elsewhere autograd's kernel is cuDNN's or the device's own: bits differ anyway
                    keep.pop()
                    gl = gl * op[6]
            g = g + gl
        return loss, sat, g


def _ce_and_satisfied(logits: list[torch.Tensor], cond: torch.Tensor, properties: Sequence[str], cfg: Any,
                      logp: list[torch.Tensor] | None = None, satisfied: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_m w_m CE_m [/ M] per query, and (when ``satisfied``) whether every head's argmax
    is its condition (and p(c_m | z) >= confidence when one is asked)."""
    ce = None
    sat = torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device) if satisfied else None
    for m, (prop, lg) in enumerate(zip(properties, logits)):
        w = float(cfg.condition_weights.get(prop, 1.0))
        if logp is None:
            ce_m = F.cross_entropy(lg, cond[:, m], reduction="none")
        else:  # cross_entropy is nll_loss(log_softmax): the same numbers
            ce_m = -logp[m].gather(1, cond[:, m:m + 1])[:, 0]
        term = ce_m if w == 1.0 else w * ce_m  # 1 * x and 0 + x are x: the same bits as the sum from 0
        ce = term if ce is None else ce + term
        if satisfied:
            sat &= lg.argmax(dim=1) == cond[:, m]
            if cfg.confidence > 0:
                sat &= torch.exp(-ce_m.detach()) >= cfg.confidence  # p(c_m | z)
    if cfg.average_conditions:
        ce = ce / len(properties)
    return ce, sat


def regulariser(diff: torch.Tensor, cfg: Any, lam: torch.Tensor | None = None) -> torch.Tensor:
    """λ·R(z − z0) per query (L1 or squared L2, summed or averaged over dimensions)."""
    reg = diff.abs() if cfg.regularizer == "l1" else diff.pow(2)
    reg = reg.sum(dim=1) if cfg.reduction == "sum" else reg.mean(dim=1)
    return (cfg.lam if lam is None else lam) * reg


def head_chain(head: nn.Module) -> list[tuple] | None:
    """``head`` as a chain of ("linear", W, b), ("relu",), ("bn", weight, bias, running_mean,
    running_var, eps, dBN/dx) ops, or None when it is not a chain of Linear, ReLU, eval-mode
    BatchNorm1d and Dropout/Identity or when the chain does not reproduce its forward (a
    residual, a custom forward)."""
    if head.training:
        return None  # BN on batch statistics and live dropout
    leaves = [m for m in head.modules() if not list(m.children())]
    chain: list[tuple] = []
    with torch.no_grad():
        for mod in leaves:
            if isinstance(mod, nn.Linear):
                chain.append(("linear", mod.weight.detach(), None if mod.bias is None else mod.bias.detach()))
            elif isinstance(mod, nn.BatchNorm1d):
                if mod.running_var is None or mod.running_mean is None:
                    return None
                scale = 1 / torch.sqrt(mod.running_var + mod.eps)  # dBN/dx = weight / sqrt(var + eps)
                if mod.weight is not None:
                    scale = scale * mod.weight.detach()
                chain.append(("bn", None if mod.weight is None else mod.weight.detach(),
                              None if mod.bias is None else mod.bias.detach(), mod.running_mean, mod.running_var,
                              float(mod.eps), scale))
            elif isinstance(mod, nn.ReLU):
                chain.append(("relu",))
            elif isinstance(mod, _IDENTITY):
                continue
            else:
                return None
        if not chain or chain[0][0] != "linear" or chain[-1][0] != "linear":
            return None
        weight = chain[0][1]
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(8, weight.shape[1], generator=gen, dtype=weight.dtype).to(weight.device)
        h = probe
        for op in chain:
            h = (F.linear(h, op[1], op[2]) if op[0] == "linear" else h.relu() if op[0] == "relu"
                 else F.batch_norm(h, op[3], op[4], op[1], op[2], False, 0.0, op[5]))
        ref = head(probe)
        if ref.shape != h.shape or not torch.allclose(h, ref, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max()))):
            return None
    return chain


def state_version(heads: Mapping[str, nn.Module]) -> tuple:
    """Changes when a parameter or buffer of ``heads`` is replaced or modified in place (an
    optimiser step, ``load_state_dict``), or a head switches between train and eval."""
    out = []
    for name, head in heads.items():
        out.append((name, head.training))
        out.extend((id(t), t._version) for t in head.state_dict(keep_vars=True).values())
    return tuple(out)


_CACHE: dict[tuple, tuple[Any, tuple, Any]] = {}
_CACHE_SIZE = 64


def objective_for(heads: Mapping[str, nn.Module], properties: Sequence[str], cfg: Any,
                  analytic: bool = True) -> AutogradObjective | AnalyticObjective:
    """The analytic objective when every conditioned head is a plain chain (and ``analytic``),
    else autograd's. Chains are cached per heads object and reused while its weights are
    unchanged."""
    if not analytic:
        return AutogradObjective(heads, properties, cfg)
    props = tuple(properties)
    version = state_version({p: heads[p] for p in props})
    key = (id(heads), props)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is heads and hit[1] == version:
        layers = hit[2]
    else:
        layers = {p: head_chain(heads[p]) for p in props}
        try:
            ref = weakref.ref(heads)
        except TypeError:  # a plain dict: not cached
            ref = None
        if ref is not None:
            if len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = (ref, version, layers)
    if any(v is None for v in layers.values()):
        return AutogradObjective(heads, properties, cfg)
    return AnalyticObjective(layers, properties, cfg)
