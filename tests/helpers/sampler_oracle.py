"""Numpy oracle of the mixture sampler's C++ kernels (``csrc/sampler_cpu.cpp``).

The production sampler (``megatron_dga.data.sampler``) computes its indices only in the
extension ``megatron_dga._C``. This module re-implements the four kernels it calls, with
the same names and signatures, in plain vectorised numpy written for clarity and checked
against brute force in ``tests/data/test_sampler.py``. A sampler whose ``_ext`` is replaced by
this module (:func:`use_oracle`) must give the same batches, probe and eval batches, carry
bytes and state as the real one, bit for bit; the tests drive both side by side.

Why bit-identity is reachable (see also the comment at the top of sampler_cpu.cpp):

* integers: the same wrapping uint32/uint64 operations (the kernel's exact division by
  multiplication equals ``%`` and ``//`` for 32-bit operands);
* floats: the same IEEE operations in the same order; the carry's mean uses ``np.sum``,
  whose pairwise summation the kernel replicates operation for operation;
* order: the stable argsort of the keys ``(r + u)/n + t`` over the ``T`` batches equals
  the kernel's per-batch bucket sort with ties kept in position order.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROUND_CONSTANTS_32 = [np.uint32(c) for c in (0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1, 0x9E3779B1, 0x7FEB352D)]
_M32_1 = np.uint32(0x7FEB352D)
_M32_2 = np.uint32(0x846CA68B)


def harmonic(k: int) -> float:
    """H_k = 1 + 1/2 + ... + 1/k, in float64 (the allocation bound's constant)."""
    return float(np.sum(1.0 / np.arange(1, k + 1, dtype=np.float64)))


# ------------------------------------------------------------------------ keyed permutations
def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=np.uint64)
        z = z ^ (z >> np.uint64(30))
        z = z * _M1
        z = z ^ (z >> np.uint64(27))
        z = z * _M2
        return z ^ (z >> np.uint64(31))


def epoch_keys(domain_keys: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """Key of each (domain, epoch) order: mix64(domain key + epoch * golden)."""
    with np.errstate(over="ignore"):
        return mix64(np.asarray(domain_keys, dtype=np.uint64) + np.asarray(epochs).astype(np.uint64) * _GOLDEN)


def _round_function(v: np.ndarray, key: np.ndarray, r: int) -> np.ndarray:
    """32-bit multiply-xorshift hash of (v, key, round)."""
    f = v ^ key
    f += _ROUND_CONSTANTS_32[r]
    f *= _M32_1
    f ^= f >> np.uint32(15)
    f *= _M32_2
    f ^= f >> np.uint32(13)
    return f


def keyed_permutation(x: np.ndarray, n: np.ndarray, keys: np.ndarray, rounds: int = 6) -> np.ndarray:
    """Apply, element-wise, the keyed bijection of ``[0, n)`` to ``x``.

    A mixed-radix Feistel network on ``Z_a x Z_{2^w}`` (``w = bit_length(n - 1) // 2``,
    ``a = ceil(n / 2^w)``) with cycle walking (re-apply while the result is ``>= n``).
    Even rounds ``(L, R) -> (R, (L + F(R)) mod a)``, odd rounds ``(H, L) -> (L, H xor F(L))``.

    Args:
        x: int64 positions, ``0 <= x < n``.
        n: int64 sizes (broadcast to ``x``), ``1 <= n < 2**31``.
        keys: uint64 keys (broadcast to ``x``).

    Returns:
        int64 array, the images of ``x``.
    """
    x = np.asarray(x, dtype=np.int64)
    shape = x.shape
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), shape).ravel()
    if n.size and (int(n.min()) < 1 or int(n.max()) >= 2**31):
        raise ValueError(f"permutation sizes must lie in [1, 2**31), got [{int(n.min())}, {int(n.max())}]")
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), shape).ravel()
    _, exponent = np.frexp((n - 1).astype(np.float64))  # exact bit length below 2**53
    w = (exponent.astype(np.int64) // 2).astype(np.uint32)
    one = np.uint32(1)
    mask = (one << w) - one
    nu = n.astype(np.uint32)
    modulus = (nu + mask) >> w  # a = ceil(n / 2^w) >= 1
    k_lo = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    k_hi = (keys >> np.uint64(32)).astype(np.uint32)
    out = x.ravel().astype(np.uint32)
    todo = np.arange(out.size)  # elements still to (re-)apply the network to
    with np.errstate(over="ignore"):
        while todo.size:
            y, ww, m, a = out[todo], w[todo], mask[todo], modulus[todo]
            lo, hi = k_lo[todo], k_hi[todo]
            for r in range(rounds):
                if r % 2 == 0:  # layout L * 2^w + R  ->  R * a + ((L + F(R)) mod a)
                    left, right = y >> ww, y & m
                    f = _round_function(right, lo, r) % a
                    y = right * a + (f + left) % a
                else:  # layout H * a + L  ->  L * 2^w + (H xor F(L))
                    high, low = np.divmod(y, a)
                    f = _round_function(low, hi, r) & m
                    y = (low << ww) | (f ^ high)
            out[todo] = y
            todo = todo[y >= nu[todo]]
    return out.astype(np.int64).reshape(shape)


# ------------------------------------------------------------------------ the four kernels
def sampler_permute(x: np.ndarray, n: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``_C.sampler_permute``: element-wise keyed bijection, all three arrays of one length."""
    return keyed_permutation(x, n, keys)


def sampler_allocate_counts(deficit: np.ndarray, total: int) -> np.ndarray:
    """``_C.sampler_allocate_counts``: ``total`` samples over domains by water-filling ``deficit``.

    Equals ``total`` times "one sample to the largest remaining deficit ``d_i - n_i``,
    lowest index on ties", in O(k + total): each domain's candidate values are
    ``d_i, d_i - 1, ...``; find the integer level ``L`` holding the ``total``-th largest,
    take every value ``>= L + 1``, then the largest fractional parts at level ``L``.
    """
    deficit = np.asarray(deficit, dtype=np.float64)
    floor = np.floor(deficit)
    frac = deficit - floor
    fl = floor.astype(np.int64)
    positive = fl[fl >= 1]
    level = 0  # the usual case: values >= 1 are fewer than the batch
    if int(positive.sum()) >= total:
        # count(L) = #values >= L = sum_{fl_i >= L} (fl_i - L + 1); largest L with count(L) >= total.
        hist = np.bincount(positive)
        v = np.arange(hist.size, dtype=np.int64)
        s0 = np.cumsum(hist[::-1])[::-1]
        s1 = np.cumsum((hist * v)[::-1])[::-1]
        level = int(np.flatnonzero(s1[1:] - (v[1:] - 1) * s0[1:] >= total)[-1]) + 1
    counts = np.maximum(fl - level, 0)
    remaining = total - int(counts.sum())
    cand = np.flatnonzero(fl >= level)
    assert 0 <= remaining <= cand.size, (remaining, cand.size)
    if remaining == cand.size:
        counts[cand] += 1
    elif remaining > 0:
        vals = frac[cand]
        thr = np.partition(vals, cand.size - remaining)[cand.size - remaining]
        above = cand[vals > thr]
        ties = cand[vals == thr][: remaining - above.size]  # lowest indices first
        counts[above] += 1
        counts[ties] += 1
    return counts


def sampler_stream_samples(dom, pos, access, sizes, limited, keys, subset_keys) -> np.ndarray:
    """``_C.sampler_stream_samples``: sample at stream position ``pos`` of each source ``dom``.

    Epoch ``pos // access[d]`` is permuted with key ``mix64(keys[d] + epoch * golden)``; a
    token-limited source then maps through its fixed subset order (``mix64(subset_keys[d])``
    over all ``sizes[d]`` samples).
    """
    dom, pos = np.asarray(dom, dtype=np.int64), np.asarray(pos, dtype=np.int64)
    m = np.asarray(access)[dom]
    epoch, local = np.divmod(pos, m)
    x = keyed_permutation(local, m, epoch_keys(np.asarray(keys)[dom], epoch))
    sel = np.asarray(limited)[dom]
    if sel.any():
        d = dom[sel]
        x[sel] = keyed_permutation(x[sel], np.asarray(sizes)[d], mix64(np.asarray(subset_keys)[d]))
    return x


def _mixed_order(nz, cnt, rank, bi, step, phi, sqrt2_frac) -> np.ndarray:
    """Order of the samples of ``T`` batches: stable argsort of ``(r + u)/n + t``."""
    u = np.mod((nz + 1) * phi + (step + bi) * sqrt2_frac, 1.0)
    key = (rank + np.repeat(u, cnt)) / np.repeat(cnt, cnt) + np.repeat(bi, cnt)
    return np.argsort(key, kind="stable")


def sampler_global_batches(
    weights, carry, consumed, access, sizes, limited, train_keys, subset_keys, num, batch_size, step, phi, sqrt2_frac
) -> np.ndarray:
    """``_C.sampler_global_batches``: ``num`` global batches; ``carry`` and ``consumed`` updated in place.

    Per batch: ``d = carry + B w``, ``n = allocate_counts(d, B)``, ``carry = d - n``, then
    ``carry -= mean(carry)``. Samples are the next stream positions of each served domain,
    ordered by the low-discrepancy keys.
    """
    B, k = int(batch_size), int(np.asarray(weights).size)
    target = B * np.asarray(weights, dtype=np.float64)
    all_counts = np.empty((num, k), dtype=np.int64)
    for t in range(num):
        deficit = carry + target
        counts = sampler_allocate_counts(deficit, B)
        carry[:] = deficit - counts
        carry -= carry.sum() / k
        all_counts[t] = counts
    bi, nz = np.nonzero(all_counts)  # row-major: batch by batch, domains ascending
    cnt = all_counts[bi, nz]
    dom = np.repeat(nz, cnt)
    starts = np.cumsum(cnt) - cnt
    rank = np.arange(num * B, dtype=np.int64) - np.repeat(starts, cnt)
    # Stream position = consumed before this call + taken by earlier batches of this call.
    before = np.cumsum(all_counts, axis=0) - all_counts
    pos = np.repeat(consumed[nz] + before[bi, nz], cnt) + rank
    samples = sampler_stream_samples(dom, pos, access, sizes, limited, train_keys, subset_keys)
    consumed += all_counts.sum(axis=0)
    order = _mixed_order(nz, cnt, rank, bi, step, phi, sqrt2_frac)
    return np.stack([dom[order], samples[order]], axis=1).reshape(num, B, 2)


def use_oracle(sampler):
    """Make ``sampler`` (a DynamicMixtureSampler) compute its indices with this module; returns it."""
    import sys

    sampler._ext = sys.modules[__name__]
    return sampler
