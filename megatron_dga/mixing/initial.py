"""Initial mixing weights: one rule for --mixing uniform/natural/static/importance and --dga-init.

:func:`check_initial` refuses, at start-up, what can never give weights (it needs no data);
:func:`initial_weights` computes them once the domains are known, after the same checks.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from megatron_dga.errors import ConfigError, DataError

NAMES = ("uniform", "natural", "static", "importance")
"""The named initial weights; --dga-init also takes a weights file."""


def check_initial(
    flag: str,
    init: str,
    *,
    static_given: Optional[bool],
    importance_weights: Optional[str],
    basis: Optional[str] = None,
) -> None:
    """ConfigError unless ``flag init`` can give initial weights.

    Args:
        flag: "--mixing" or "--dga-init" (named in the messages).
        init: uniform, natural, static, importance, or (--dga-init) a weights file.
        static_given: --data-path gave weights (None: not known yet).
        importance_weights: --importance-weights FILE, or None.
        basis: --dga-basis FILE, or None (the weights are then over its bases and start uniform).
    """
    if init == "uniform":
        return
    if basis:
        raise ConfigError(
            f"{flag} {init} weighs the K domains, but with --dga-basis {basis} DGA weighs the N basis "
            f"distributions (and starts uniform over them); drop {flag}"
        )
    if init == "static" and static_given is False:
        other = "use --mixing natural/uniform" if flag == "--mixing" else f"choose another {flag}"
        raise ConfigError(
            f"{flag} static needs weights in --data-path (W1 P1 W2 P2 ...); plain prefixes were "
            f"given. Add weights or {other}"
        )
    if init == "importance" and not importance_weights:
        raise ConfigError(
            f"{flag} importance needs --importance-weights FILE (write it with tools/importance_weights.py)"
        )


def initial_weights(
    flag: str,
    init: str,
    domains,
    *,
    importance_weights: Optional[str] = None,
    basis: Optional[str] = None,
    num_bases: int = 0,
) -> np.ndarray:
    """The initial weights ``flag init`` gives over ``domains`` (a DomainInfo), or over the bases of ``basis``.

    Args:
        flag, init, importance_weights, basis: as for :func:`check_initial`.
        domains: the DomainInfo of the run.
        num_bases: the number of basis distributions N, with ``basis``.
    """
    check_initial(
        flag, init, static_given=domains.static_weights is not None, importance_weights=importance_weights, basis=basis
    )
    if init == "uniform":
        n = num_bases if basis else domains.k
        return np.full(n, 1.0 / n)
    if init == "natural":
        tokens = np.asarray(domains.num_tokens, dtype=np.float64)
        return tokens / tokens.sum()
    if init == "static":
        return np.asarray(domains.static_weights, dtype=np.float64)
    from megatron_dga.mixing.weights_io import load_weights

    path = importance_weights if init == "importance" else init
    try:
        return load_weights(path, expected_domains=domains.names)
    except DataError as exc:
        if init != "importance" and "not found" in str(exc).lower():
            raise ConfigError(f"{flag} must be uniform, natural, static, importance or a weights file; {exc}") from None
        raise
