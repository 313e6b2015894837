"""The checks a checkpoint's state parts make on their own entries, before anything is loaded.

Each part (the sampler, the mixing strategy, the trainer's counters) validates its own state with
these; the caller says where the state came from (``where``: "checkpoint DIR") and what to do about
it (``fix``), so every message reads "<where>: <entry> is <value>, expected ...; <fix>". No
component imports here (``data/`` and ``mixing/`` use it as ``training/`` does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_dga.errors import CheckpointError


def state_error(where: str, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}; {fix}")


def check_count(value: Any, what: str, where: str, fix: str) -> None:
    """An integer >= 0 (not a bool)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise state_error(where, f"{what} is {value!r}, expected an integer >= 0", fix)


def check_vector(value: Any, size: int, what: str, where: str, fix: str, *, simplex: bool = False) -> None:
    """A list of ``size`` finite numbers; with ``simplex``, also >= 0 and summing to 1 (weights)."""
    try:
        arr = np.asarray(value, dtype=np.float64) if isinstance(value, (list, tuple, np.ndarray)) else None
    except (TypeError, ValueError, OverflowError):  # entries that are not numbers
        arr = None
    if arr is None or arr.shape != (size,):
        raise state_error(where, f"{what} is {value!r:.80}, expected {size} numbers", fix)
    if simplex:
        from megatron_dga.mixing.weights_io import check_simplex  # the one simplex rule

        check_simplex(arr, where, what, fix=fix, error=CheckpointError)
    elif not np.isfinite(arr).all():
        raise state_error(where, f"{what} holds non-finite values {arr[~np.isfinite(arr)][:5].tolist()}", fix)


def check_sparse_counts(value: Any, what: str, where: str, fix: str) -> None:
    """Sparse counters ``{'index': [...], 'value': [...]}``: equal lengths, integers >= 0."""
    index, counts = (value.get("index"), value.get("value")) if isinstance(value, dict) else (None, None)
    if not isinstance(index, list) or not isinstance(counts, list) or len(index) != len(counts):
        raise state_error(
            where, f"{what} is {value!r:.80}, expected {{'index': [...], 'value': [...]}} of equal length", fix
        )
    for i, n in zip(index, counts):
        check_count(i, f"{what} index", where, fix)
        check_count(n, f"{what} count", where, fix)
