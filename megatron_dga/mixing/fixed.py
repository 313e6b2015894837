"""The fixed-mixture baselines: uniform, natural, static, importance sampling."""

from __future__ import annotations

import numpy as np

from megatron_dga.mixing.base import MixingStrategy, register
from megatron_dga.mixing.initial import initial_weights


class _Fixed(MixingStrategy):
    """The weights of --mixing NAME (mixing/initial.py), kept for the whole run."""

    def initial_weights(self) -> np.ndarray:
        return initial_weights("--mixing", self.name, self.domains, importance_weights=self.cfg.importance_weights)


@register("uniform")
class Uniform(_Fixed):
    """Every domain equally often."""


@register("natural")
class Natural(_Fixed):
    """Proportional to domain size in tokens (what concatenating the shards would give)."""


@register("static")
class Static(_Fixed):
    """The weights given in --data-path W1 P1 W2 P2 ..."""


@register("importance")
class Importance(_Fixed):
    """CRISP-style importance sampling: the histogram file of tools/importance_weights.py."""
