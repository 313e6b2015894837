"""Pure-torch reference of the fused alignment ops.

This is the fallback when the extension ``megatron_dga._C`` is not built, the backend
for CUDA tensors when the extension has no CUDA kernels, and the implementation the
tests compare the kernels against. It runs on any device torch supports.

The functions here take arguments already validated and normalised by
``megatron_dga.ops`` (lists of contiguous tensors on one device, counted entries
only, float64 simplex inputs); call them through that module.

Maths
-----
``grad_dot``: with gradient pieces ``g_j``, target pieces ``t_j`` and, optionally, Adam's
second moment ``v_j``::

    dot = sum_j sum_e g_j[e] * t_j[e] / (sqrt(v_j[e] / bias_correction2) + eps)

(the denominator is left out without ``v``). ``fp64=True`` forms products and sums in
float64; ``fp64=False`` forms them in float32 per chunk of ``_CHUNK`` elements (torch's
own summation inside a chunk, pairwise/cascaded on CPU) and adds the chunk sums in float64.

``simplex_update``: one step of exponentiated gradient (mirror descent) on the simplex::

    alpha_hat = softmax(log(alpha) + eta * a)        over the support {i : alpha_i > 0}
    alpha_ema = (1 - beta) * alpha + beta * alpha_hat
    alpha_new = (1 - floor) * alpha_ema + floor / k

Entries with ``alpha_i = 0`` get ``alpha_hat_i = 0`` without forming ``log(0)``. The
softmax subtracts the maximum of ``z = log(alpha) + eta * a`` over the support, so any
finite ``eta * a`` is safe. If ``eta * a_i`` overflows float64 (|a| near 1e308), the
limit is taken exactly: two distinct doubles that large differ by more than 1e292 after
scaling, which dwarfs ``|log alpha| <= 745``, so all the mass goes to the maximisers of
``sign(eta) * a`` on the support, shared in proportion to ``alpha``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# Elements per chunk: bounds the float64 temporaries the reference materialises
# (about 4 tensors of 8 B x _CHUNK = 128 MiB) whatever the tensor sizes.
_CHUNK = 1 << 22


@torch.no_grad()
def grad_dot(
    grads: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    exp_avg_sq: Optional[Sequence[torch.Tensor]] = None,
    bias_correction2: float = 1.0,
    eps: float = 1e-8,
    fp64: bool = True,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Dot product of a gradient (list of pieces) with a target gradient, in torch ops.

    Args:
        grads: gradient pieces, contiguous, all on one device.
        targets: target pieces, ``targets[j].numel() == grads[j].numel()``.
        exp_avg_sq: Adam second-moment pieces; ``None`` for the plain dot product.
        bias_correction2: Adam's ``1 - beta2**step``; ``v_hat = v / bias_correction2``.
        eps: Adam's epsilon, added to ``sqrt(v_hat)``.
        fp64: accumulate in float64 (True) or float32 per chunk (False).
        device: device of the result when ``grads`` is empty.

    Returns:
        A 0-d float64 tensor on the gradients' device (no host synchronisation).
    """
    if len(grads) > 0:
        device = grads[0].device
    acc_dtype = torch.float64 if fp64 else torch.float32
    total = torch.zeros((), dtype=torch.float64, device=device)
    for j, (g, t) in enumerate(zip(grads, targets)):
        g_flat, t_flat = g.reshape(-1), t.reshape(-1)
        v_flat = exp_avg_sq[j].reshape(-1) if exp_avg_sq is not None else None
        for start in range(0, g_flat.numel(), _CHUNK):
            stop = start + _CHUNK
            prod = g_flat[start:stop].to(acc_dtype) * t_flat[start:stop].to(acc_dtype)
            if v_flat is not None:
                denom = (v_flat[start:stop].to(acc_dtype) / bias_correction2).sqrt_().add_(eps)
                prod.div_(denom)
            total += prod.sum(dtype=acc_dtype).to(torch.float64)
    return total


@torch.no_grad()
def simplex_update(alpha: torch.Tensor, alignment: torch.Tensor, eta: float, beta: float, floor: float) -> torch.Tensor:
    """Mirror-descent step + EMA + floor on the simplex (see the module docstring).

    Args:
        alpha: float64 1-D weights on the simplex (validated by the caller).
        alignment: float64 1-D finite alignments, same length.
        eta: step size (finite).
        beta: EMA coefficient in (0, 1]; 1 means no smoothing.
        floor: uniform floor in [0, 1).

    Returns:
        A new float64 tensor on alpha's device; ``alpha`` is not modified.
    """
    k = alpha.numel()
    support = alpha > 0
    # log of 1 off the support keeps log(0) (and -inf + inf = NaN) out of the graph.
    log_alpha = torch.log(torch.where(support, alpha, torch.ones_like(alpha)))
    neg_inf = torch.full_like(alpha, float("-inf"))
    z = torch.where(support, log_alpha + eta * alignment, neg_inf)
    m = z.max()
    if bool(torch.isfinite(m)):
        w = torch.exp(z - m)
        hat = w / w.sum()
    else:
        score = torch.where(support, (1.0 if eta >= 0 else -1.0) * alignment, neg_inf)
        winners = score == score.max()
        hat = torch.where(winners, alpha, torch.zeros_like(alpha))
        hat = hat / hat.sum()
    ema = (1.0 - beta) * alpha + beta * hat
    return (1.0 - floor) * ema + floor / k
