"""The update DGA and PiKE share: one fused step on the simplex from per-source scores.

``ops.simplex_update`` runs, in log space, mirror descent, the EMA and the floor (the formulas are its
docstring's; why the EMA reads the paper as it does: docs/algorithm.md, step 5).
The scores are identical on every rank (they come from all-reduced sums), so are the new weights
(checked, ``check_identical_across_ranks``); non-finite scores skip the update on every rank together,
with a warning, and keep the weights.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import numpy as np
import torch

from megatron_dga import ops
from megatron_dga.errors import NumericalError
from megatron_dga.mixing.base import MixingStrategy, TrainerView, check_identical_across_ranks
from megatron_dga.mixing.caps import epoch_caps, project_capped_simplex

logger = logging.getLogger(__name__)


class MirrorDescentStrategy(MixingStrategy):
    """A strategy whose weights move by :meth:`step` on scores; owns the weights, the update counts and
    the per-update metrics (``<name>_update``, ``<name>_skipped_updates``)."""

    label = ""
    """The method's name in messages (DGA, PiKE)."""

    def __init__(self, cfg, domains):
        super().__init__(cfg, domains)
        self.updates = 0
        self.skipped_updates = 0
        self._last: Dict[str, object] = {}

    def step(
        self,
        view: TrainerView,
        scores: np.ndarray,
        *,
        eta: float,
        ema: float,
        floor: float,
        caps: Optional[np.ndarray] = None,
        basis=None,
    ) -> Optional[np.ndarray]:
        """The new weights after one step on ``scores``, or None when the update is skipped; with ``caps``
        the step is projected onto the capped simplex (mixing/caps.py), with ``basis`` (the N x K matrix
        the weights are over) onto the weights whose fine domains stay within the caps."""
        try:
            new = ops.simplex_update(
                torch.as_tensor(self.weights, dtype=torch.float64),
                torch.as_tensor(scores, dtype=torch.float64),
                eta=eta,
                beta=ema,
                floor=floor,
            ).numpy()
        except NumericalError as exc:  # identical scores on every rank: every rank skips together
            self.skipped_updates += 1
            logger.warning("%s update at iteration %d skipped, weights kept: %s", self.label, view.iteration, exc)
            self._last[f"{self.name}_skipped_updates"] = self.skipped_updates
            return None
        if caps is not None:
            projected = project_capped_simplex(new, caps, basis)
            new = projected.weights
            self._last[f"{self.name}_caps_binding"] = projected.binding
            self._last[f"{self.name}_caps_feasible"] = int(projected.feasible)
        check_identical_across_ranks(view, new)
        self.updates += 1
        self.weights = new
        return new.copy()

    def token_budget_caps(self, view: TrainerView, max_epochs: Optional[float]) -> Optional[np.ndarray]:
        """The caps of --<name>-max-epochs R from the training stream's use of the domains (None: off)."""
        if max_epochs is None:
            return None
        budget = view.domain_budget()
        return epoch_caps(budget["distinct"], budget["used"], budget["remaining"], max_epochs)

    def metrics(self) -> Dict[str, object]:
        out, self._last = self._last, {}
        return out

    def state_dict(self) -> Dict:
        return {
            "weights": None if self.weights is None else [float(w) for w in self.weights],
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state: Dict) -> None:
        self.weights = None if state.get("weights") is None else np.asarray(state["weights"], dtype=np.float64)
        self.updates = int(state.get("updates", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))
