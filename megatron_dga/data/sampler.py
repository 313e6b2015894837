"""Dynamic mixture sampler: which ``(domain_id, sample_index)`` pairs form each global batch.

This replaces megatron-core's ``BlendedDataset``, whose mixture is fixed when it is
built. Here the mixture weights can be replaced before any global batch, and every
data-parallel rank computes the same global batch without communication. No
torch.distributed. The maths (allocation bound, epochs, two-level sampling) is in
``megatron_dga/data/README.md``.

Two implementations compute the same indices bit for bit: the numpy code in this module
(the reference, and the fallback) and the C++ kernels ``sampler_*`` of the extension
``megatron_dga._C`` (``csrc/sampler_cpu.cpp``), used when it is built. The choice follows
the fused ops (``megatron_dga.ops``): ``MixtureSamplerConfig.backend``, else the
environment variable ``MEGATRON_DGA_OPS`` (``auto`` | ``extension`` | ``reference``), else
auto, with one warning per process when the extension is missing.

Pieces:

* **Composition** of a global batch of ``B`` samples: deterministic water-filling on a
  carried deficit ``c`` (:func:`allocate_counts`), the batch form of megatron's
  ``build_blending_indices`` greedy. For any sequence of weights, at every step and for
  every domain ``-1 <= sum_s B*w_i(s) - count_i <= H_k - 1`` (``H_k`` the k-th harmonic
  number), and any ``j`` domains together are at most ``j*(H_k - H_j)`` samples behind.
* **Order** inside the batch: each domain's samples are spread evenly over the batch
  (low-discrepancy keys), so every micro-batch is a representative slice.
* **Per-domain streams**: samples come in a seeded pseudo-random order without
  repetition until the domain's epoch is used up, then a new order starts. Orders are
  keyed bijections (Feistel networks with cycle walking) of ``(seed, domain, epoch)``,
  evaluated on demand: nothing is stored per domain but a consumed counter, so 262,144
  domains cost nothing until used.
* **Token limits**: a limited domain is restricted to a fixed subset of its samples (the
  first ones of a seeded order, up to its token budget), repeated epoch after epoch.
* **Two-level form**: basis matrix ``P`` (N x K) and basis weights ``gamma``; the fine
  weights ``alpha = gamma^T P`` drive the same allocation.
* **Probe and eval batches** with their own counters, never advancing the training stream.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from megatron_dga.errors import CheckpointError, ConfigError

_BACKENDS = ("auto", "extension", "reference")
# Kernels the sampler needs from megatron_dga._C; an older build may lack them.
_EXT_KERNELS = ("sampler_global_batches", "sampler_stream_samples", "sampler_permute")
_backend_module: Any = None  # megatron_dga.ops._backend once imported
_checked_ext: Any = None  # the extension module once found to have the sampler kernels

STATE_FORMAT = "megatron-dga/mixture-sampler-v1"

# Stream salts: each use of a domain's data gets its own independent keyed order.
_SALT_TRAIN = 0x7452_4149_4E00_0001
_SALT_SUBSET = 0x5355_4253_4554_0002
_SALT_PROBE = 0x5052_4F42_4500_0003
_SALT_BASIS = 0x4241_5349_5300_0004

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROUND_CONSTANTS_32 = [np.uint32(c) for c in (0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1,
                                              0x9E3779B1, 0x7FEB352D)]
_M32_1 = np.uint32(0x7FEB352D)
_M32_2 = np.uint32(0x846CA68B)
_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_SQRT2_FRAC = math.sqrt(2.0) - 1.0


# --------------------------------------------------------------------------------------
# Keyed permutations (vectorised, stateless)
# --------------------------------------------------------------------------------------
def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * _M1
        z = z ^ (z >> np.uint64(27))
        z = z * _M2
        return z ^ (z >> np.uint64(31))


def _domain_keys(seed: int, salt: int, domains: np.ndarray) -> np.ndarray:
    """64-bit key of the (seed, salt, domain) stream family, per element."""
    base = _mix64(np.array([(seed & 0xFFFFFFFFFFFFFFFF) ^ salt], dtype=np.uint64))
    return _mix64(base ^ np.asarray(domains).astype(np.uint64))


def _epoch_keys(domain_keys: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """Key of each (domain, epoch) order from the domain keys."""
    with np.errstate(over="ignore"):
        return _mix64(domain_keys + np.asarray(epochs).astype(np.uint64) * _GOLDEN)


def _stream_keys(seed: int, salt: int, domains: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """64-bit key of the (seed, salt, domain, epoch) stream, per element."""
    return _epoch_keys(_domain_keys(seed, salt, domains), epochs)


def _bit_length(values: np.ndarray) -> np.ndarray:
    """Exact bit length of non-negative int64 values below 2**53."""
    _, exponent = np.frexp(values.astype(np.float64))
    return exponent.astype(np.int64)


def keyed_permutation(x: np.ndarray, n: np.ndarray, keys: np.ndarray, rounds: int = 6) -> np.ndarray:
    """Apply, element-wise, a keyed bijection of ``[0, n)`` to ``x``.

    A mixed-radix Feistel network on ``Z_a x Z_{2^w}`` (``w = bit_length(n - 1) // 2``,
    ``a = ceil(n / 2^w)``, so the network's domain exceeds ``n`` by less than ``2^w ~
    sqrt(n)``) with a multiply-xorshift round function, made a bijection of ``[0, n)`` by
    cycle walking (re-apply while the result is ``>= n``; rare, since the excess is
    below ``1/sqrt(n)`` of the domain). Rounds alternate ``(L, R) -> (R, (L + F(R)) mod a)``
    and ``(H, L) -> (L, H xor F(L))``, each invertible. Equal keys give the same
    permutation, different keys independent-looking ones. Only wrapping uint32/uint64
    integer arithmetic is used: results are identical on every platform and numpy version.

    Args:
        x: int64 positions, ``0 <= x < n``.
        n: int64 sizes (broadcast to ``x``), ``1 <= n < 2**31``.
        keys: uint64 keys (broadcast to ``x``).
        rounds: even number of Feistel rounds.

    Returns:
        int64 array, the images of ``x``.
    """
    x = np.asarray(x, dtype=np.int64)
    shape = x.shape
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), shape).ravel()
    if n.size and int(n.max()) >= 2**31:
        raise ConfigError(f"a source has {int(n.max())} samples; the sampler supports fewer than 2**31 per domain")
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), shape).ravel()
    w = (_bit_length(n - 1) // 2).astype(np.uint32)
    one = np.uint32(1)
    mask = (one << w) - one
    nu = n.astype(np.uint32)
    modulus = (nu + mask) >> w  # a = ceil(n / 2^w) >= 1
    # Round keys: the two 32-bit halves of the 64-bit key.
    k_lo = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    k_hi = (keys >> np.uint64(32)).astype(np.uint32)
    out = x.ravel().astype(np.uint32)
    todo = None  # first pass over everything, then only over the elements still >= n
    with np.errstate(over="ignore"):
        while True:
            if todo is None:
                y, ww, m, a, lo, hi = out, w, mask, modulus, k_lo, k_hi
            else:
                y, ww, m, a = out[todo], w[todo], mask[todo], modulus[todo]
                lo, hi = k_lo[todo], k_hi[todo]
            for r in range(rounds):
                if r % 2 == 0:  # layout L * 2^w + R  ->  R * a + ((L + F(R)) mod a)
                    left, right = y >> ww, y & m
                    f = _round_function(right, lo, r)
                    f %= a
                    f += left
                    f %= a
                    y = right * a
                    y += f
                else:  # layout H * a + L  ->  L * 2^w + (H xor F(L))
                    high, low = np.divmod(y, a)
                    f = _round_function(low, hi, r)
                    f &= m
                    f ^= high
                    y = low << ww
                    y |= f
            if todo is None:
                out = y
                todo = np.flatnonzero(out >= nu)
            else:
                out[todo] = y
                todo = todo[y >= nu[todo]]
            if todo.size == 0:
                break
    return out.astype(np.int64).reshape(shape)


def _sampler_extension(backend: Optional[str]) -> Any:
    """The extension module when the sampler should use its kernels, else None (numpy).

    Shares the fused ops' selection and their once-per-process warning (``megatron_dga.ops
    ._backend``), so a missing extension is reported once for both. Imported lazily: loading
    the extension loads torch's libraries.

    Raises:
        ConfigError: ``"extension"`` was forced but the extension, or its sampler kernels,
            is not available; or an unknown backend name.
    """
    global _backend_module, _checked_ext
    _backend = _backend_module
    if _backend is None:
        from megatron_dga.ops import _backend  # noqa: PLC0415 - lazy: imports torch

        _backend_module = _backend
    mode = _backend.requested_mode(backend)
    if mode == "reference":
        return None
    ext = _backend.load_extension()
    if ext is not None and ext is _checked_ext:  # the common case, once per call: keep it cheap
        return ext
    if ext is None:
        if mode == "extension":
            raise ConfigError(
                f"the mixture sampler's kernels in megatron_dga._C were requested ({_backend.ENV_VAR}/"
                f"backend='extension') but the extension does not import ({_backend.extension_error()}); "
                f"{_backend.BUILD_HINT}"
            )
        _backend._warn_once(  # same key as the ops: one warning per process for both
            "missing",
            f"megatron_dga._C is not built ({_backend.extension_error()}); the mixture sampler and the "
            f"alignment ops fall back to their numpy/torch references, which are slower. To fix, "
            f"{_backend.BUILD_HINT}. Set {_backend.ENV_VAR}=reference to choose the references on "
            "purpose and silence this.",
        )
        return None
    if not all(hasattr(ext, name) for name in _EXT_KERNELS):
        if mode == "extension":
            raise ConfigError(
                "megatron_dga._C was built before the mixture sampler's kernels existed "
                f"({_backend.ENV_VAR}/backend='extension'); rebuild it: {_backend.BUILD_HINT}"
            )
        _backend._warn_once(
            "sampler-stale",
            "megatron_dga._C has no mixture-sampler kernels (built from older sources); the sampler "
            f"uses its numpy reference. Rebuild: {_backend.BUILD_HINT}.",
        )
        return None
    _checked_ext = ext
    return ext


def _round_function(v: np.ndarray, key: np.ndarray, r: int) -> np.ndarray:
    """32-bit multiply-xorshift hash of (v, key, round)."""
    f = v ^ key
    f += _ROUND_CONSTANTS_32[r]
    f *= _M32_1
    f ^= f >> np.uint32(15)
    f *= _M32_2
    f ^= f >> np.uint32(13)
    return f


# --------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------
def allocate_counts(deficit: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` samples over domains by water-filling the carried deficit.

    Equivalent to ``total`` times "give one sample to the domain with the largest
    remaining deficit ``deficit_i - count_i`` (lowest index on ties)", which is
    megatron's ``build_blending_indices`` rule inside one batch, computed in O(k + total):
    every domain's candidate values are ``d_i, d_i - 1, d_i - 2, ...``; we find the
    integer level ``L`` holding the ``total``-th largest value, take every value above
    ``L + 1`` and the largest fractional parts at level ``L``.

    Args:
        deficit: float64 (k,), ``carry + total * weights``; must sum to ``total``
            (up to rounding) with every entry ``>= -1``.
        total: samples to allocate (the global batch size).

    Returns:
        int64 (k,) counts, ``>= 0``, summing to ``total``.
    """
    floor = np.floor(deficit)
    frac = deficit - floor
    fl = floor.astype(np.int64)
    positive = fl[fl >= 1]
    if int(positive.sum()) < total:
        level = 0  # the usual case: values >= 1 are fewer than the batch
    else:
        # count(L) = #values >= L = sum_{fl_i >= L} (fl_i - L + 1); largest L with count(L) >= total.
        hist = np.bincount(positive)
        v = np.arange(hist.size, dtype=np.int64)
        s0 = np.cumsum(hist[::-1])[::-1]
        s1 = np.cumsum((hist * v)[::-1])[::-1]
        counts_at = s1 - (v - 1) * s0
        ok = np.flatnonzero(counts_at[1:] >= total) + 1
        level = int(ok[-1])
    counts = np.maximum(fl - level, 0)
    remaining = total - int(counts.sum())
    cand = np.flatnonzero(fl >= level)
    if remaining < 0 or remaining > cand.size:  # pragma: no cover - internal invariant
        raise AssertionError(f"allocation invariant broken: remaining={remaining}, candidates={cand.size}")
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


def harmonic(k: int) -> float:
    """H_k = 1 + 1/2 + ... + 1/k."""
    return float(np.sum(1.0 / np.arange(1, k + 1, dtype=np.float64)))


# --------------------------------------------------------------------------------------
# Config and sampler
# --------------------------------------------------------------------------------------
@dataclass
class MixtureSamplerConfig:
    """Batch geometry and seeds of :class:`DynamicMixtureSampler`."""

    global_batch_size: int
    """Samples per optimizer step over all data-parallel ranks (--global-batch-size)."""
    micro_batch_size: int
    """Samples per forward/backward on one rank (--micro-batch-size)."""
    seed: int = 1234
    """Seed of every per-domain order and of the probe streams (--seed)."""
    sequence_length: Optional[int] = None
    """Tokens per sample, for token accounting and token limits (--seq-length)."""
    token_limits: Optional[Sequence[Optional[int]]] = None
    """Per-domain token budget (None entries = unlimited). A limited domain trains on a fixed subset of
    floor(limit / sequence_length) samples, repeated epoch after epoch (the paper's token-limited regime)."""
    data_parallel_size: Optional[int] = None
    """If given, checked now: global_batch_size must be divisible by micro_batch_size * data_parallel_size."""
    backend: Optional[str] = None
    """Index kernels: "extension" (C++ in megatron_dga._C), "reference" (numpy) or "auto" (the extension
    when built). None: the environment variable MEGATRON_DGA_OPS, else auto. Both give identical batches."""

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "micro_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        if self.sequence_length is not None and (not isinstance(self.sequence_length, (int, np.integer))
                                                 or self.sequence_length < 1):
            raise ConfigError(f"--seq-length must be a positive integer, got {self.sequence_length!r}")
        if self.token_limits is not None:
            if self.sequence_length is None:
                raise ConfigError("token_limits need sequence_length (--seq-length) to convert tokens to samples")
            for i, lim in enumerate(self.token_limits):
                if lim is not None and (not isinstance(lim, (int, np.integer)) or lim < self.sequence_length):
                    raise ConfigError(
                        f"token limit of domain {i} is {lim!r}: it must be an integer >= --seq-length "
                        f"({self.sequence_length}) so that at least one sample fits, or None for no limit"
                    )
        if self.data_parallel_size is not None:
            check_batch_geometry(self.global_batch_size, self.micro_batch_size, self.data_parallel_size)
        if self.backend is not None and self.backend not in _BACKENDS:
            raise ConfigError(
                f"mixture sampler backend={self.backend!r} is not one of {', '.join(_BACKENDS)} "
                "(or None to follow MEGATRON_DGA_OPS)"
            )


def check_batch_geometry(global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Megatron's rule GBS = MBS * DP * num_micro_batches; returns num_micro_batches.

    Raises:
        ConfigError: the global batch is not a multiple of micro_batch_size * dp_size.
    """
    if not isinstance(dp_size, (int, np.integer)) or dp_size < 1:
        raise ConfigError(f"data-parallel size must be a positive integer, got {dp_size!r}")
    per_round = micro_batch_size * dp_size
    if global_batch_size % per_round:
        raise ConfigError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size {micro_batch_size} "
            f"x data-parallel size {dp_size} = {per_round}; pick a global batch size that is a multiple of {per_round}"
        )
    return global_batch_size // per_round


class DynamicMixtureSampler:
    """Deterministic global batches over k domains whose weights may change at any step.

    Args:
        domain_sizes: samples per domain in one epoch (``len`` of each domain dataset).
        config: batch geometry, seed, token limits.
        weights: initial weights (length k); default uniform.
        domain_names: names used in error messages and statistics; default ``domain{i}``.
        held_out_sizes: sizes of extra sources (e.g. the specific set) that never enter
            the training mixture but can be probed and evaluated; their ids are
            ``k, k+1, ...``.

    Every data-parallel rank builds the same sampler and calls :meth:`global_batch` once
    per step; :meth:`rank_micro_batches` then cuts out its share.
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        config: MixtureSamplerConfig,
        weights: Optional[Sequence[float]] = None,
        domain_names: Optional[Sequence[str]] = None,
        held_out_sizes: Sequence[int] = (),
    ) -> None:
        sizes = np.asarray(domain_sizes, dtype=np.int64).ravel()
        k = sizes.size
        if k == 0:
            raise ConfigError("the mixture needs at least one domain, got none")
        if np.any(sizes < 1):
            bad = int(np.flatnonzero(sizes < 1)[0])
            raise ConfigError(f"domain {bad} has {int(sizes[bad])} samples; every domain needs at least one")
        held = np.asarray(held_out_sizes, dtype=np.int64).ravel()
        if np.any(held < 1):
            raise ConfigError(f"held-out sources need at least one sample each, got sizes {held.tolist()}")
        for what, values in (("domain", sizes), ("held-out source", held)):
            if values.size and int(values.max()) >= 2**31:
                bad = int(np.argmax(values))
                raise ConfigError(
                    f"{what} {bad} has {int(values[bad])} samples; the sampler supports fewer than 2**31 "
                    "per source (split the domain into several)"
                )
        self.config = config
        self.num_domains = k
        self.domain_names = list(domain_names) if domain_names is not None else [f"domain{i}" for i in range(k)]
        if len(self.domain_names) != k:
            raise ConfigError(f"{len(self.domain_names)} domain names for {k} domains")
        # Sizes of all sources: training domains first, then held-out sources.
        self._sizes = np.concatenate([sizes, held])
        self._access = self._sizes.copy()  # samples reachable in training/probing (subset if limited)
        self._limited = np.zeros(self._sizes.size, dtype=bool)
        if config.token_limits is not None:
            if len(config.token_limits) != k:
                raise ConfigError(f"token_limits has {len(config.token_limits)} entries for {k} domains")
            for i, lim in enumerate(config.token_limits):
                if lim is not None:
                    m = min(int(sizes[i]), int(lim) // int(config.sequence_length))
                    if m < sizes[i]:
                        self._access[i] = m
                        self._limited[i] = True
        self._any_limited = bool(self._limited.any())
        self._seed = int(config.seed)
        # Per-source keys of each stream family; an order is keyed by (family key, epoch).
        all_ids = np.arange(self._sizes.size)
        self._keys = {salt: _domain_keys(self._seed, salt, all_ids) for salt in (_SALT_TRAIN, _SALT_PROBE, _SALT_SUBSET)}
        self._batch_size = int(config.global_batch_size)
        self._consumed = np.zeros(k, dtype=np.int64)
        self._reported = np.zeros(k, dtype=np.int64)
        self._carry = np.zeros(k, dtype=np.float64)
        self._batches_drawn = 0
        self._probe_consumed = np.zeros(self._sizes.size, dtype=np.int64)
        self._basis = None
        self._basis_fingerprint: Optional[str] = None
        self._basis_cdf: Dict[int, tuple] = {}
        self._basis_probe_calls: Dict[int, int] = {}
        self._gamma: Optional[np.ndarray] = None
        self._weights = np.full(k, 1.0 / k)
        if weights is not None:
            self.set_weights(weights)

    # ----------------------------------------------------------------- weights
    @property
    def weights(self) -> np.ndarray:
        """Current fine-domain weights (a copy), summing to one."""
        return self._weights.copy()

    @property
    def basis_weights(self) -> Optional[np.ndarray]:
        """Current basis weights gamma (a copy), or None when weights were set directly."""
        return None if self._gamma is None else self._gamma.copy()

    @property
    def has_basis(self) -> bool:
        """Whether a basis matrix is installed (two-level sampling available)."""
        return self._basis is not None

    @property
    def domain_sizes(self) -> np.ndarray:
        """Samples per training domain in one epoch."""
        return self._sizes[: self.num_domains].copy()

    @property
    def accessible_sizes(self) -> np.ndarray:
        """Samples each training domain may use (its token-limited subset, else all)."""
        return self._access[: self.num_domains].copy()

    def _validate_simplex(self, values: Any, length: int, what: str, names: Sequence[str]) -> np.ndarray:
        try:
            w = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a sequence of {length} numbers, got {values!r}") from None
        if w.size != length:
            raise ConfigError(f"{what} has {w.size} entries, expected {length} (one per {'basis' if what.startswith('basis') else 'domain'})")
        bad = np.flatnonzero(~np.isfinite(w))
        if bad.size:
            raise ConfigError(f"{what}: entry of {names[bad[0]]!r} is {w[bad[0]]} (must be finite)")
        bad = np.flatnonzero(w < 0)
        if bad.size:
            raise ConfigError(f"{what}: entry of {names[bad[0]]!r} is {w[bad[0]]} (must be >= 0)")
        total = w.sum()
        if not total > 0:
            raise ConfigError(f"{what}: all {length} entries are zero; give at least one positive weight")
        return w / total

    def set_weights(self, weights: Sequence[float]) -> None:
        """Replace the mixture weights; they apply from the next :meth:`global_batch`.

        Args:
            weights: k finite numbers >= 0, not all zero (normalised here).

        Raises:
            ConfigError: wrong length, NaN/Inf, a negative entry or all zeros (the message
                names the domain).
        """
        self._weights = self._validate_simplex(weights, self.num_domains, "mixture weights", self.domain_names)
        self._gamma = None

    def set_basis(self, matrix: Any, basis_names: Optional[Sequence[str]] = None) -> None:
        """Install the basis matrix P (N x K, rows on the simplex) for two-level sampling.

        Args:
            matrix: dense numpy array or scipy.sparse matrix (converted to CSR).
            basis_names: names used in error messages; default ``basis{n}``.

        Raises:
            ConfigError: wrong number of columns, negative/non-finite entries, or a row
                that does not sum to one (within 1e-6).
        """
        import scipy.sparse as sp

        if sp.issparse(matrix):
            P = sp.csr_matrix(matrix, dtype=np.float64)
            P.sum_duplicates()
            P.eliminate_zeros()
            data, rows = P.data, np.asarray(P.sum(axis=1)).ravel()
            canonical = P
        else:
            P = np.ascontiguousarray(np.asarray(matrix, dtype=np.float64))
            if P.ndim != 2:
                raise ConfigError(f"basis matrix must be 2-D (N x K), got shape {P.shape}")
            data, rows = P, P.sum(axis=1)
            canonical = sp.csr_matrix(P)
        # Fingerprint of the canonical CSR form: the same matrix hashes alike dense or sparse.
        digest = hashlib.blake2b(digest_size=16)
        for part in (canonical.indptr.astype(np.int64), canonical.indices.astype(np.int64), canonical.data):
            digest.update(np.ascontiguousarray(part).tobytes())
        n_basis, k = P.shape
        if k != self.num_domains:
            raise ConfigError(f"basis matrix has {k} columns but the mixture has {self.num_domains} domains")
        names = list(basis_names) if basis_names is not None else [f"basis{n}" for n in range(n_basis)]
        if not np.all(np.isfinite(data)) or np.any(data < 0):
            raise ConfigError("basis matrix has negative or non-finite entries; every row must be a distribution")
        bad = np.flatnonzero(np.abs(rows - 1.0) > 1e-6)
        if bad.size:
            raise ConfigError(
                f"basis row {names[bad[0]]!r} sums to {rows[bad[0]]:.8g}, not 1; normalise each row of P"
            )
        self._basis = P
        self._basis_names = names
        self._basis_fingerprint = f"{n_basis}x{k}:{digest.hexdigest()}"
        self._basis_cdf = {}
        self._gamma = None

    def set_basis_weights(self, gamma: Sequence[float]) -> None:
        """Set weights over the bases; the fine weights become ``alpha = gamma^T P``.

        Sampling then follows ``alpha`` through the same allocation, which in expectation
        equals "basis n ~ gamma, then fine domain j ~ P_n", with the variance of the
        two random draws removed (see the README).

        Raises:
            ConfigError: no basis installed, or gamma invalid (length N, finite, >= 0, sum > 0).
        """
        if self._basis is None:
            raise ConfigError("set_basis_weights needs a basis: call set_basis(P) first (--dga-basis)")
        n_basis = self._basis.shape[0]
        g = self._validate_simplex(gamma, n_basis, "basis weights", self._basis_names)
        if isinstance(self._basis, np.ndarray):
            alpha = g @ self._basis
        else:
            alpha = self._basis.T @ g
        alpha = np.maximum(np.asarray(alpha, dtype=np.float64).ravel(), 0.0)
        self._weights = alpha / alpha.sum()
        self._gamma = g

    @property
    def backend(self) -> str:
        """Which implementation computes the indices now: ``"extension"`` or ``"reference"``."""
        return "reference" if _sampler_extension(self.config.backend) is None else "extension"

    # ----------------------------------------------------------------- training stream
    def global_batch(self) -> np.ndarray:
        """Draw the next global batch with the current weights.

        Returns:
            int64 array (global_batch_size, 2) of ``(domain_id, sample_index)`` rows, in a
            deterministic mixed order. Identical on every rank given the same history.
        """
        return self.global_batches(1)[0]

    def global_batches(self, num: int) -> np.ndarray:
        """Draw the next ``num`` global batches with the current weights, vectorised.

        Exactly the same batches and final state as ``num`` calls of
        :meth:`global_batch`; use it when the weights are known to stay fixed for the
        next ``num`` steps (between two mixing updates).

        Returns:
            int64 array (num, global_batch_size, 2).
        """
        num = _positive(num, "number of global batches")
        ext = _sampler_extension(self.config.backend)
        if ext is not None:
            # Same batches, carry and counters as the numpy code below; carry and consumed are
            # updated in place (both are arrays this object owns).
            out = ext.sampler_global_batches(
                self._weights, self._carry, self._consumed, self._access, self._sizes, self._limited,
                self._keys[_SALT_TRAIN], self._keys[_SALT_SUBSET], num, self._batch_size,
                self._batches_drawn, _PHI, _SQRT2_FRAC,
            )
            self._batches_drawn += num
            return out
        B, k = self._batch_size, self.num_domains
        target = B * self._weights
        carry = self._carry
        all_counts = np.empty((num, k), dtype=np.int64)
        for t in range(num):
            deficit = carry + target
            counts = allocate_counts(deficit, B)
            carry = deficit - counts
            # Float rounding would let sum(carry) drift from 0; re-centre to keep the invariant.
            carry -= carry.sum() / k
            all_counts[t] = counts
        self._carry = carry
        bi, nz = np.nonzero(all_counts)  # row-major: batch by batch, domains ascending
        cnt = all_counts[bi, nz]
        dom = np.repeat(nz, cnt)
        starts = np.cumsum(cnt) - cnt
        rank = np.arange(num * B, dtype=np.int64) - np.repeat(starts, cnt)
        # Stream position = consumed before this call + taken by earlier batches of this call.
        before = np.cumsum(all_counts, axis=0) - all_counts
        pos = np.repeat(self._consumed[nz] + before[bi, nz], cnt) + rank
        samples = self._stream_samples(dom, pos, _SALT_TRAIN)
        self._consumed += all_counts.sum(axis=0)
        order = self._mixed_order(nz, cnt, rank, bi, self._batches_drawn)
        self._batches_drawn += num
        return np.stack([dom[order], samples[order]], axis=1).reshape(num, B, 2)

    def _stream_samples(self, dom: np.ndarray, pos: np.ndarray, salt: int) -> np.ndarray:
        """Sample index at stream position ``pos`` of each domain (epoch = pos // accessible size)."""
        ext = _sampler_extension(self.config.backend)
        if ext is not None:
            return ext.sampler_stream_samples(
                dom, pos, self._access, self._sizes, self._limited, self._keys[salt], self._keys[_SALT_SUBSET]
            )
        m = self._access[dom]
        epoch, local = np.divmod(pos, m)
        x = keyed_permutation(local, m, _epoch_keys(self._keys[salt][dom], epoch))
        if self._any_limited:
            sel = self._limited[dom]
            if sel.any():
                x[sel] = self._subset_order(dom[sel], x[sel])
        return x

    def _subset_order(self, dom: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Position ``pos`` of each source's fixed seeded order; a limited domain's subset is its first m entries."""
        keys = _epoch_keys(self._keys[_SALT_SUBSET][dom], 0 * dom)
        ext = _sampler_extension(self.config.backend)
        if ext is not None:
            return ext.sampler_permute(pos, self._sizes[dom], keys)
        return keyed_permutation(pos, self._sizes[dom], keys)

    @staticmethod
    def _mixed_order(nz: np.ndarray, cnt: np.ndarray, rank: np.ndarray, bi: np.ndarray, step: int) -> np.ndarray:
        # Sample r of a domain with n samples in its batch sits at (r + u)/n in [0, 1): each
        # domain is spread evenly, so any contiguous slice of length m holds m*n/B +- 1 of its
        # samples. The offset u (golden-ratio sequence over domains and steps) keeps domains
        # from lining up. Adding the batch index keeps batches apart in one sort.
        u = np.mod((nz + 1) * _PHI + (step + bi) * _SQRT2_FRAC, 1.0)
        key = (rank + np.repeat(u, cnt)) / np.repeat(cnt, cnt) + np.repeat(bi, cnt)
        return np.argsort(key, kind="stable")

    def rank_micro_batches(self, batch: np.ndarray, dp_rank: int, dp_size: int) -> List[np.ndarray]:
        """This rank's micro-batches of a global batch (Megatron semantics).

        Rank ``r`` takes the contiguous slice ``[r*G/D, (r+1)*G/D)`` and splits it into
        micro-batches of ``micro_batch_size``; the slices of all ranks partition the batch.

        Raises:
            ConfigError: GBS not divisible by MBS * dp_size, or dp_rank out of range.
        """
        batch = np.asarray(batch)
        num_micro = check_batch_geometry(batch.shape[0], self.config.micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        share = batch.shape[0] // dp_size
        mine = batch[dp_rank * share : (dp_rank + 1) * share]
        mbs = self.config.micro_batch_size
        return [mine[i * mbs : (i + 1) * mbs] for i in range(num_micro)]

    # ----------------------------------------------------------------- probe and eval
    def _check_source(self, domain_id: int, allow_held_out: bool = True) -> int:
        limit = self._sizes.size if allow_held_out else self.num_domains
        if not isinstance(domain_id, (int, np.integer)) or not 0 <= domain_id < limit:
            raise ConfigError(f"domain id {domain_id!r} is outside [0, {limit})")
        return int(domain_id)

    def probe_batch(self, domain_id: int, size: int) -> np.ndarray:
        """A batch from one source for gradient probes, from its own shuffled cycle.

        Draws from what training may use (a token-limited domain's subset), so probes
        see the data the model is fitting; held-out sources (ids >= k) use all samples.
        Never advances the training stream.

        Returns:
            int64 (size, 2) ``(domain_id, sample_index)`` rows.
        """
        d = self._check_source(domain_id)
        size = _positive(size, "probe batch size")
        pos = self._probe_consumed[d] + np.arange(size, dtype=np.int64)
        dom = np.full(size, d, dtype=np.int64)
        samples = self._stream_samples(dom, pos, _SALT_PROBE)
        self._probe_consumed[d] += size
        return np.stack([dom, samples], axis=1)

    def probe_batch_from_basis(self, basis: int, size: int) -> np.ndarray:
        """A batch whose fine domains follow basis row ``P_n`` (systematic sampling).

        The ``size`` points ``(u + i) / size`` are mapped through the row's CDF, so fine
        domain j gets ``floor`` or ``ceil`` of ``size * P_nj`` samples; the offset ``u``
        changes deterministically from call to call. Samples then come from each fine
        domain's probe stream. Never advances the training stream.

        Returns:
            int64 (size, 2) rows, grouped by fine domain.
        """
        if self._basis is None:
            raise ConfigError("probe_batch_from_basis needs a basis: call set_basis(P) first (--dga-basis)")
        n_basis = self._basis.shape[0]
        if not isinstance(basis, (int, np.integer)) or not 0 <= basis < n_basis:
            raise ConfigError(f"basis index {basis!r} is outside [0, {n_basis})")
        size = _positive(size, "probe batch size")
        basis = int(basis)
        if basis not in self._basis_cdf:
            if isinstance(self._basis, np.ndarray):
                cols = np.flatnonzero(self._basis[basis] > 0)
                vals = self._basis[basis, cols]
            else:
                lo, hi = self._basis.indptr[basis], self._basis.indptr[basis + 1]
                keep = self._basis.data[lo:hi] > 0
                cols = self._basis.indices[lo:hi][keep].astype(np.int64)
                vals = self._basis.data[lo:hi][keep]
                order = np.argsort(cols, kind="stable")
                cols, vals = cols[order], vals[order]
            self._basis_cdf[basis] = (cols, np.cumsum(vals))
        cols, cdf = self._basis_cdf[basis]
        call = self._basis_probe_calls.get(basis, 0)
        key = _stream_keys(self._seed, _SALT_BASIS, np.array([basis]), np.array([call]))[0]
        u = float(key >> np.uint64(11)) / float(1 << 53)
        points = (u + np.arange(size)) / size * cdf[-1]
        fine = cols[np.minimum(np.searchsorted(cdf, points, side="right"), cols.size - 1)]
        self._basis_probe_calls[basis] = call + 1
        uniq, cnt = np.unique(fine, return_counts=True)
        starts = np.cumsum(cnt) - cnt
        rank = np.arange(size, dtype=np.int64) - np.repeat(starts, cnt)
        pos = np.repeat(self._probe_consumed[uniq], cnt) + rank
        samples = self._stream_samples(fine, pos, _SALT_PROBE)
        self._probe_consumed[uniq] += cnt
        return np.stack([fine, samples], axis=1)

    def eval_batches(self, domain_id: int, num_batches: int, batch_size: int) -> List[np.ndarray]:
        """A fixed evaluation set of a source, the same on every call.

        Samples are taken from the *end* of the source's seeded subset order, so for a
        token-limited domain they lie outside the training subset (held out) as long as
        ``num_batches * batch_size <= size - subset``. For unlimited domains they are a
        fixed seeded selection that training also visits. Wraps around if more samples
        are asked than the source has.

        Returns:
            ``num_batches`` int64 arrays of shape (batch_size, 2).
        """
        d = self._check_source(domain_id)
        nb, bs = _positive(num_batches, "eval batches"), _positive(batch_size, "eval batch size")
        size = int(self._sizes[d])
        j = np.arange(nb * bs, dtype=np.int64)
        pos = (size - 1 - j) % size
        dom = np.full(j.size, d, dtype=np.int64)
        samples = self._subset_order(dom, pos)
        rows = np.stack([dom, samples], axis=1)
        return [rows[i * bs : (i + 1) * bs] for i in range(nb)]

    # ----------------------------------------------------------------- statistics
    def consumption(self, reset: bool = True) -> Dict[str, np.ndarray]:
        """Per-domain samples, tokens and epochs consumed by the training stream.

        Args:
            reset: start a new 'since last call' interval after this call.

        Returns:
            Dict of (k,) arrays: ``samples``, ``epochs`` (fractional, over the accessible
            set), ``samples_delta``, ``epochs_delta`` (since the last call with
            ``reset=True``) and, when ``sequence_length`` is set, ``tokens`` and
            ``tokens_delta``.
        """
        access = self._access[: self.num_domains].astype(np.float64)
        delta = self._consumed - self._reported
        out = {
            "samples": self._consumed.copy(),
            "epochs": self._consumed / access,
            "samples_delta": delta,
            "epochs_delta": delta / access,
        }
        if self.config.sequence_length is not None:
            out["tokens"] = self._consumed * int(self.config.sequence_length)
            out["tokens_delta"] = delta * int(self.config.sequence_length)
        if reset:
            self._reported = self._consumed.copy()
        return out

    @property
    def batches_drawn(self) -> int:
        """Global batches drawn so far."""
        return self._batches_drawn

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """JSON/pickle-friendly state (counters, carry, weights, seeds; no permutations)."""
        return {
            "format": STATE_FORMAT,
            "seed": self._seed,
            "domain_sizes": self._sizes[: self.num_domains].tolist(),
            "held_out_sizes": self._sizes[self.num_domains :].tolist(),
            "accessible_sizes": self._access.tolist(),
            "batches_drawn": self._batches_drawn,
            "consumed": _sparse(self._consumed),
            "reported": _sparse(self._reported),
            "carry": self._carry.tolist(),
            "weights": self._weights.tolist(),
            "basis_weights": None if self._gamma is None else self._gamma.tolist(),
            "basis_fingerprint": self._basis_fingerprint if self._gamma is not None else None,
            "probe_consumed": _sparse(self._probe_consumed),
            "basis_probe_calls": {str(n): c for n, c in sorted(self._basis_probe_calls.items())},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the stream then continues exactly where it was.

        A state saved in basis mode needs the same basis installed (:meth:`set_basis`) first.

        Raises:
            CheckpointError: the state was written for other domains, sizes, token limits,
                seed or basis, or is malformed.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"not a mixture-sampler state (format {state.get('format') if isinstance(state, dict) else type(state)!r}, expected {STATE_FORMAT!r})")
        checks = [
            ("seed", self._seed, state.get("seed")),
            ("domain_sizes", self._sizes[: self.num_domains].tolist(), state.get("domain_sizes")),
            ("held_out_sizes", self._sizes[self.num_domains :].tolist(), state.get("held_out_sizes")),
            ("accessible_sizes (token limits)", self._access.tolist(), state.get("accessible_sizes")),
        ]
        for what, mine, theirs in checks:
            if mine != theirs:
                shown = lambda v: v if not isinstance(v, list) or len(v) <= 8 else f"[{len(v)} values]"
                raise CheckpointError(
                    f"mixture-sampler checkpoint has {what} {shown(theirs)}, this run has {shown(mine)}; resume with the "
                    "same data, --seed and token limits"
                )
        k = self.num_domains
        try:
            consumed = _dense(state["consumed"], k)
            reported = _dense(state["reported"], k)
            probe = _dense(state["probe_consumed"], self._sizes.size)
            # Copies: the extension updates the carry in place, the caller's state must not change.
            carry = np.array(state["carry"], dtype=np.float64)
            weights = np.array(state["weights"], dtype=np.float64)
            batches = int(state["batches_drawn"])
            calls = {int(n): int(c) for n, c in state["basis_probe_calls"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"mixture-sampler checkpoint is malformed ({exc!r})") from None
        if carry.shape != (k,) or weights.shape != (k,):
            raise CheckpointError(f"mixture-sampler checkpoint carry/weights have {carry.size}/{weights.size} entries, expected {k}")
        gamma = state.get("basis_weights")
        if gamma is not None:
            if self._basis is None or state.get("basis_fingerprint") != self._basis_fingerprint:
                raise CheckpointError(
                    "mixture-sampler checkpoint was saved with basis weights over a different basis matrix "
                    f"({state.get('basis_fingerprint')}, this run: {self._basis_fingerprint}); install the same "
                    "--dga-basis with set_basis() before loading"
                )
            gamma = np.asarray(gamma, dtype=np.float64)
        self._consumed, self._reported, self._probe_consumed = consumed, reported, probe
        self._carry, self._weights, self._gamma = carry, weights, gamma
        self._batches_drawn = batches
        self._basis_probe_calls = calls


def _positive(value: Any, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _sparse(values: np.ndarray) -> Dict[str, List[int]]:
    idx = np.flatnonzero(values)
    return {"index": idx.tolist(), "value": values[idx].tolist()}


def _dense(sparse: Dict[str, List[int]], size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    idx = np.asarray(sparse["index"], dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"index out of range for {size} entries")
    out[idx] = np.asarray(sparse["value"], dtype=np.int64)
    return out
