"""A gradient-size/noise mixer in the spirit of PiKE (Li et al., arXiv 2502.06244): no specific set.

PiKE chooses the mixture that most decreases the training loss in one step, assuming the domains'
gradients barely conflict. For SGD with step size lr on the mixture gradient sum_i w_i g_i, drawn
with B sequences per step (w_i B from domain i), an L-smooth loss decreases in expectation by at least

    lr sum_i w_i |g_i|^2  -  (L lr^2 / 2) (sum_i w_i^2 |g_i|^2 + sum_i w_i tr(Sigma_i) / B)

(cross terms <g_i, g_j> dropped: low conflict), with Sigma_i the per-sequence gradient covariance of
domain i. Every T (--pike-interval) steps the weights take one mirror-descent step on this bound:

    score_i = |g_i|^2 - c (w_i |g_i|^2 + tr(Sigma_i) / (2 B))       c = L lr: --pike-penalty
    w       = EMA/floor of softmax(log w + eta * score)              the fused ops.simplex_update,
                                                                     --pike-eta, --pike-ema, --pike-min-weight

so domains whose gradients are large (much left to learn) gain weight and domains whose gradients are
mostly noise lose it. DGA asks "does this domain's gradient point where the target's does?"; this
mixer asks only "how large and how noisy is it?": run side by side on the experiment runner, they tell
whether alignment with the target is what helps.

Estimates, distributed as DGA's alignments (mixing/alignment.py): each data-parallel rank splits its
share of a b-sequence probe of domain i into halves A and B and back-propagates each without the
data-parallel reduction. Independent halves give unbiased estimates

    |g_i|^2       ~  <g_A, g_B>
    tr(Sigma_i)   ~  |g_A - g_B|^2 / (1/n_A + 1/n_B)

from three partial dot products (the fused ``ops.grad_dot``; tensor-parallel duplicates and tied
copies counted once); one all-reduce of 4k numbers averages them over the data-parallel ranks
(weights n_r / b) and sums the parameter shards. Costs: the same k x b probe sequences as DGA's
domain part, one unsharded fp32 gradient copy (g_A), no specific set. The halves are per rank, so the
estimates depend on the data-parallel size (equally unbiased at every size): a run resumed at another
DP size continues with its own estimates, not the ones the old layout would have drawn.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_dga import ops
from megatron_dga.errors import ConfigError
from megatron_dga.mixing.base import TrainerView, register
from megatron_dga.mixing.initial import initial_weights
from megatron_dga.mixing.mirror import MirrorDescentStrategy
from megatron_dga.rng import capture_rng_state, restore_rng_state


def split_halves(micro_batches: List[Dict[str, torch.Tensor]]) -> Tuple[list, list]:
    """This rank's probe micro-batches cut into halves of floor(n/2) and ceil(n/2) sequences.

    Each half is re-cut into micro-batches of one size (the largest divisor of its length up to the
    micro-batch size): megatron's schedule averages micro-batch means, which is the mean over the
    half's sequences only when the micro-batches are equally large.
    """
    rows = [_rows(mb, i, i + 1) for mb in micro_batches for i in range(len(mb["tokens"]))]
    cap = max((len(mb["tokens"]) for mb in micro_batches), default=1)
    half = len(rows) // 2
    return _equal_micro_batches(rows[:half], cap), _equal_micro_batches(rows[half:], cap)


def _rows(mb: Dict[str, torch.Tensor], start: int, stop: int) -> Dict[str, torch.Tensor]:
    return {
        key: value[start:stop] if torch.is_tensor(value) and value.dim() > 0 else value for key, value in mb.items()
    }


def _equal_micro_batches(rows: List[Dict[str, torch.Tensor]], cap: int) -> list:
    n = len(rows)
    if n == 0:
        return []
    size = max(d for d in range(1, min(cap, n) + 1) if n % d == 0)
    return [
        {
            key: torch.cat([r[key] for r in rows[i : i + size]])
            if torch.is_tensor(value) and value.dim() > 0
            else value
            for key, value in rows[i].items()
        }
        for i in range(0, n, size)
    ]


def _num(micro_batches) -> int:
    return int(sum(len(mb["tokens"]) for mb in micro_batches))


def gradient_statistics(view: TrainerView, domains: List[int], batch_size: int) -> np.ndarray:
    """(4, k) float64, identical on every rank: per domain |g_i|^2, tr(Sigma_i) (per sequence), the probe's
    mean loss and its sequence count (summed over model-parallel ranks: use the loss only as a ratio)."""
    rng = capture_rng_state()
    counted = view.counted()
    grads = view.grads()
    device = grads[0].device if grads else "cpu"
    half_a = [torch.empty_like(g) for g in grads]  # one fp32 gradient copy, reused for every domain
    partial = torch.zeros(4, len(domains), dtype=torch.float64, device=device)
    for j, source in enumerate(domains):
        batches = view.probe_domain(source, batch_size)
        first, second = split_halves(batches)
        n_a, n_b = _num(first), _num(second)
        if n_a == 0 or n_b == 0:
            continue
        stats_a = view.backward(first, sync_grads=False)
        for copy, g in zip(half_a, view.grads()):
            copy.copy_(g)
        sq_a = ops.grad_dot(half_a, half_a, counted=counted)
        stats_b = view.backward(second, sync_grads=False)
        grads = view.grads()
        sq_b = ops.grad_dot(grads, grads, counted=counted)
        cross = ops.grad_dot(grads, half_a, counted=counted)
        share = (n_a + n_b) / batch_size
        partial[0, j] = share * cross
        partial[1, j] = share * (sq_a + sq_b - 2.0 * cross) / (1.0 / n_a + 1.0 / n_b)
        partial[2, j] = stats_a.mean_loss * n_a + stats_b.mean_loss * n_b
        partial[3, j] = n_a + n_b
    for g in view.grads():
        g.zero_()
    restore_rng_state(rng)
    view.all_reduce(partial, group="world")
    return partial.cpu().numpy()


def scores(
    grad_sq: np.ndarray, noise: np.ndarray, weights: np.ndarray, penalty: float, global_batch_size: int
) -> np.ndarray:
    """score_i = |g_i|^2 - c (w_i |g_i|^2 + tr(Sigma_i) / (2 B)): the bound's decrease per unit of w_i."""
    return grad_sq - penalty * (weights * grad_sq + noise / (2.0 * global_batch_size))


@register("pike")
class PiKE(MirrorDescentStrategy):
    """Mirror descent on the one-step loss-decrease bound, from per-domain gradient size and noise."""

    label = "PiKE"

    def setup(self, view: TrainerView) -> None:
        _, dp_size = view.data_parallel()
        size = self.cfg.pike_domain_batch_size
        if size < 2 * dp_size:
            raise ConfigError(
                f"--pike-domain-batch-size {size} gives some of the {dp_size} data-parallel ranks fewer "
                f"than 2 probe sequences to split in halves; use at least {2 * dp_size}"
            )

    def initial_weights(self) -> np.ndarray:
        self.weights = initial_weights("--mixing", "uniform", self.domains)
        return self.weights.copy()

    def after_step(self, view: TrainerView) -> Optional[np.ndarray]:
        if view.iteration % self.cfg.pike_interval != 0:
            return None
        stats = gradient_statistics(view, list(range(self.domains.k)), self.cfg.pike_domain_batch_size)
        grad_sq, noise = stats[0], stats[1]
        score = scores(grad_sq, noise, self.weights, self.cfg.pike_penalty, view.global_batch_size)
        self._last = {
            "pike_grad_sq": grad_sq.tolist(),
            "pike_noise": noise.tolist(),
            "pike_scores": score.tolist(),
            "pike_update": self.updates + 1,
        }
        return self.step(view, score, eta=self.cfg.pike_eta, ema=self.cfg.pike_ema, floor=self.cfg.pike_min_weight)
