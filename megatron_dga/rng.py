"""Capture and restore every random stream a training run draws from.

A resumed run must continue on the same random streams as the run that saved
the checkpoint: Python's ``random``, NumPy's global generator, torch's CPU
generator, torch's CUDA generators (one per visible device) and megatron-core's
CUDA RNG tracker (the named states used for tensor-parallel dropout).

The captured state is made of tensors and plain Python values only (no NumPy
arrays, no ``torch.Generator`` objects), so checkpoints holding it load with
``torch.load(..., weights_only=True)``.

Data-parallel note: the checkpoint stores the state of data-parallel rank 0 of
each model-parallel rank, and every data-parallel replica restores it. This is
exact when seeds do not depend on the data-parallel rank (Megatron's default;
``data_parallel_random_init=False``), which is how :mod:`megatron_dga.platform`
seeds.
"""

from __future__ import annotations

import logging
import random
import sys
from typing import Any, Optional

import numpy as np
import torch

from megatron_dga.errors import CheckpointError

logger = logging.getLogger(__name__)

RNG_STATE_FORMAT = "megatron-dga/rng-v1"
"""Value of the ``format`` key of a captured state; bumped on incompatible changes."""

_MEGATRON_RANDOM = "megatron.core.tensor_parallel.random"


def _megatron_tracker():
    """Return megatron-core's RNG tracker if one was set up in this process, else None.

    Deliberately does not import megatron-core nor create a tracker: a process that
    never touched megatron has no tracker state to save, and creating one here would
    change the tracker kind later set up by the platform code.
    """
    module = sys.modules.get(_MEGATRON_RANDOM)
    if module is None:
        return None
    if not getattr(module, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True):
        return None
    try:
        return module.get_cuda_rng_tracker()
    except Exception as exc:
        logger.warning("megatron-core RNG tracker unavailable (%s); its state is not saved", exc)
        return None


def _capture_tracker_states(tracker) -> Optional[dict]:
    if tracker is None:
        return None
    states = {}
    for name, value in tracker.get_states().items():
        if isinstance(value, torch.Generator):
            # Graph-safe (cudagraphable) trackers keep Generator objects; keep their bytes.
            states[name] = {"generator_state": value.get_state().clone()}
        elif isinstance(value, torch.Tensor):
            states[name] = {"tensor": value.detach().cpu().clone()}
        else:
            raise CheckpointError(
                f"megatron-core RNG tracker state {name!r} has unsupported type "
                f"{type(value).__name__}; expected a torch.Tensor or torch.Generator"
            )
    return states


def _restore_tracker_states(tracker, saved: dict) -> None:
    current = tracker.get_states()
    restored = {}
    for name, entry in saved.items():
        if "generator_state" in entry:
            generator = current.get(name)
            if not isinstance(generator, torch.Generator):
                raise CheckpointError(
                    f"checkpoint holds a graph-safe RNG generator state for tracker entry {name!r}, "
                    "but this run's megatron-core RNG tracker is not graph-safe; resume with the "
                    "same CUDA-graph RNG setting the checkpoint was saved with"
                )
            generator.set_state(entry["generator_state"])
            restored[name] = generator
        else:
            restored[name] = entry["tensor"]
    tracker.set_states(restored)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot all random streams of this process.

    Returns:
        A dict of tensors and plain Python values (safe for ``weights_only`` loading)
        with keys ``format``, ``python``, ``numpy``, ``torch_cpu``, ``torch_cuda``
        (a list, one state per visible device; empty without CUDA) and
        ``megatron_tracker`` (None when megatron-core's tracker is not set up).
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda_states: list[torch.Tensor] = []
    if torch.cuda.is_available():
        cuda_states = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "format": RNG_STATE_FORMAT,
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(bit_generator),
            # uint32 keys fit int64 exactly; torch has no uint32 tensors worth relying on.
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state().clone(),
        "torch_cuda": cuda_states,
        "megatron_tracker": _capture_tracker_states(_megatron_tracker()),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every random stream back to a state returned by :func:`capture_rng_state`.

    CUDA states are restored only when the number of visible devices matches the
    saved one (a checkpoint saved on CPU resumes on GPU and vice versa with a
    warning: those streams start fresh). The megatron-core tracker is restored
    when both the checkpoint and this process have one.

    Args:
        state: The dict from :func:`capture_rng_state` (possibly after a round trip
            through ``torch.save``/``torch.load``).

    Raises:
        CheckpointError: ``state`` is not a captured RNG state of a known format.
    """
    if not isinstance(state, dict) or state.get("format") != RNG_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"RNG state has format {found!r}, expected {RNG_STATE_FORMAT!r}; "
            "it was not written by megatron_dga.rng.capture_rng_state"
        )
    py = state["python"]
    gauss_next = py["gauss_next"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"]), gauss_next))

    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )

    torch.set_rng_state(state["torch_cpu"].cpu())

    cuda_states = state["torch_cuda"]
    n_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_states and len(cuda_states) == n_devices:
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    elif cuda_states or n_devices:
        logger.warning(
            "checkpoint has CUDA RNG states for %d device(s), this process sees %d: "
            "CUDA random streams are not restored",
            len(cuda_states),
            n_devices,
        )

    saved_tracker = state.get("megatron_tracker")
    tracker = _megatron_tracker()
    if saved_tracker is not None and tracker is not None:
        _restore_tracker_states(tracker, saved_tracker)
    elif saved_tracker:
        logger.warning(
            "checkpoint has megatron-core RNG tracker states %s but this process has no tracker; "
            "set up megatron parallel state before restoring RNG",
            sorted(saved_tracker),
        )
