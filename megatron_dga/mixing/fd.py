"""Finite-difference alignments: all k alignments from two forward passes.

An alignment is a directional derivative. With d = P g_spe (the specific gradient,
optionally Adam-preconditioned) and u = d / |d|,

    a_i = <g_i, d> = |d| * D_u L_i(theta)
        ~= |d| * (L_i(theta + h u) - L_i(theta - h u)) / (2 h)          error O(h^2)

where L_i is the mean token loss over domain i's probe samples. So one backward over the
specific batch (as in the exact estimator) and two forward passes, without gradients,
over ONE mixed probe batch holding b_dom samples of every domain give all k alignments:
per-sample loss differences are grouped by the sample's probe source. No per-domain
backward, no saved target gradient (g_spe stays in the grad buffers while the forwards
run), no per-domain dot products.

Step size. h = ``relative_step`` x |theta| (the global parameter norm, counted once
over model-parallel ranks): the parameter vector moves by a fixed fraction of its
length, so the step follows the scale of the weights rather than their count. The
default 1e-4 is measured against the exact estimator at the same parameters on the same
probe samples, in fp32:
  * tiny GPT of tests/mixing/test_dga.py (30k parameters, |theta| ~ 13), 18 alignments: max
    error (relative to max|a|) 5e-3 at 1e-6 (fp32 rounding of the losses), 4e-4 at 1e-5,
    8e-5 at 1e-4, 6e-3 at 1e-3, 0.44 at 1e-2 (the O(h^2) term: the loss is strongly
    curved along g_spe);
  * 446k-parameter GPT of benchmarks/bench_dga_overhead.py (--fd-sweep), two runs:
    1e-3..7e-3 at 1e-6, 2e-4..5e-4 at 1e-5, 8e-6..1.5e-4 at 1e-4, 9e-4..1.6e-2 at 1e-3,
    0.08..1.6 at 1e-2.
1e-4 is the best step in all three, a decade or more from either failure mode.

Exactness of the restore: the parameters are copied before the first move and copied
back after each pass, so after the estimator they are bit-identical to before (adding
and subtracting h u in floating point would not be). The RNG streams are captured
before the first forward and restored before the second (both passes see the same
dropout masks: common random numbers) and after the last. The grad buffers are zeroed
at the end. Parameters must be fp32: a bf16 copy would round h u away.

Distributed: every rank moves its own parameter shard along its shard of u (TP
duplicates move identically on every rank, as their gradients are identical); the
probe samples are spread over data-parallel ranks by ``probe_fn``; ONE all-reduce of
(loss-difference sum, loss sums, token count) per source over all ranks gives every
rank the same alignments.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_dga import ops
from megatron_dga.errors import ConfigError
from megatron_dga.mixing.alignment import AlignmentResult, preconditioner_kwargs
from megatron_dga.mixing.base import TrainerView
from megatron_dga.rng import capture_rng_state, restore_rng_state

FD_RELATIVE_STEP = 1e-4
"""Default h / |theta| (see the module docstring for how it was chosen)."""

_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def fd_alignments(
    view: TrainerView,
    sources: Sequence[int],
    domain_batch_size: int,
    specific_batch_size: int,
    preconditioner: str = "none",
    probe_fn: Optional[Callable] = None,
    relative_step: float = FD_RELATIVE_STEP,
) -> AlignmentResult:
    """Central-difference estimate of a_i = <g_i, P g_spe> for each source.

    Args:
        view: the trainer (mixing.base.TrainerView, plus ``parameters()`` and
            ``forward_token_losses()``).
        sources: probe sources to align (domain indices, or basis indices with probe_fn).
        domain_batch_size: b_dom, sequences per source (over all DP ranks).
        specific_batch_size: b_spe, sequences of the specific set (over all DP ranks).
        preconditioner: "none" or "adam" (d = diag(1/(sqrt(v_hat)+eps)) g_spe).
        probe_fn: (source, size) -> this rank's micro-batches; default view.probe_domain.
        relative_step: h / |theta|, > 0.

    Returns:
        AlignmentResult with ``domain_grad_norms=None`` (fd never forms g_i) and
        ``fd_step`` = h. Non-finite losses or a non-finite |d| give non-finite
        alignments, which the DGA update rejects (weights kept).

    Raises:
        ConfigError: relative_step <= 0, or parameters that are not fp32.
    """
    if not (isinstance(relative_step, (int, float)) and math.isfinite(relative_step) and relative_step > 0):
        raise ConfigError(
            f"the finite-difference step (h / |theta|) must be a finite number > 0, got {relative_step!r}"
        )
    probe_fn = probe_fn or view.probe_domain
    params = list(view.parameters())
    bad = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if bad:
        raise ConfigError(
            f"--dga-estimator fd moves the parameters by a tiny step and needs them in float32, got {bad}; "
            "use --dga-estimator exact with --bf16/--fp16"
        )
    rng = capture_rng_state()
    counted = view.counted()
    k = len(sources)

    spe_stats = view.backward(view.probe_specific(specific_batch_size), sync_grads=True)
    grads = view.grads()
    direction = _direction(grads, preconditioner_kwargs(view, preconditioner))
    norms_sq = torch.stack(
        [
            ops.grad_dot(direction, direction, counted=counted),
            ops.grad_dot(params, params, counted=counted),
            ops.grad_dot(grads, grads, counted=counted)
            if direction is not grads
            else torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else "cpu"),
        ]
    )
    view.all_reduce(norms_sq, group="mp")
    d_norm, theta_norm, g_norm = (
        math.sqrt(max(float(x), 0.0)) if math.isfinite(float(x)) else math.nan for x in norms_sq
    )
    h = relative_step * (theta_norm if theta_norm > 0 else 1.0)

    micro_batches = _mixed_batch(probe_fn, sources, domain_batch_size)
    # Rows: sum over samples of (loss(+h) - loss(-h)) token sums, loss(+h) sums, loss(-h) sums, tokens.
    sums = torch.zeros(4, k, dtype=torch.float64, device=params[0].device if params else "cpu")
    moved = math.isfinite(d_norm) and math.isfinite(h) and d_norm > 0
    if micro_batches and moved:
        _two_sided_sums(view, params, direction, h / d_norm, micro_batches, sums)
    for g in grads:
        g.zero_()
    restore_rng_state(rng)

    # Per-source sums over all ranks: data-parallel ranks add their samples; model-parallel
    # ranks hold the same losses, which scales numerator and denominator alike.
    view.all_reduce(sums, group="world")
    sums = sums.cpu().numpy()
    tokens = np.maximum(sums[3], 1.0)
    if moved:
        alignments = sums[0] / tokens / (2.0 * h) * d_norm
    elif d_norm == 0.0:
        alignments = np.zeros(k)  # the derivative along a zero direction: nothing to measure
    else:
        alignments = np.full(k, math.nan)  # NaN/Inf in g_spe or the parameters: the update is skipped
    return AlignmentResult(
        alignments=alignments,
        domain_grad_norms=None,
        specific_grad_norm=d_norm if direction is grads else g_norm,
        domain_probe_loss=(sums[1] + sums[2]) / (2.0 * tokens),
        specific_probe_loss=float(spe_stats.mean_loss),
        fd_step=h,
    )


def _direction(grads: List[torch.Tensor], precond: Dict[str, object]) -> List[torch.Tensor]:
    """d = P g_spe per parameter; the grad buffers themselves when P is the identity."""
    if not precond:
        return grads
    v, bc2, eps = precond["exp_avg_sq"], float(precond["bias_correction2"]), float(precond["eps"])
    with torch.no_grad():
        return [g / ((s / bc2).sqrt_() + eps) for g, s in zip(grads, v)]


def _mixed_batch(probe_fn, sources: Sequence[int], size: int) -> List[Dict[str, torch.Tensor]]:
    """This rank's share of every source's probe, as one batch re-cut into micro-batches.

    ``domain_id`` is replaced by the position of the source in ``sources``, so basis
    probes (whose samples come from many fine domains) group correctly.
    """
    parts = []
    for j, source in enumerate(sources):
        for mb in probe_fn(source, size):
            n = len(mb["tokens"])
            if n:
                part = {key: mb[key] for key in _KEYS}
                part["domain_id"] = torch.full((n,), j, dtype=torch.long)
                parts.append(part)
    if not parts:
        return []
    mbs = max(len(p["tokens"]) for p in parts)
    batch = {key: torch.cat([p[key] for p in parts]) for key in (*_KEYS, "domain_id")}
    total = len(batch["tokens"])
    return [{key: value[i : i + mbs] for key, value in batch.items()} for i in range(0, total, mbs)]


@torch.no_grad()
def _two_sided_sums(
    view: TrainerView,
    params: List[torch.Tensor],
    direction: List[torch.Tensor],
    step: float,
    micro_batches,
    sums: torch.Tensor,
) -> None:
    """Forward at theta + step*d and theta - step*d; accumulate per-source sums into ``sums``."""
    saved = [p.detach().clone() for p in params]
    pass_rng = capture_rng_state()
    losses = []
    try:
        for sign in (1.0, -1.0):
            restore_rng_state(pass_rng)  # same dropout masks in both passes
            for p, d in zip(params, direction):
                p.add_(d, alpha=sign * step)
            losses.append(view.forward_token_losses(micro_batches))
            for p, s in zip(params, saved):
                p.copy_(s)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    for mb, plus, minus in zip(micro_batches, *losses):
        source = mb["domain_id"].to(sums.device)
        plus, minus = plus.double(), minus.double()
        # Differences per token before any summation: the signal is ~h, the losses ~1.
        sums[0].index_add_(0, source, (plus - minus).sum(dim=1))
        sums[1].index_add_(0, source, plus.sum(dim=1))
        sums[2].index_add_(0, source, minus.sum(dim=1))
        sums[3].index_add_(0, source, mb["loss_mask"].to(sums.device).double().sum(dim=1))
