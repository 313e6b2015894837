"""Fused alignment ops of DGA: gradient dot products and the simplex update.

``grad_dot`` computes the (optionally Adam-preconditioned) inner product of a gradient
held as many parameter tensors with a saved target gradient, in one pass over memory
and without a host synchronisation, so the caller can all-reduce partial dots.
``simplex_update`` is the mirror-descent + EMA + floor step on the mixture weights.

Both run on the compiled extension ``megatron_dga._C`` (C++/OpenMP on CPU, CUDA kernels
on GPU) when it is built, else on the pure-torch reference in
``megatron_dga.ops.reference`` (one warning per process says how to build). Force a
backend with ``backend="reference" | "extension"`` or the environment variable
``MEGATRON_DGA_OPS``; ``backend()`` reports the choice.

Accumulation accuracy (``accumulate=``), relative to S = sum |terms|:
    ``"fp64"``: every product and sum in float64; error ~1e-16 * S.
    ``"fp32"``: products, and sums over short blocks (256 elements in 8 lanes on CPU, 4
    elements per load on GPU), in float32; block sums are added in float64. The error is
    bounded by ~(32 + 8) * 2^-24 * S ~ 2.3e-6 * S whatever n is (a float32 running sum
    would reach ~n * 6e-8 * S). It is faster only where float64 arithmetic is slow.
    The pure-torch reference uses torch's float32 sum over chunks of 4M elements.
Both are deterministic for given inputs: the CPU kernel's result does not depend on the
thread count, the CUDA kernel reduces without atomics.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from megatron_dga.errors import ConfigError, NumericalError
from megatron_dga.ops import reference
from megatron_dga.ops._backend import ENV_VAR, resolve

__all__ = ["backend", "grad_dot", "simplex_update", "SUPPORTED_DTYPES", "ENV_VAR"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACCUMULATE = ("fp64", "fp32")
# Tolerance on sum(alpha) == 1: loose enough for float32 weights read from a file.
_SIMPLEX_TOL = 1e-6

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]


def backend(device: Union[str, torch.device] = "cpu", *, backend: Optional[str] = None) -> str:
    """Which implementation the ops use for tensors on ``device``.

    Args:
        device: the tensors' device ("cpu", "cuda", ...).
        backend: a forced choice as the ops accept it (None: ``MEGATRON_DGA_OPS`` or auto).

    Returns:
        ``"extension"`` or ``"reference"``.
    """
    return "extension" if resolve(device, backend) is not None else "reference"


# ----------------------------------------------------------------------------- grad_dot


def _as_list(value: TensorList, what: str, where: str) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: {what} must be a list or tuple of tensors, got {type(value).__name__}")
    for j, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{where}: {what}[{j}] is a {type(t).__name__}, not a torch.Tensor")
    return list(value)


def _check_tensor(t: torch.Tensor, name: str, device: torch.device, where: str) -> torch.Tensor:
    """Checks dtype/layout/device of one piece; returns it contiguous (a copy if it was not)."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ConfigError(
            f"{where}: {name} has dtype {t.dtype}; supported dtypes are float32, bfloat16 and "
            f"float16 (cast it, e.g. {name}.float())"
        )
    if t.layout != torch.strided:
        raise ConfigError(f"{where}: {name} has layout {t.layout}; only dense tensors are supported")
    if t.device != device:
        raise ConfigError(
            f"{where}: {name} is on {t.device} but grads[0] is on {device}; every gradient, "
            "target and exp_avg_sq tensor must be on one device (move the saved target there)"
        )
    # Views into a flat grad buffer are contiguous already; other views cost one copy here.
    return t if t.is_contiguous() else t.contiguous()


def _check_scalars(bias_correction2: float, eps: float, accumulate: str, where: str) -> bool:
    if accumulate not in _ACCUMULATE:
        raise ConfigError(f"{where}: accumulate={accumulate!r} must be 'fp64' or 'fp32'")
    if not (isinstance(bias_correction2, numbers.Real) and math.isfinite(bias_correction2) and bias_correction2 > 0):
        raise ConfigError(
            f"{where}: bias_correction2={bias_correction2!r} must be a finite number > 0 "
            "(Adam's 1 - beta2**step; 1.0 for no bias correction)"
        )
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"{where}: eps={eps!r} must be a finite number >= 0 (Adam's epsilon)")
    return accumulate == "fp64"


def _prepare(
    grads: TensorList,
    targets: TensorList,
    exp_avg_sq: Optional[TensorList],
    counted: Optional[Sequence[bool]],
    where: str,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], Optional[List[torch.Tensor]], Optional[torch.device]]:
    """Validates the lists; returns the counted, contiguous pieces and their device."""
    gs = _as_list(grads, "grads", where)
    ts = _as_list(targets, "targets", where)
    vs = None if exp_avg_sq is None else _as_list(exp_avg_sq, "exp_avg_sq", where)
    if len(gs) != len(ts):
        raise ConfigError(
            f"{where}: got {len(gs)} gradient tensors but {len(ts)} target tensors; pass one "
            "target tensor per gradient tensor, in the same order"
        )
    if vs is not None and len(vs) != len(gs):
        raise ConfigError(
            f"{where}: got {len(gs)} gradient tensors but {len(vs)} exp_avg_sq tensors; pass "
            "the optimizer's exp_avg_sq for every gradient tensor, in the same order"
        )
    if counted is not None and len(counted) != len(gs):
        raise ConfigError(f"{where}: counted has {len(counted)} entries for {len(gs)} gradient tensors")
    device = gs[0].device if gs else None
    out_g, out_t, out_v = [], [], [] if vs is not None else None
    for j, (g, t) in enumerate(zip(gs, ts)):
        if g.numel() != t.numel():
            raise ConfigError(
                f"{where}: grads[{j}] has {g.numel()} elements (shape {tuple(g.shape)}) but "
                f"targets[{j}] has {t.numel()} (shape {tuple(t.shape)}); the target gradient "
                "must be saved from the same parameters in the same order"
            )
        if vs is not None and vs[j].numel() != g.numel():
            raise ConfigError(
                f"{where}: grads[{j}] has {g.numel()} elements (shape {tuple(g.shape)}) but "
                f"exp_avg_sq[{j}] has {vs[j].numel()} (shape {tuple(vs[j].shape)})"
            )
        g = _check_tensor(g, f"grads[{j}]", device, where)
        t = _check_tensor(t, f"targets[{j}]", device, where)
        v = _check_tensor(vs[j], f"exp_avg_sq[{j}]", device, where) if vs is not None else None
        if counted is not None and not counted[j]:
            continue  # a duplicate (tensor-parallel replica, tied copy) counted elsewhere
        out_g.append(g)
        out_t.append(t)
        if out_v is not None:
            out_v.append(v)
    return out_g, out_t, out_v, device


def _dot_into(
    out: torch.Tensor,
    index: int,
    gs: List[torch.Tensor],
    ts: List[torch.Tensor],
    vs: Optional[List[torch.Tensor]],
    bias_correction2: float,
    eps: float,
    fp64: bool,
    backend_arg: Optional[str],
) -> None:
    ext = resolve(out.device, backend_arg)
    if ext is not None:
        ext.grad_dot_into(out, index, gs, ts, vs or [], float(bias_correction2), float(eps), fp64)
    else:
        out[index] = reference.grad_dot(gs, ts, vs, float(bias_correction2), float(eps), fp64, out.device)


def grad_dot(
    grads: TensorList,
    targets: TensorList,
    *,
    exp_avg_sq: Optional[TensorList] = None,
    bias_correction2: float = 1.0,
    eps: float = 1e-8,
    counted: Optional[Sequence[bool]] = None,
    accumulate: str = "fp64",
    device: Optional[Union[str, torch.device]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Inner product of a gradient with a target gradient, both split into tensors.

    Computes ``sum_j <grads[j], targets[j]>``, or with ``exp_avg_sq`` the Adam-preconditioned
    ``sum_j sum_e g*t / (sqrt(v / bias_correction2) + eps)``, the preconditioner being
    applied element-wise inside the kernel (never materialised).

    Args:
        grads: gradient pieces (e.g. ``param.main_grad`` views into megatron's grad buffer),
            float32/bfloat16/float16, any shapes. A single tensor counts as a list of one.
            Non-contiguous pieces are copied to contiguous memory first (one copy each).
        targets: target pieces (the saved ``g_spe``), one per gradient piece with the same
            number of elements; the dtype may differ from the gradient's.
        exp_avg_sq: Adam's second moment per piece, or None for the plain dot product.
        bias_correction2: Adam's ``1 - beta2**step`` (1.0: no bias correction). Ignored
            without ``exp_avg_sq``.
        eps: Adam's epsilon added to ``sqrt(v_hat)``. Ignored without ``exp_avg_sq``.
        counted: per piece, False to skip it (tensor-parallel duplicates, tied copies).
        accumulate: ``"fp64"`` (default) or ``"fp32"``; see the module docstring.
        device: device of the result when ``grads`` is empty (default CPU).
        backend: ``"auto"``, ``"extension"`` or ``"reference"`` (default: ``MEGATRON_DGA_OPS``
            or auto).

    Returns:
        A 0-d float64 tensor on the gradients' device. On GPU nothing waits for the result,
        so partial dots can be all-reduced before anyone reads them.

    Raises:
        ConfigError: mismatched list lengths or element counts, mixed devices, an
            unsupported dtype, or invalid scalars.
    """
    where = "grad_dot"
    fp64 = _check_scalars(bias_correction2, eps, accumulate, where)
    gs, ts, vs, dev = _prepare(grads, targets, exp_avg_sq, counted, where)
    out = torch.zeros(1, dtype=torch.float64, device=dev if dev is not None else (device or "cpu"))
    if gs:
        _dot_into(out, 0, gs, ts, vs, bias_correction2, eps, fp64, backend)
    return out[0]


# ----------------------------------------------------------------------- simplex_update


def _check_simplex_args(alpha: torch.Tensor, alignment: torch.Tensor, eta: float, beta: float, floor: float) -> None:
    if not (isinstance(eta, numbers.Real) and math.isfinite(eta)):
        raise ConfigError(f"simplex_update: eta={eta!r} must be a finite number (the DGA step size)")
    if not (isinstance(beta, numbers.Real) and 0 < beta <= 1):
        raise ConfigError(f"simplex_update: beta={beta!r} must be in (0, 1]; 1 means no EMA, 0.1 is strong smoothing")
    if not (isinstance(floor, numbers.Real) and 0 <= floor < 1):
        raise ConfigError(f"simplex_update: floor={floor!r} must be in [0, 1); 0 disables the floor")
    if alpha.dim() != 1 or alpha.numel() < 1:
        raise ConfigError(
            f"simplex_update: alpha must be a 1-D tensor of k >= 1 weights, got shape {tuple(alpha.shape)}"
        )
    if alignment.shape != alpha.shape:
        raise ConfigError(
            f"simplex_update: alignment has shape {tuple(alignment.shape)} but alpha has "
            f"{tuple(alpha.shape)}; pass one alignment per domain"
        )
    if alignment.device != alpha.device:
        raise ConfigError(f"simplex_update: alignment is on {alignment.device} but alpha is on {alpha.device}")
    if not bool(torch.isfinite(alpha).all()):
        bad = torch.nonzero(~torch.isfinite(alpha)).flatten()[:10].tolist()
        raise ConfigError(f"simplex_update: alpha is not finite at indices {bad}")
    if bool((alpha < 0).any()):
        i = int(torch.argmin(alpha))
        raise ConfigError(
            f"simplex_update: alpha[{i}] = {float(alpha[i]):.6g} is negative; mixture weights must be >= 0"
        )
    total = float(alpha.sum())
    if abs(total - 1.0) > _SIMPLEX_TOL:
        raise ConfigError(
            f"simplex_update: alpha sums to {total:.9g}, not 1 (tolerance {_SIMPLEX_TOL:g}); "
            "normalise it first (alpha / alpha.sum())"
        )


def _check_finite_alignment(alignment: torch.Tensor) -> None:
    finite = torch.isfinite(alignment)
    if bool(finite.all()):
        return
    bad = torch.nonzero(~finite).flatten()
    shown = bad[:20].tolist()
    values = [float(alignment[i]) for i in shown]
    more = f" and {bad.numel() - len(shown)} more" if bad.numel() > len(shown) else ""
    raise NumericalError(
        f"simplex_update: the alignments are not finite for domain indices {shown}{more} "
        f"(values {values}); the mixture weights were left unchanged. Look for NaN/Inf in "
        "those domains' probe losses or gradients (fp16 overflow, too high a learning rate)."
    )


def simplex_update(
    alpha: Union[torch.Tensor, Sequence[float]],
    alignment: Union[torch.Tensor, Sequence[float]],
    *,
    eta: float,
    beta: float = 1.0,
    floor: float = 0.0,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One DGA step on the mixture weights: mirror descent, then EMA, then a floor.

    ``alpha_hat = softmax(log(alpha) + eta * alignment)``,
    ``alpha_new = (1 - beta) * alpha + beta * alpha_hat``,
    ``alpha_new = (1 - floor) * alpha_new + floor / k``. Domains with ``alpha_i = 0`` keep
    ``alpha_hat_i = 0`` (they come back only through the floor). Stable for alignments of
    any finite magnitude; see ``megatron_dga.ops.reference`` for the maths.

    Args:
        alpha: current weights (k >= 1, >= 0, summing to 1 within 1e-6); any float dtype,
            tensor or sequence. Never modified.
        alignment: k alignments ``a_i = <g_i, P g_spe>``.
        eta: step size (finite; 0 leaves alpha_hat = alpha).
        beta: EMA coefficient in (0, 1]; 1 = no EMA (the paper's "EMA 0.1" is beta = 0.1 in
            this convention: strong smoothing).
        floor: share in [0, 1) mixed in uniformly to keep every domain alive.
        backend: ``"auto"``, ``"extension"`` or ``"reference"``.

    Returns:
        New float64 weights on alpha's device.

    Raises:
        ConfigError: invalid eta/beta/floor, shapes, or alpha not on the simplex.
        NumericalError: a non-finite alignment; names the domain indices, alpha unchanged.
    """
    alpha_t = alpha if isinstance(alpha, torch.Tensor) else torch.as_tensor(alpha, dtype=torch.float64)
    align_t = (
        alignment
        if isinstance(alignment, torch.Tensor)
        else torch.as_tensor(alignment, dtype=torch.float64, device=alpha_t.device)
    )
    _check_simplex_args(alpha_t, align_t, eta, beta, floor)
    _check_finite_alignment(align_t)
    alpha64 = alpha_t.detach().to(torch.float64).contiguous()
    align64 = align_t.detach().to(torch.float64).contiguous()
    ext = resolve(alpha64.device, backend)
    if ext is not None and alpha64.device.type == "cpu":
        return ext.simplex_update(alpha64, align64, float(eta), float(beta), float(floor))
    # Tiny (k <= a few 1e5): torch ops on the weights' device are as good as a kernel.
    # Both paths build the result out of place, so it never aliases the caller's alpha.
    return reference.simplex_update(alpha64, align64, float(eta), float(beta), float(floor))
