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
samples are spread over the data-parallel ranks.

Noise (--dga-noise): each domain probe is cut into G equal groups (G / DP per rank), each
back-propagated on its own, so that a_i = sum_g (n_g / b_dom) d_g is a mean of G
independent estimates d_g = <g_i^g, P g_spe>. Their spread gives a_i's standard error,
se_i^2 = sum_g n_g (d_g - a_i)^2 / ((G - 1) b_dom), and the fraction of groups that agree with
a_i's sign. A group's dot is whole once summed over its model-parallel ranks (one extra
all-reduce of G / DP x k floats over the model-parallel group, none without model
parallelism); its square, sign and count then ride in the one all-reduce over the world,
from the first model-parallel rank of each replica only. Probes change nothing the training
step sees: grad buffers are cleared afterwards, the RNG streams are restored, the
optimizer, LR schedule and training data stream are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

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
    stderr: Optional[np.ndarray] = None
    """With noise groups: the standard error of each a_i (k,), from the spread of the groups' estimates."""
    sign_agreement: Optional[np.ndarray] = None
    """With noise groups: per domain, the fraction of groups whose estimate has a_i's sign."""
    instep_domains: Optional[int] = None
    """The in-step estimator (mixing/instep.py): domains whose a_i came from training micro-batches."""
    instep_micro_batches: Optional[int] = None
    """The in-step estimator: training micro-batches those alignments averaged, over all ranks."""
    target: Optional[List[torch.Tensor]] = field(default=None, repr=False)
    """With ``keep_target``: g_spe, one tensor per parameter (the in-step estimator keeps it)."""


def _num_samples(micro_batches) -> int:
    return int(sum(len(mb["tokens"]) for mb in micro_batches))


def exact_alignments(
    view: TrainerView,
    sources: Sequence[int],
    domain_batch_size: int,
    specific_batch_size: int,
    preconditioner: str = "none",
    probe_fn=None,
    noise_groups: int = 0,
    keep_target: bool = False,
) -> AlignmentResult:
    """Compute a_i for each source i in ``sources`` (indices into the view's probe sources).

    Args:
        view: the trainer (see mixing.base.TrainerView).
        sources: probe sources to align (domain indices, or basis indices with probe_fn).
        domain_batch_size: b_dom, sequences per domain probe (over all DP ranks).
        specific_batch_size: b_spe, sequences of the specific set (over all DP ranks).
        preconditioner: "none" or "adam" (diag(1/(sqrt(v_hat)+eps)) from the optimizer).
        probe_fn: callable (source, size, groups=0) -> this rank's micro-batches (its groups of them with
            ``groups``); default view.probe_domain.
        noise_groups: G >= 2 measures the noise (module docstring); 0 back-propagates each probe at once.
        keep_target: return g_spe in ``result.target`` (``sources`` may then be empty).
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
    device = target[0].device if target else "cpu"
    # Rows: weighted partial dot, weighted squared local norm, loss sum, samples; with noise groups
    # also sum_g n_g d_g^2, groups with d_g > 0, groups (whole dots, first model-parallel rank only).
    partial = torch.zeros(7 if noise_groups else 4, k, dtype=torch.float64, device=device)
    group_dots, group_sizes = [], []
    for j, source in enumerate(sources):
        groups = (
            probe_fn(source, domain_batch_size, groups=noise_groups)
            if noise_groups
            else [probe_fn(source, domain_batch_size)]
        )
        for group in groups:
            n_local = _num_samples(group)
            if n_local == 0:
                continue
            stats = view.backward(group, sync_grads=False)
            grads = view.grads()
            share = n_local / domain_batch_size
            dot = ops.grad_dot(grads, target, counted=counted, **precond)
            partial[0, j] += share * dot
            partial[1, j] += share * ops.grad_dot(grads, grads, counted=counted)
            partial[2, j] += stats.mean_loss * n_local
            partial[3, j] += n_local
            if noise_groups:
                group_dots.append((j, dot))
                group_sizes.append(n_local)
    _zero(view)
    restore_rng_state(rng)
    if noise_groups:
        _noise_rows(view, partial, group_dots, group_sizes)

    if k:
        view.all_reduce(partial, group="world")
    view.all_reduce(spe_sq, group="mp")
    partial = partial.cpu().numpy()
    # Loss sums and sample counts are added over model-parallel ranks too; their ratio is unaffected.
    result = AlignmentResult(
        alignments=partial[0],
        domain_grad_norms=np.sqrt(np.maximum(partial[1], 0.0)),
        specific_grad_norm=float(torch.sqrt(spe_sq.clamp(min=0.0))),
        domain_probe_loss=partial[2] / np.maximum(partial[3], 1.0),
        # The specific backward was synchronised over DP, but its loss is this rank's share.
        specific_probe_loss=float(spe_stats.mean_loss),
    )
    if noise_groups:
        result.stderr, result.sign_agreement = noise_statistics(partial[0], *partial[4:7], domain_batch_size)
    if keep_target:
        result.target = target
    return result


def _noise_rows(view: TrainerView, partial: torch.Tensor, group_dots: list, group_sizes: list) -> None:
    """Rows 4-6 of ``partial`` from this rank's groups: their dots summed over the model-parallel group
    first (a square of a partial dot is not a partial of the square), then counted once per replica."""
    dots = torch.tensor([float(d) for _, d in group_dots], dtype=torch.float64, device=partial.device)
    view.all_reduce(dots, group="mp")  # every model-parallel rank ran the same groups in the same order
    if not view.model_parallel_leader():
        return
    sizes = torch.tensor(group_sizes, dtype=torch.float64, device=partial.device)
    rows = torch.tensor([j for j, _ in group_dots], dtype=torch.long, device=partial.device)
    partial[4].index_add_(0, rows, sizes * dots * dots)
    partial[5].index_add_(0, rows, (dots > 0).to(torch.float64))
    partial[6].index_add_(0, rows, torch.ones_like(dots))


def noise_statistics(alignments, sum_sq, positive, groups, domain_batch_size: int):
    """(standard error of each a_i, fraction of groups agreeing with its sign) from the reduced sums.

    a_i = sum_g (n_g / b) d_g; se_i^2 = (sum_g n_g d_g^2 - b a_i^2) / ((G - 1) b), the variance of a mean of
    groups of n_g samples (clipped at 0 against rounding); NaN with fewer than two groups.
    """
    b = float(domain_batch_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(sum_sq - b * alignments**2, 0.0) / ((groups - 1.0) * b)
        stderr = np.where(groups >= 2, np.sqrt(var), np.nan)
        agree = np.where(alignments >= 0, positive, groups - positive) / groups
    return stderr, agree


def shrink_by_noise(alignments: np.ndarray, stderr: np.ndarray) -> np.ndarray:
    """a_i * SNR_i^2 / (1 + SNR_i^2) = a_i^3 / (a_i^2 + se_i^2): a well-measured alignment is kept, one
    within its noise shrinks towards 0 (the Wiener factor); a_i = se_i = 0 gives 0."""
    power = alignments**2
    total = power + stderr**2
    return np.divide(alignments * power, total, out=np.zeros_like(alignments), where=total > 0)


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
