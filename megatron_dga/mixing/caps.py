"""Token budgets on the simplex (``--dga-max-epochs R``): weights that do not repeat what is scarce.

With a token limit, a domain drawn at weight alpha_i for the rest of the run uses alpha_i * T samples,
T the training samples still to come. It stays within R epochs of its distinct samples n_i (its
``--domain-token-limit`` subset, else the whole domain), c_i of which the training stream has used
already, when

    alpha_i <= cap_i = max(R * n_i - c_i, 0) / T.

After each mirror-descent + EMA (+ floor) step the weights are projected onto the capped simplex
{alpha : sum alpha = 1, 0 <= alpha_i <= cap_i} in KL divergence, the geometry of the mirror step:
alpha_i = min(cap_i, lam * w_i) with the one lam >= 1 that makes them sum to 1 (the domains under
their caps keep their ratios). When the caps sum to less than 1 no weights can keep every domain
within R epochs; the weights are then the caps scaled to sum to 1 (every domain over its budget by
the same factor), and the update says so (``dga_caps_feasible`` 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_caps(distinct: np.ndarray, consumed: np.ndarray, remaining: float, max_epochs: float) -> np.ndarray:
    """cap_i = max(R n_i - c_i, 0) / T (module docstring); +inf everywhere once no sample remains."""
    distinct = np.asarray(distinct, dtype=np.float64)
    consumed = np.asarray(consumed, dtype=np.float64)
    if remaining <= 0:
        return np.full(distinct.shape, np.inf)
    return np.maximum(max_epochs * distinct - consumed, 0.0) / float(remaining)


@dataclass(frozen=True)
class Projected:
    """The capped weights and what the projection did."""

    weights: np.ndarray
    binding: int
    """Domains at their cap (with weight > 0)."""
    feasible: bool
    """Whether the caps sum to at least 1 (else every domain is over budget by the same factor)."""


def project_capped_simplex(weights: np.ndarray, caps: np.ndarray) -> Projected:
    """The KL projection of ``weights`` (on the simplex) onto {sum = 1, 0 <= alpha <= caps}.

    Domains with weight 0 keep 0 while the others can absorb the mass (mirror descent never revives
    them either); when they cannot, the weights are ``caps / sum(caps)`` over every domain.
    """
    w = np.asarray(weights, dtype=np.float64)
    caps = np.minimum(np.asarray(caps, dtype=np.float64), 1.0)
    support = w > 0
    if caps[support].sum() < 1.0:  # no weights on this support stay under the caps
        total = caps.sum()
        if total <= 0:  # nothing left anywhere: keep the weights (the run is about to end)
            return Projected(w.copy(), 0, False)
        out = caps / total
        return Projected(out, int(np.count_nonzero(out > 0)), bool(total >= 1.0))
    capped = np.zeros(w.shape, dtype=bool)
    # Water-filling: cap every domain whose scaled weight exceeds its cap, rescale the others, repeat
    # (each round caps at least one more domain, so at most k rounds).
    for _ in range(w.size + 1):
        free = support & ~capped
        scale = (1.0 - caps[capped].sum()) / w[free].sum() if free.any() else 0.0
        over = free & (scale * w > caps)
        if not over.any():
            break
        capped |= over
    out = np.where(capped, caps, scale * w * support)
    return Projected(out, int(np.count_nonzero(capped & (caps > 0))), True)
