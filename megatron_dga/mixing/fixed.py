"""The fixed-mixture baselines: uniform, natural, static, importance sampling."""
from __future__ import annotations

import numpy as np

from megatron_dga.errors import ConfigError
from megatron_dga.mixing.base import MixingStrategy, register


@register("uniform")
class Uniform(MixingStrategy):
    """Every domain equally often."""

    def initial_weights(self) -> np.ndarray:
        return np.full(self.domains.k, 1.0 / self.domains.k)


@register("natural")
class Natural(MixingStrategy):
    """Proportional to domain size in tokens (what concatenating the shards would give)."""

    def initial_weights(self) -> np.ndarray:
        tokens = np.asarray(self.domains.num_tokens, dtype=np.float64)
        return tokens / tokens.sum()


@register("static")
class Static(MixingStrategy):
    """The weights given in --data-path W1 P1 W2 P2 ..."""

    def initial_weights(self) -> np.ndarray:
        if self.domains.static_weights is None:
            raise ConfigError(
                "--mixing static needs weights in --data-path (W1 P1 W2 P2 ...); "
                "plain prefixes were given. Add weights or use --mixing natural/uniform"
            )
        return np.asarray(self.domains.static_weights, dtype=np.float64)


@register("importance")
class Importance(MixingStrategy):
    """CRISP-style importance sampling: the histogram file of tools/importance_weights.py."""

    def initial_weights(self) -> np.ndarray:
        from megatron_dga.mixing.weights_io import load_weights

        if not self.cfg.importance_weights:
            raise ConfigError(
                "--mixing importance needs --importance-weights FILE (write it with tools/importance_weights.py)"
            )
        return load_weights(self.cfg.importance_weights, expected_domains=self.domains.names)
