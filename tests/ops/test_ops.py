"""Tests of megatron_dga.ops: every built implementation against float64 numpy.

Implementations: the pure-torch reference (CPU, and CUDA when a GPU is present), the
extension's OpenMP kernel (CPU) and the extension's CUDA kernel (when built with CUDA
and a GPU is present). Each is compared with a float64 numpy computation.

Tolerances, relative to S = sum |term| (term = g*t or g*t/(sqrt(v_hat)+eps)):
  - accumulate="fp64": products and sums in float64, only the summation order differs
    from numpy, error ~ 1e-16 * S * log(n); asserted at 1e-12 * S.
  - accumulate="fp32": each term is rounded to float32 (u = 6e-8; about 4u with the
    preconditioner) and summed in float32 over blocks of 32 terms per lane + 3 pairwise
    levels (CPU) or 4 terms (GPU) before float64 takes over, so the worst case is about
    (4 + 32 + 3) * u * S = 2.3e-6 * S for any n; asserted at 5e-6 * S. The same-sign test
    below is the worst case of a running float32 sum (error ~1e-2 there).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import megatron_dga.ops as ops
from megatron_dga.errors import ConfigError, NumericalError
from megatron_dga.ops import _backend

_EXT = _backend.load_extension()
_HAS_GPU = torch.cuda.is_available()
_EXT_CUDA = _EXT is not None and _EXT.has_cuda() and _HAS_GPU
_NO_EXT = f"megatron_dga._C is not built ({_backend.extension_error()}); {_backend.BUILD_HINT}"

# (backend, device) pairs; every test parametrised with IMPLS runs on all that exist here.
IMPLS = [
    pytest.param(("reference", "cpu"), id="reference-cpu"),
    pytest.param(("extension", "cpu"), id="extension-cpu", marks=pytest.mark.skipif(_EXT is None, reason=_NO_EXT)),
    pytest.param(
        ("extension", "cuda"),
        id="extension-cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _EXT_CUDA, reason="needs a GPU and _C built with CUDA")],
    ),
    pytest.param(
        ("reference", "cuda"),
        id="reference-cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _HAS_GPU, reason="needs a CUDA GPU")],
    ),
]

FP64_RTOL = 1e-12
FP32_RTOL = 5e-6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np64(t: torch.Tensor) -> np.ndarray:
    # bf16/fp16 -> float32 is exact; .reshape(-1) follows torch's logical element order.
    return t.detach().cpu().float().numpy().astype(np.float64).reshape(-1)


def np_grad_dot(gs, ts, vs=None, bc2=1.0, eps=1e-8, counted=None):
    """Float64 numpy dot and sum |term| (the scale the tolerances are relative to)."""
    total, scale = 0.0, 0.0
    for j, (g, t) in enumerate(zip(gs, ts)):
        if counted is not None and not counted[j]:
            continue
        term = _np64(g) * _np64(t)
        if vs is not None:
            term = term / (np.sqrt(_np64(vs[j]) / bc2) + eps)
        total += math.fsum(term)
        scale += float(np.abs(term).sum())
    return total, scale


def _to(dev, xs):
    return None if xs is None else [x.to(dev) for x in xs]


def _check(got: torch.Tensor, ref: float, scale: float, rtol: float) -> None:
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(float(got) - ref) <= rtol * scale + 1e-300, (float(got), ref, scale)


# ----------------------------------------------------------------------------- grad_dot

DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1, 7, 1000, 1_000_003])
@pytest.mark.parametrize("gdt,tdt", DTYPE_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("accumulate", ["fp64", "fp32"])
def test_grad_dot_single_tensor_matches_numpy(impl, n, gdt, tdt, accumulate):
    backend, dev = impl
    gen = _gen(n)
    g = torch.randn(n, generator=gen).to(gdt)
    t = (torch.randn(n, generator=gen) + 0.1).to(tdt)  # a bias keeps the dot away from 0
    ref, scale = np_grad_dot([g], [t])
    got = ops.grad_dot([g.to(dev)], [t.to(dev)], accumulate=accumulate, backend=backend)
    assert got.device.type == dev
    _check(got, ref, scale, FP64_RTOL if accumulate == "fp64" else FP32_RTOL)


def _many_tensors(seed: int, count: int = 150):
    """Pieces of odd sizes (0 included) with mixed grad dtypes, bf16 targets, fp32/bf16 v."""
    gen = _gen(seed)
    sizes = torch.randint(0, 5000, (count,), generator=gen).tolist()
    sizes[3] = 0
    sizes[10] = 65_537
    gs, ts, vs = [], [], []
    for j, n in enumerate(sizes):
        gdt = (torch.float32, torch.bfloat16, torch.float16)[j % 3]
        gs.append(torch.randn(n, generator=gen).to(gdt))
        ts.append(torch.randn(n, generator=gen).to(torch.bfloat16))
        # v spans 1e-20..1 so that eps matters for part of the elements.
        v = torch.exp(torch.empty(n).uniform_(-46, 0, generator=gen))
        vs.append(v if j % 4 else v.to(torch.bfloat16))
    counted = (torch.rand(count, generator=gen) > 0.2).tolist()
    return gs, ts, vs, counted


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("accumulate", ["fp64", "fp32"])
def test_grad_dot_many_tensors_adam_preconditioner_and_counted(impl, accumulate):
    backend, dev = impl
    gs, ts, vs, counted = _many_tensors(1)
    bc2, eps = 1 - 0.95**7, 1e-8
    ref, scale = np_grad_dot(gs, ts, vs, bc2, eps, counted)
    got = ops.grad_dot(
        _to(dev, gs),
        _to(dev, ts),
        exp_avg_sq=_to(dev, vs),
        bias_correction2=bc2,
        eps=eps,
        counted=counted,
        accumulate=accumulate,
        backend=backend,
    )
    _check(got, ref, scale, FP64_RTOL if accumulate == "fp64" else FP32_RTOL)
    # The mask matters: counting everything gives a different number.
    ref_all, _ = np_grad_dot(gs, ts, vs, bc2, eps)
    assert abs(ref_all - ref) > 10 * FP32_RTOL * scale


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_dot_non_contiguous_and_buffer_views(impl):
    backend, dev = impl
    gen = _gen(2)
    base = torch.randn(301, 257, generator=gen).to(dev)
    flat = torch.randn(10_007, generator=gen).to(dev, torch.bfloat16)  # like a flat grad buffer
    gs = [
        base.t(),  # transposed
        base[:, ::3],  # strided slice
        base[5:200:2, 1:],  # 2-D strided
        flat.narrow(0, 1, 4000).view(40, 100),  # views at odd offsets: unaligned for vector loads
        flat.narrow(0, 4001, 6006),
    ]
    ts = [
        torch.randn(x.shape, generator=gen).to(dev).t().contiguous().t()
        if x.dim() == 2
        else torch.randn(x.shape, generator=gen).to(dev)
        for x in gs
    ]
    vs = [torch.rand(x.shape, generator=gen).to(dev)[..., :] for x in gs]
    vs[0] = torch.rand(base.shape, generator=gen).to(dev).t()  # non-contiguous v too
    assert not gs[0].is_contiguous() and not ts[0].is_contiguous()
    ref, scale = np_grad_dot(gs, ts, vs, 0.5, 1e-6)
    got = ops.grad_dot(gs, ts, exp_avg_sq=vs, bias_correction2=0.5, eps=1e-6, backend=backend)
    _check(got, ref, scale, FP64_RTOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_dot_empty_and_skipped(impl):
    backend, dev = impl
    empty = ops.grad_dot([], [], backend=backend, device=dev)
    assert empty.dtype == torch.float64 and empty.dim() == 0 and float(empty) == 0.0
    assert empty.device.type == dev
    g = [torch.ones(5, device=dev), torch.ones(0, device=dev)]
    skipped = ops.grad_dot(g, g, counted=[False, True], backend=backend)
    assert float(skipped) == 0.0 and skipped.device.type == dev
    assert float(ops.grad_dot(g, g, backend=backend)) == 5.0


@pytest.mark.skipif(_EXT is None, reason=_NO_EXT)
@pytest.mark.parametrize(
    "dev",
    [
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _EXT_CUDA, reason="no CUDA kernels/GPU")]),
    ],
)
@pytest.mark.parametrize("accumulate", ["fp64", "fp32"])
def test_extension_agrees_with_reference(dev, accumulate):
    gs, ts, vs, counted = _many_tensors(5)
    kw = dict(exp_avg_sq=_to(dev, vs), bias_correction2=0.25, counted=counted, accumulate=accumulate)
    ext = ops.grad_dot(_to(dev, gs), _to(dev, ts), backend="extension", **kw)
    ref = ops.grad_dot(_to(dev, gs), _to(dev, ts), backend="reference", **kw)
    _, scale = np_grad_dot(gs, ts, vs, 0.25, 1e-8, counted)
    assert abs(float(ext) - float(ref)) <= (FP64_RTOL if accumulate == "fp64" else 2 * FP32_RTOL) * scale


def test_fp32_accumulation_is_honoured_and_bounded():
    """fp32 accumulation differs from fp64 (it is really used) but stays within its bound."""
    gen = _gen(6)
    g = [torch.randn(1_000_003, generator=gen)]
    t = [torch.randn(1_000_003, generator=gen) + 0.5]
    ref, scale = np_grad_dot(g, t)
    for backend in ["reference"] + (["extension"] if _EXT is not None else []):
        d64 = float(ops.grad_dot(g, t, accumulate="fp64", backend=backend))
        d32 = float(ops.grad_dot(g, t, accumulate="fp32", backend=backend))
        assert d32 != d64, backend
        assert abs(d64 - ref) <= FP64_RTOL * scale
        assert abs(d32 - ref) <= FP32_RTOL * scale


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_accumulation_same_sign_terms(impl):
    """n equal positive terms: a float32 running sum drifts by ~1e-2 here, blocks do not."""
    backend, dev = impl
    n = 1_000_003
    g, t = torch.ones(n, device=dev), torch.full((n,), 0.1, device=dev)
    exact = n * float(np.float32(0.1))
    got = float(ops.grad_dot([g], [t], accumulate="fp32", backend=backend))
    assert abs(got - exact) <= FP32_RTOL * exact


@pytest.mark.skipif(_EXT is None, reason=_NO_EXT)
def test_extension_cpu_is_deterministic_across_thread_counts():
    gs, ts, vs, _ = _many_tensors(7)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(float(ops.grad_dot(gs, ts, exp_avg_sq=vs, accumulate="fp32", backend="extension")))
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1] == results[2]


def test_grad_dot_errors_name_the_problem():
    a, b = torch.ones(6), torch.ones(2, 3)
    with pytest.raises(ConfigError, match="2 gradient tensors but 1 target"):
        ops.grad_dot([a, a], [a])
    with pytest.raises(
        ConfigError, match=r"grads\[1\] has 6 elements \(shape \(2, 3\)\) but targets\[1\] has 5 \(shape \(5,\)\)"
    ):
        ops.grad_dot([a, b], [a, torch.ones(5)])
    with pytest.raises(ConfigError, match=r"exp_avg_sq\[0\] has 4"):
        ops.grad_dot([a], [a], exp_avg_sq=[torch.ones(4)])
    with pytest.raises(ConfigError, match=r"grads\[0\] has dtype torch.float64"):
        ops.grad_dot([a.double()], [a])
    with pytest.raises(ConfigError, match=r"targets\[0\] has dtype torch.int64"):
        ops.grad_dot([a], [a.long()])
    with pytest.raises(ConfigError, match=r"targets\[0\] is on meta but grads\[0\] is on cpu"):
        ops.grad_dot([a], [torch.ones(6, device="meta")])
    with pytest.raises(ConfigError, match="counted has 1 entries for 2"):
        ops.grad_dot([a, a], [a, a], counted=[True])
    with pytest.raises(ConfigError, match="accumulate='fp16'"):
        ops.grad_dot([a], [a], accumulate="fp16")
    with pytest.raises(ConfigError, match="bias_correction2=0"):
        ops.grad_dot([a], [a], exp_avg_sq=[a], bias_correction2=0)
    with pytest.raises(ConfigError, match="eps=-1"):
        ops.grad_dot([a], [a], eps=-1)
    with pytest.raises(ConfigError, match="list or tuple of tensors, got dict"):
        ops.grad_dot({"w": a}, [a])


# ------------------------------------------------------------------------------ backends


def test_backend_selection_env_and_argument(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.backend() == "reference"
    assert ops.backend(backend="auto") == ("extension" if _EXT is not None else "reference")
    monkeypatch.setenv(ops.ENV_VAR, "fastest")
    with pytest.raises(ConfigError, match="MEGATRON_DGA_OPS='fastest'"):
        ops.backend()
    monkeypatch.delenv(ops.ENV_VAR)
    with pytest.raises(ConfigError, match="backend='gpu'"):
        ops.grad_dot([torch.ones(2)], [torch.ones(2)], backend="gpu")


def test_missing_extension_warns_once_and_forced_extension_raises(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "_ext_tried", True)
    monkeypatch.setattr(_backend, "_ext", None)
    monkeypatch.setattr(_backend, "_ext_error", "ImportError: simulated")
    monkeypatch.setattr(_backend, "_warned", set())
    x = torch.arange(4.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert float(ops.grad_dot([x], [x])) == 14.0
        assert float(ops.grad_dot([x], [x])) == 14.0
        ops.simplex_update([0.5, 0.5], [0.0, 0.0], eta=1.0)
    msgs = [str(w.message) for w in caught if "megatron_dga._C" in str(w.message)]
    assert len(msgs) == 1 and "scripts/setup_env.sh" in msgs[0] and "pip install" in msgs[0]
    assert ops.backend() == "reference"
    with pytest.raises(ConfigError, match="does not import .*setup_env.sh"):
        ops.grad_dot([x], [x], backend="extension")


# ------------------------------------------------------------------------ simplex_update


def np_simplex(alpha, a, eta, beta, floor):
    """Brute-force float64 formula (no log-space tricks; use for moderate eta * a only)."""
    alpha = np.asarray(alpha, np.float64)
    w = alpha * np.exp(eta * np.asarray(a, np.float64))
    hat = w / w.sum()
    new = (1 - beta) * alpha + beta * hat
    return (1 - floor) * new + floor / alpha.size


SIMPLEX_IMPLS = [p for p in IMPLS if p.id != "extension-cuda"]  # CUDA uses torch ops


@pytest.mark.parametrize("impl", SIMPLEX_IMPLS)
@pytest.mark.parametrize("k", [1, 5, 64, 1000, 262_144])
@pytest.mark.parametrize("eta,beta,floor", [(1.0, 1.0, 0.0), (10.0, 0.1, 0.0), (-3.0, 0.5, 0.05), (0.0, 1.0, 0.2)])
def test_simplex_update_matches_formula(impl, k, eta, beta, floor):
    backend, dev = impl
    rng = np.random.default_rng(k)
    alpha = rng.dirichlet(np.ones(k))
    if k > 4:
        alpha[[1, 3]] = 0.0  # absent domains
        alpha /= alpha.sum()
    a = rng.normal(size=k) * 2.0
    alpha_t = torch.tensor(alpha, device=dev)
    alpha_before = alpha_t.clone()
    got = ops.simplex_update(alpha_t, torch.tensor(a, device=dev), eta=eta, beta=beta, floor=floor, backend=backend)
    assert got.dtype == torch.float64 and got.device.type == dev and got.shape == (k,)
    np.testing.assert_allclose(got.cpu().numpy(), np_simplex(alpha, a, eta, beta, floor), rtol=1e-12, atol=1e-300)
    assert torch.equal(alpha_t, alpha_before)  # never in place
    assert abs(float(got.sum()) - 1.0) < 1e-12
    if k > 4 and floor == 0.0:
        assert float(got[1]) == 0.0 and float(got[3]) == 0.0
    if k > 4 and floor > 0.0:
        assert float(got[1]) == pytest.approx(floor / k, rel=1e-12)


@pytest.mark.parametrize("impl", SIMPLEX_IMPLS)
def test_simplex_update_adversarial(impl):
    backend, dev = impl

    def upd(alpha, a, **kw):
        out = ops.simplex_update(
            torch.tensor(alpha, dtype=torch.float64, device=dev),
            torch.tensor(a, dtype=torch.float64, device=dev),
            backend=backend,
            **kw,
        )
        assert torch.isfinite(out).all()
        return out.cpu().numpy()

    third = [1 / 3] * 3
    np.testing.assert_array_equal(upd(third, [1e30, -1e30, 0.0], eta=10.0), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(upd(third, [1e30, -1e30, 0.0], eta=-10.0), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(upd([0.2, 0.3, 0.5], [1e-30, -1e-30, 0.0], eta=10.0), [0.2, 0.3, 0.5], rtol=1e-15)
    np.testing.assert_allclose(upd([0.2, 0.3, 0.5], [0.0] * 3, eta=10.0), [0.2, 0.3, 0.5], rtol=1e-15)
    # eta * a overflows float64: the exact limit is the argmax, ties shared in proportion to alpha.
    np.testing.assert_array_equal(upd(third, [1e308, 1e307, -1e308], eta=100.0), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(upd([0.2, 0.6, 0.2], [1e308, 1e308, 0.0], eta=10.0), [0.25, 0.75, 0.0], rtol=1e-15)
    np.testing.assert_array_equal(upd(third, [-1e308, -1.5e308, -1.7e308], eta=10.0), [1.0, 0.0, 0.0])
    # One domain: always [1.0].
    for a in (0.0, 1e300, -1e300):
        np.testing.assert_array_equal(upd([1.0], [a], eta=5.0, beta=0.3, floor=0.1), [1.0])
    # A zero weight stays zero even with a huge alignment (no log(0) NaN), unless floored.
    np.testing.assert_array_equal(upd([0.0, 1.0], [1e30, 0.0], eta=1.0), [0.0, 1.0])
    np.testing.assert_allclose(upd([0.0, 1.0], [1e30, 0.0], eta=1.0, floor=0.1), [0.05, 0.95], rtol=1e-15)
    # EMA then floor, by hand: hat = [1, 0]; ema = 0.75*[0.5,0.5] + 0.25*[1,0]; floor 0.2.
    ema = np.array([0.625, 0.375])
    np.testing.assert_allclose(upd([0.5, 0.5], [1e30, 0.0], eta=1.0, beta=0.25, floor=0.2), 0.8 * ema + 0.1, rtol=1e-15)


@pytest.mark.skipif(_EXT is None, reason=_NO_EXT)
def test_simplex_extension_agrees_with_reference():
    rng = np.random.default_rng(9)
    alpha = rng.dirichlet(np.ones(5000) * 0.1)
    a = rng.normal(size=5000) * 1e3
    kw = dict(eta=0.7, beta=0.3, floor=0.01)
    ext = ops.simplex_update(alpha, a, backend="extension", **kw)
    ref = ops.simplex_update(alpha, a, backend="reference", **kw)
    np.testing.assert_allclose(ext.numpy(), ref.numpy(), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("impl", SIMPLEX_IMPLS)
def test_simplex_update_non_finite_alignment_raises_and_keeps_alpha(impl):
    backend, dev = impl
    alpha = torch.full((8,), 1 / 8, dtype=torch.float32, device=dev)
    before = alpha.clone()
    a = torch.zeros(8, device=dev)
    a[2], a[5] = float("nan"), float("-inf")
    with pytest.raises(NumericalError, match=r"domain indices \[2, 5\].*left unchanged"):
        ops.simplex_update(alpha, a, eta=1.0, backend=backend)
    assert torch.equal(alpha, before)


def test_simplex_update_validation_errors():
    a2 = torch.zeros(2)
    half = torch.tensor([0.5, 0.5])
    with pytest.raises(ConfigError, match="eta=inf"):
        ops.simplex_update(half, a2, eta=float("inf"))
    with pytest.raises(ConfigError, match=r"beta=0 must be in \(0, 1\]"):
        ops.simplex_update(half, a2, eta=1.0, beta=0)
    with pytest.raises(ConfigError, match="beta=1.5"):
        ops.simplex_update(half, a2, eta=1.0, beta=1.5)
    with pytest.raises(ConfigError, match=r"floor=1 must be in \[0, 1\)"):
        ops.simplex_update(half, a2, eta=1.0, floor=1)
    with pytest.raises(ConfigError, match="alpha sums to 0.99.*alpha / alpha.sum"):
        ops.simplex_update(torch.tensor([0.49, 0.5]), a2, eta=1.0)
    with pytest.raises(ConfigError, match=r"alpha\[0\] = -0.1 is negative"):
        ops.simplex_update(torch.tensor([-0.1, 1.1]), a2, eta=1.0)
    with pytest.raises(ConfigError, match=r"alignment has shape \(3,\) but alpha has \(2,\)"):
        ops.simplex_update(half, torch.zeros(3), eta=1.0)
    with pytest.raises(ConfigError, match=r"k >= 1 weights, got shape \(0,\)"):
        ops.simplex_update(torch.zeros(0), torch.zeros(0), eta=1.0)
    with pytest.raises(ConfigError, match=r"got shape \(1, 2\)"):
        ops.simplex_update(half[None], a2[None], eta=1.0)
    # Within tolerance: accepted (float32 weights read from a file).
    ops.simplex_update(torch.tensor([0.5, 0.5000005]), a2, eta=1.0)


@pytest.mark.skipif(_EXT is None, reason=_NO_EXT)
def test_extension_imports_from_any_cwd(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import megatron_dga._C as c; print(c.has_cuda())"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
