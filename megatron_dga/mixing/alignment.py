"""Alignments a_i = <g_i, P g_spe> of every domain gradient with the specific gradient.

Exact and distributed without all-reducing k gradients (inner products are linear):

1. g_spe: one ordinary backward over the specific probe batch, all-reduced over
   data-parallel ranks like a training step; a copy is kept as the target.
2. For each domain i, every data-parallel rank r back-propagates its share n_r of the
   b_dom probe samples WITHOUT the data-parallel all-reduce, leaving its local mean
   gradient g_i^r, and computes the partial dot <g_i^r, P g_spe> over the parameters
   it owns (the fused ``ops.grad_dot``; tensor-parallel duplicates and tied copies
   counted once). Since g_i = sum_r (n_r / b_dom) g_i^r, the weighted partial dots sum
   to a_i.
3. ONE all-reduce of the k weighted partial dots over all ranks (data-parallel ranks
   sum their shares, model-parallel ranks their parameter shards) gives every rank the
   same a. Communication per update: one gradient all-reduce plus k floats.

Each rank runs k backward passes over about b_dom / DP samples: the k x b_dom probe
samples are spread over the data-parallel ranks. Probes change nothing the training
step sees: grad buffers are cleared afterwards, the RNG streams are restored, the
optimizer, LR schedule and training data stream are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_dga import ops
from megatron_dga.mixing.base import TrainerView
from megatron_dga.rng import capture_rng_state, restore_rng_state


@dataclass
class AlignmentResult:
    """What one alignment pass measured; every field is identical on every rank except the losses."""

    alignments: np.ndarray
    """a_i = <g_i, P g_spe>, float64 (k,), identical on every rank."""
    domain_grad_norms: Optional[np.ndarray]
    """Per domain: sqrt(sum_r (n_r/b) |g_i^r|^2), the RMS of the ranks' local probe-gradient
    norms (an upper bound of |g_i|, exact with one data-parallel rank); None from the
    finite-difference estimator, which never forms g_i."""
    specific_grad_norm: float
    """|g_spe| (the all-reduced specific gradient)."""
    domain_probe_loss: np.ndarray
    """Mean probe loss per domain (over this update's probe samples)."""
    specific_probe_loss: float
    """Mean loss of this rank's share of the specific probe batch."""
    fd_step: Optional[float] = None
    """h of the finite-difference estimator (None for the exact one)."""


def _num_samples(micro_batches) -> int:
    return int(sum(len(mb["tokens"]) for mb in micro_batches))


def exact_alignments(
    view: TrainerView,
    sources: Sequence[int],
    domain_batch_size: int,
    specific_batch_size: int,
    preconditioner: str = "none",
    probe_fn=None,
) -> AlignmentResult:
    """Compute a_i for each source i in ``sources`` (indices into the view's probe sources).

    Args:
        view: the trainer (see mixing.base.TrainerView).
        sources: probe sources to align (domain indices, or basis indices with probe_fn).
        domain_batch_size: b_dom, sequences per domain probe (over all DP ranks).
        specific_batch_size: b_spe, sequences of the specific set (over all DP ranks).
        preconditioner: "none" or "adam" (diag(1/(sqrt(v_hat)+eps)) from the optimizer).
        probe_fn: callable (source, size) -> this rank's micro-batches; default view.probe_domain.
    """
    probe_fn = probe_fn or view.probe_domain
    rng = capture_rng_state()
    counted = view.counted()
    precond = preconditioner_kwargs(view, preconditioner)

    spe_batches = view.probe_specific(specific_batch_size)
    spe_stats = view.backward(spe_batches, sync_grads=True)
    target = [g.detach().clone() for g in view.grads()]
    spe_sq = ops.grad_dot(target, target, counted=counted)

    k = len(sources)
    # Rows: weighted partial dot, weighted squared local norm, loss sum, samples.
    partial = torch.zeros(4, k, dtype=torch.float64, device=target[0].device if target else "cpu")
    for j, source in enumerate(sources):
        batches = probe_fn(source, domain_batch_size)
        n_local = _num_samples(batches)
        if n_local == 0:
            continue
        stats = view.backward(batches, sync_grads=False)
        grads = view.grads()
        share = n_local / domain_batch_size
        partial[0, j] = share * ops.grad_dot(grads, target, counted=counted, **precond)
        partial[1, j] = share * ops.grad_dot(grads, grads, counted=counted)
        partial[2, j] = stats.mean_loss * n_local
        partial[3, j] = n_local
    _zero(view)
    restore_rng_state(rng)

    view.all_reduce(partial, group="world")
    view.all_reduce(spe_sq, group="mp")
    partial = partial.cpu().numpy()
    # Loss sums and sample counts are added over model-parallel ranks too; their ratio is unaffected.
    return AlignmentResult(
        alignments=partial[0],
        domain_grad_norms=np.sqrt(np.maximum(partial[1], 0.0)),
        specific_grad_norm=float(torch.sqrt(spe_sq.clamp(min=0.0))),
        domain_probe_loss=partial[2] / np.maximum(partial[3], 1.0),
        # The specific backward was synchronised over DP, but its loss is this rank's share.
        specific_probe_loss=float(spe_stats.mean_loss),
    )


def preconditioner_kwargs(view: TrainerView, kind: str) -> dict:
    """Keyword arguments of ops.grad_dot for P: {} for the identity, Adam's v_hat for "adam"."""
    if kind == "none":
        return {}
    adam = view.adam_preconditioner()
    # Before the first optimizer step Adam has no second moment: the identity is used.
    return adam or {}


def _zero(view: TrainerView) -> None:
    for g in view.grads():
        g.zero_()
