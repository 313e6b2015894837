"""Choose between the compiled extension ``megatron_dga._C`` and the torch reference.

Order of precedence: the ``backend=`` argument of an op, then the environment variable
``MEGATRON_DGA_OPS``, then ``"auto"`` (the extension when it imports and has kernels
for the tensors' device, else the reference with one warning per process).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Optional, Union

import torch

from megatron_dga.errors import ConfigError

ENV_VAR = "MEGATRON_DGA_OPS"
MODES = ("auto", "extension", "reference")
BUILD_HINT = (
    "build it from the repo root with `bash scripts/setup_env.sh` or "
    "`MAX_JOBS=2 python -m pip install --no-build-isolation --no-deps -e .`"
)

_ext: Optional[ModuleType] = None
_ext_error: Optional[str] = None
_ext_tried = False
_warned: set = set()


def load_extension() -> Optional[ModuleType]:
    """Imports ``megatron_dga._C`` once; returns it, or None when it is not importable."""
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        try:
            from megatron_dga import _C

            _ext = _C
        except ImportError as exc:  # not built, or built against another torch
            _ext_error = f"{type(exc).__name__}: {exc}"
    return _ext


def extension_error() -> Optional[str]:
    """Why the extension did not import (None when it did or was not tried)."""
    return _ext_error


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def requested_mode(backend: Optional[str]) -> str:
    """The mode asked for by the argument or, when it is None, by ``MEGATRON_DGA_OPS``."""
    if backend is not None:
        if backend not in MODES:
            raise ConfigError(f"backend={backend!r} is not one of {', '.join(MODES)}")
        return backend
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(
            f"environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not one of "
            f"{', '.join(MODES)}; unset it for automatic selection"
        )
    return mode


def resolve(device: Union[str, torch.device], backend: Optional[str] = None) -> Optional[ModuleType]:
    """Returns the extension module to use for tensors on ``device``, or None for the reference.

    Raises:
        ConfigError: ``"extension"`` was forced but the extension (or its CUDA kernels)
            is not available.
    """
    mode = requested_mode(backend)
    if mode == "reference":
        return None
    ext = load_extension()
    if ext is None:
        if mode == "extension":
            raise ConfigError(
                f"the fused-ops extension megatron_dga._C was requested ({ENV_VAR}/backend="
                f"'extension') but does not import ({_ext_error}); {BUILD_HINT}"
            )
        _warn_once(
            "missing",
            f"megatron_dga._C is not built ({_ext_error}); the alignment ops fall back to the "
            f"pure-torch reference, which is slower and uses more memory. To fix, {BUILD_HINT}. "
            f"Set {ENV_VAR}=reference to choose the reference on purpose and silence this.",
        )
        return None
    if torch.device(device).type == "cuda" and not ext.has_cuda():
        if mode == "extension":
            raise ConfigError(
                "megatron_dga._C was built without CUDA kernels but the tensors are on "
                f"{device}; rebuild on a machine with the CUDA toolkit and a CUDA torch "
                "(FORCE_CUDA=1 when no GPU is visible during the build)"
            )
        _warn_once(
            "no-cuda",
            "megatron_dga._C was built without CUDA kernels; CUDA tensors use the pure-torch "
            "reference. Rebuild with the CUDA toolkit and a CUDA torch present (FORCE_CUDA=1 "
            f"when no GPU is visible during the build): {BUILD_HINT}.",
        )
        return None
    return ext
