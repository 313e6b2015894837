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

With ``--dga-basis`` the weights gamma are over N basis distributions, P the N x K basis matrix, and
the caps act on the fine domains' weights alpha = gamma^T P. The projection is then

    argmin_gamma  KL(gamma || gamma_hat) + PENALTY * K * sum_j max((gamma^T P)_j - cap_j, 0)

on the simplex: an exact penalty, so whenever weights within the caps exist and each cap costs less
than PENALTY K nats of KL per unit of weight, it is the KL projection onto {gamma : gamma^T P <= caps}.
When no such weights exist (a smoothed basis puts mass on every fine domain, so once one fine domain
has used its R epochs every gamma repeats it a little), it trades the least repetition against KL.
It has no closed form. N is small and K large, so it is solved in the N weights by a log-barrier
method over the fine domains that some basis could push past their cap (:func:`_barrier_solve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

PENALTY = 40.0
"""With a basis: the nats of KL divergence that weight over the caps costs, per 1/K of it (K fine domains;
module docstring): an excess of one uniform fine domain's share weighs e^40 on a basis's weight. Scaled
by K because a fine domain weighs ~1/K: a fixed 1e3 left caps that some weights meet up to 0.3 % over at
K = 4,096 and 1 % at K = 32,768, a fixed 1e5 left 1e-10 of excess at K = 262,144; 40 K meets them exactly
at all three (benchmarks/bench_caps.py)."""
CAP_TOL = 1e-6
"""With a basis: a fine domain's weight within (1 + CAP_TOL) of its cap meets it (the solver's tolerance)."""


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
    """Whether the weights meet every cap (over the domains: whether the caps sum to at least 1, else every
    domain is over budget by the same factor; over a basis: to CAP_TOL)."""


def project_capped_simplex(weights: np.ndarray, caps: np.ndarray, basis: Optional[object] = None) -> Projected:
    """The KL projection of ``weights`` (on the simplex) onto {sum = 1, 0 <= alpha <= caps}.

    Domains with weight 0 keep 0 while the others can absorb the mass (mirror descent never revives
    them either); when they cannot, the weights are ``caps / sum(caps)`` over every domain. With
    ``basis`` (an N x K matrix, dense or ``scipy.sparse``) the weights are over its N rows and the caps
    over its K columns (:func:`_project_basis`).
    """
    if basis is not None:
        return _project_basis(weights, caps, basis)
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


def _project_basis(gamma_hat: np.ndarray, caps: np.ndarray, basis) -> Projected:
    """The penalised KL projection of basis weights (module docstring); ``binding`` counts the fine
    domains at or over their cap, ``feasible`` whether every cap is met (to CAP_TOL)."""
    gamma_hat = np.asarray(gamma_hat, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.float64)
    matrix = basis.tocsr() if hasattr(basis, "tocsr") else np.asarray(basis, dtype=np.float64)
    alpha = np.asarray(matrix.T @ gamma_hat).ravel()
    if np.all(alpha <= caps):
        return Projected(gamma_hat.copy(), 0, True)
    support = np.flatnonzero(gamma_hat > 0)
    rows = matrix[support]
    col_max = rows.max(axis=0)
    col_max = np.asarray(col_max.todense() if hasattr(col_max, "todense") else col_max).ravel()
    cols = np.flatnonzero(col_max > caps)  # the fine domains some basis in the support can push past their cap
    out = np.zeros_like(gamma_hat)
    out[support] = _barrier_solve(gamma_hat[support], rows[:, cols], caps[cols], PENALTY * caps.size)
    alpha = np.asarray(matrix.T @ out).ravel()
    at_cap = alpha >= caps * (1 - CAP_TOL)
    return Projected(out, int(np.count_nonzero(at_cap & (alpha > 0))), bool(np.all(alpha <= caps * (1 + CAP_TOL))))


def _barrier_solve(
    hat: np.ndarray, sub, caps: np.ndarray, penalty: float, gap: float = 1e-10, growth: float = 100.0
) -> np.ndarray:
    """argmin_g KL(g || hat) + penalty * sum_j max((g^T sub)_j - caps_j, 0) on the simplex, all of ``hat`` > 0.

    A log-barrier method in the N weights (N is small, the columns many): with an excess e_j >=
    max(r_j, 0), r = sub^T g - caps, the barrier t (KL + penalty sum e) - sum log g - sum log e
    - sum log(e - r) is minimised over each e_j in closed form, leaving a self-concordant function
    of g whose N x N Newton system is one product sub diag(.) sub^T. Newton steps backtrack until the
    barrier decreases (Armijo) while the decrement is >= 1/4, and are taken whole below (the
    quadratically convergent region of a self-concordant function). The duality gap after each
    centring is at most (N + 2 K) / t; t grows by ``growth`` until that is below ``gap``.
    """
    n, m = hat.size, caps.size
    log_hat = np.log(hat)

    def barrier(g, t):
        r = np.asarray(sub.T @ g).ravel() - caps
        phi, d1, d2 = _excess_barrier(r, t * penalty)
        return t * float(g @ (np.log(g) - log_hat)) - float(np.log(g).sum()) + float(phi.sum()), d1, d2

    g = hat.copy()
    t = 1.0
    while True:
        value, d1, d2 = barrier(g, t)
        for _ in range(100):
            grad = t * (np.log(g) - log_hat + 1.0) - 1.0 / g + np.asarray(sub @ d1).ravel()
            keep = np.flatnonzero(d2 >= d2.max() * 1e-12)
            part = sub[:, keep]
            if hasattr(part, "multiply"):  # scipy.sparse
                hess = (part.multiply(d2[keep][None, :]).tocsr() @ part.T).toarray()
            else:
                hess = (part * d2[keep]) @ part.T
            hess[np.diag_indices(n)] += t / g + 1.0 / g**2
            # Newton step on the plane sum(g) = 1: dx = -H^-1 (grad + w 1) with 1^T dx = 0
            h_grad, h_one = np.linalg.solve(hess, np.stack([grad, np.ones(n)], axis=1)).T
            dx = -(h_grad - (h_grad.sum() / h_one.sum()) * h_one)
            slope = float(grad @ dx)
            if -slope < 1e-12:
                break
            step = 1.0
            while np.any(g + step * dx <= 0):
                step *= 0.5
            while True:
                new = g + step * dx
                new_value, new_d1, new_d2 = barrier(new, t)
                if -slope < 1.0 / 16 or new_value <= value + 0.25 * step * slope or step < 1e-12:
                    break
                step *= 0.5
            g, value, d1, d2 = new, new_value, new_d1, new_d2
        if (n + 2 * m) / t < gap:
            return g / g.sum()
        t *= growth


def _excess_barrier(r: np.ndarray, a: float):
    """phi(r) = min_{e > max(r, 0)} a e - log e - log(e - r), with its first and second derivatives.

    The minimiser solves a e^2 - (a r + 2) e + r = 0: e = (a r + 2 + s) / (2 a), s = sqrt(a^2 r^2 + 4);
    phi' = 1 / (e - r) and phi'' = (1 - e') / (e - r)^2 with e' = (1 + a r / s) / 2. Each is written
    without cancellation for either sign of a r (s - a r = 4 / (s + a r) and s + a r = 4 / (s - a r)).
    """
    ar = a * r
    s = np.sqrt(ar * ar + 4.0)
    positive = ar > 0
    s_minus = np.where(positive, 4.0 / np.maximum(s + ar, 2.0), s - ar)
    s_plus = np.where(positive, s + ar, 4.0 / np.maximum(s - ar, 2.0))
    e = (2.0 + s_plus) / (2.0 * a)
    gap = (2.0 + s_minus) / (2.0 * a)  # e - r
    phi = a * e - np.log(e) - np.log(gap)
    return phi, 1.0 / gap, s_minus / (2.0 * s) / gap**2
