"""Online Data Mixing (Albalak, Pan, Raffel, Wang, arXiv 2312.02406): an EXP3 bandit over the domains.

Each domain is an arm; its reward is the training loss the step already computed on that domain's
sequences, so ODM costs no extra forward or backward. Every T (--odm-interval) steps, with t the
number of updates so far, for every domain i that the steps since the last update drew from:

    R_i   <- alpha R_i + (1 - alpha) L_i / pi_i       reward estimate, --odm-reward-ema alpha
    eps_t  = min(1/K, sqrt(ln K / (K t)))             exploration
    pi     = (1 - K eps_t) softmax(eps_{t-1} R) + eps_t

where L_i is the mean token loss of domain i over those steps (every rank's sequences, from one
all-reduce of 2K values per step: ``TrainerView.step_domain_losses``) and pi_i the weight it was
drawn with (the importance weighting of EXP3). Domains not drawn keep their R_i. The weights start
uniform (R = 0) and stay uniform while K eps_t = 1 (the first ln K * K updates): the bandit explores
before it exploits. Weights over fine domains (--domain-map) are bandit arms like any domain; there
is no basis form (--dga-basis belongs to DGA).

All of it runs on the host in float64 from all-reduced sums, so every rank computes the same
weights (checked after each update, ``mixing.base.check_identical_across_ranks``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

from megatron_dga.mixing.base import MixingStrategy, TrainerView, check_identical_across_ranks, register
from megatron_dga.mixing.initial import initial_weights


def exploration(k: int, t: int) -> float:
    """eps_t = min(1/K, sqrt(ln K / (K t))); 1/K (all exploration) before the first update."""
    if t <= 0:
        return 1.0 / k
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


def bandit_weights(rewards: np.ndarray, t: int) -> np.ndarray:
    """pi after t updates: (1 - K eps_t) softmax(eps_{t-1} R) + eps_t (uniform for t = 0)."""
    k = rewards.size
    eps, eps_prev = exploration(k, t), exploration(k, t - 1)
    logits = eps_prev * rewards
    soft = np.exp(logits - logits.max())
    soft /= soft.sum()
    return (1.0 - k * eps) * soft + eps


@register("odm")
class ODM(MixingStrategy):
    """EXP3 over the domains, rewarded by their training losses."""

    def __init__(self, cfg, domains):
        super().__init__(cfg, domains)
        self.rewards = np.zeros(domains.k, dtype=np.float64)
        self.updates = 0
        self.weights: Optional[np.ndarray] = None
        self._pending: Optional[torch.Tensor] = None  # (2, k): loss sums and tokens since the last update
        self._last: Dict[str, object] = {}

    def setup(self, view: TrainerView) -> None:
        view.track_domain_losses()

    def initial_weights(self) -> np.ndarray:
        self.weights = initial_weights("--mixing", "uniform", self.domains)
        return self.weights.copy()

    def after_step(self, view: TrainerView) -> Optional[np.ndarray]:
        sums = view.step_domain_losses()
        if self._pending is None:
            self._pending = torch.zeros_like(sums)
        self._pending += sums
        if view.iteration % self.cfg.odm_interval != 0:
            return None
        pending, self._pending = self._pending.cpu().numpy(), None
        new = self.update(pending[0], pending[1])
        check_identical_across_ranks(view, new)
        return new.copy()

    def update(self, loss_sums: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """One bandit update from per-domain token-loss sums and token counts; the new weights."""
        drawn = tokens > 0
        losses = np.where(drawn, loss_sums / np.maximum(tokens, 1.0), 0.0)
        alpha = self.cfg.odm_reward_ema
        self.rewards = np.where(drawn, alpha * self.rewards + (1.0 - alpha) * losses / self.weights, self.rewards)
        self.updates += 1
        self.weights = bandit_weights(self.rewards, self.updates)
        self._last = {
            "odm_update": self.updates,
            "odm_exploration": exploration(self.domains.k, self.updates),
            "odm_rewards": self.rewards.tolist(),
        }
        return self.weights

    def metrics(self) -> Dict[str, object]:
        out, self._last = self._last, {}
        return out

    def state_dict(self) -> Dict:
        pending = None if self._pending is None else self._pending.cpu().double().tolist()
        return {
            "weights": None if self.weights is None else [float(w) for w in self.weights],
            "rewards": [float(r) for r in self.rewards],
            "updates": self.updates,
            "pending": pending,
        }

    def check_state(self, state, where: str, fix: str) -> None:
        """The base's weights check, then ODM's own entries."""
        from megatron_dga.state_checks import check_count, check_vector, state_error

        super().check_state(state, where, fix)
        k = self.domains.k
        check_vector(state.get("rewards"), k, "ODM rewards", where, fix)
        check_count(state.get("updates"), "ODM updates", where, fix)
        pending = state.get("pending")
        if pending is not None:
            try:
                arr = np.asarray(pending, dtype=np.float64)
            except (TypeError, ValueError):
                arr = None
            if arr is None or arr.shape != (2, k) or not np.isfinite(arr).all():
                raise state_error(where, f"ODM pending sums are {pending!r:.80}, expected 2 x {k} finite numbers", fix)

    def load_state_dict(self, state: Dict) -> None:
        """Restore a state_dict() (checked by :meth:`check_state` first)."""
        self.weights = None if state.get("weights") is None else np.asarray(state["weights"], dtype=np.float64)
        self.rewards = np.asarray(state["rewards"], dtype=np.float64)
        self.updates = int(state["updates"])
        pending = state.get("pending")
        self._pending = None if pending is None else torch.tensor(pending, dtype=torch.float64)
