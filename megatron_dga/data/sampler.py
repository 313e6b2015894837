"""Dynamic mixture sampler: which ``(domain_id, sample_index)`` pairs form each global batch.

This replaces megatron-core's ``BlendedDataset``, whose mixture is fixed when it is
built. Here the mixture weights can be replaced before any global batch, and every
data-parallel rank computes the same global batch without communication. No
torch.distributed. The maths (allocation bound, epochs, two-level sampling) is in
``megatron_dga/data/README.md``.

One implementation computes the indices: the C++ kernels ``sampler_*`` of the extension
``megatron_dga._C`` (``csrc/sampler_cpu.cpp``). The extension is required: a sampler
cannot be built without it (a ConfigError names the build command). ``MEGATRON_DGA_OPS``,
the fused ops' switch to their torch reference, does not apply here. This module validates
inputs, keeps the weights and the state, and calls the kernels; the tests compare the
kernels bit for bit with a numpy oracle (``tests/helpers/sampler_oracle.py``).

Pieces:

* **Composition** of a global batch of ``B`` samples: deterministic water-filling on a
  carried deficit ``c``, the batch form of megatron's ``build_blending_indices`` greedy.
  For any sequence of weights, at every step and for every domain
  ``-1 <= sum_s B*w_i(s) - count_i <= H_k - 1`` (``H_k`` the k-th harmonic number), and
  any ``j`` domains together are at most ``j*(H_k - H_j)`` samples behind.
* **Order** inside the batch: each domain's samples are spread evenly over the batch
  (low-discrepancy keys), so every micro-batch is a representative slice.
* **Per-domain streams**: samples come in a seeded pseudo-random order without
  repetition until the domain's epoch is used up, then a new order starts. Orders are
  keyed bijections (Feistel networks with cycle walking) of ``(seed, domain, epoch)``,
  evaluated on demand: nothing is stored per domain but a consumed counter, so 262,144
  domains cost nothing until used.
* **Empty domains** (0 samples, e.g. empty leaves of a fine-domain clustering) are allowed
  and never sampled: the kernels only see the domains with samples, weight or basis mass on
  empty domains is dropped and the rest renormalised, and probing one is an error.
* **Token limits**: a limited domain is restricted to a fixed subset of its samples (the
  first ones of a seeded order, up to its token budget), repeated epoch after epoch.
* **Two-level form**: basis matrix ``P`` (N x K) and basis weights ``gamma``; the fine
  weights ``alpha = gamma^T P`` drive the same allocation.
* **Probe and eval batches** with their own counters, never advancing the training stream.
* **Look-ahead**: the allocation is O(k) per global batch (5 ms at k = 262,144), so from
  ``LOOKAHEAD_MIN_DOMAINS`` domains on :meth:`DynamicMixtureSampler.prefetch` computes the next
  batch in a background thread (the kernel releases the GIL) while the current step runs, on
  copies of the state; the next
  :meth:`~DynamicMixtureSampler.global_batch` takes it when nothing changed in between (weights,
  basis, loaded state) and recomputes it otherwise. The batches are the same bits either way.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from megatron_dga.errors import CheckpointError, ConfigError

STATE_FORMAT = "megatron-dga/mixture-sampler-v3"
# v1 held the domain and accessible sizes as full lists (v2: a digest); both held the weights too
# (v3: their owner, the mixing strategy, saves them and hands them back). Both load alike.
_WITH_WEIGHTS = ("megatron-dga/mixture-sampler-v1", "megatron-dga/mixture-sampler-v2")
_READABLE_FORMATS = (*_WITH_WEIGHTS, STATE_FORMAT)
# Kernels the sampler calls in megatron_dga._C; a build from older sources may lack them.
_KERNELS = ("sampler_global_batches", "sampler_stream_samples", "sampler_permute")

LOOKAHEAD_MIN_DOMAINS = 1024
"""prefetch() looks ahead from this many non-empty domains on: below, a global batch costs less than
handing it to the look-ahead thread, whose Python work also contends for the GIL with the step
(0.05 ms at 4 domains, 5 ms at 262,144: benchmarks/bench_sampler.py)."""

# Stream salts: each use of a domain's data gets its own independent keyed order.
_SALT_TRAIN = 0x7452_4149_4E00_0001
_SALT_SUBSET = 0x5355_4253_4554_0002
_SALT_PROBE = 0x5052_4F42_4500_0003
_SALT_BASIS = 0x4241_5349_5300_0004
_SALT_LABEL = 0x4C41_4245_4C00_0005

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Offsets of the in-batch order (golden-ratio and sqrt(2) sequences), passed to the kernel.
_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_SQRT2_FRAC = math.sqrt(2.0) - 1.0


# --------------------------------------------------------------------------------------
# Stream keys (O(k) once per sampler; the per-sample work is in the kernels)
# --------------------------------------------------------------------------------------
def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic; the kernels' mix64)."""
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


def _stream_keys(seed: int, salt: int, domains: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """64-bit key of the (seed, salt, domain, epoch) stream, per element."""
    with np.errstate(over="ignore"):
        return _mix64(_domain_keys(seed, salt, domains) + np.asarray(epochs).astype(np.uint64) * _GOLDEN)


def load_kernels() -> ModuleType:
    """The extension ``megatron_dga._C``, checked to carry the sampler's kernels.

    Shares the fused ops' loader (``megatron_dga.ops._backend``): the extension is imported
    once per process. Imported lazily, since loading it loads torch's libraries.

    Raises:
        ConfigError: the extension does not import, or was built from sources older than
            the sampler kernels; the message gives the build command.
    """
    from megatron_dga.ops import _backend

    ext = _backend.load_extension()
    if ext is None:
        raise ConfigError(
            "the mixture sampler computes its indices in the compiled extension megatron_dga._C, which does "
            f"not import ({_backend.extension_error()}); {_backend.BUILD_HINT}"
        )
    missing = [name for name in _KERNELS if not hasattr(ext, name)]
    if missing:
        raise ConfigError(
            f"megatron_dga._C ({getattr(ext, '__file__', 'no file')}) was built from sources older than the "
            f"mixture sampler's kernels (it lacks {', '.join(missing)}); rebuild it: {_backend.BUILD_HINT}"
        )
    return ext


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

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "micro_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        if self.sequence_length is not None and (
            not isinstance(self.sequence_length, (int, np.integer)) or self.sequence_length < 1
        ):
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


def rank_micro_batches(rows: np.ndarray, dp_rank: int, dp_size: int, micro_batch_size: int) -> List[np.ndarray]:
    """The one rule that splits rows over data-parallel ranks: rank ``r`` takes the ``r``-th of ``dp_size``
    contiguous parts (``np.array_split``: equal parts when ``dp_size`` divides the rows, as it always
    does a training batch; a probe or eval batch that it does not divide gives its first ranks one row
    more), cut into micro-batches of ``micro_batch_size`` (the last one shorter if need be)."""
    mine = np.array_split(np.asarray(rows), dp_size)[dp_rank]
    return _cut(mine, micro_batch_size)


def rank_probe_groups(
    rows: np.ndarray, dp_rank: int, dp_size: int, groups: int, micro_batch_size: int
) -> List[List[np.ndarray]]:
    """A probe batch cut into ``groups`` contiguous groups over all ranks (equal when ``groups`` divides the
    rows): this rank's share (:func:`rank_micro_batches`' rule) cut into ``groups / dp_size`` groups, each
    cut into micro-batches. Global group ``g`` is rows ``[g b/G, (g+1) b/G)`` (DGA's noise groups)."""
    mine = np.array_split(np.asarray(rows), dp_size)[dp_rank]
    return [_cut(group, micro_batch_size) for group in np.array_split(mine, max(groups // dp_size, 1))]


def _cut(rows: np.ndarray, micro_batch_size: int) -> List[np.ndarray]:
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


class DynamicMixtureSampler:
    """Deterministic global batches over k domains whose weights may change at any step.

    Args:
        domain_sizes: samples per domain in one epoch (``len`` of each domain dataset).
            A size of 0 is allowed (an empty domain, e.g. an empty leaf of a fine-domain
            map): it is never sampled or probed, and weight on it is dropped.
        config: batch geometry, seed, token limits.
        weights: initial weights (length k); default uniform over the non-empty domains.
        domain_names: names used in error messages and statistics; default ``domain{i}``.
        held_out_sizes: sizes of extra sources (e.g. the specific set) that never enter
            the training mixture but can be probed and evaluated; their ids are
            ``k, k+1, ...``.

    Raises:
        ConfigError: the extension megatron_dga._C is not built (see :func:`load_kernels`),
            or invalid sizes, names or weights.

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
        self._ext = load_kernels()  # first: without it nothing below is of use
        sizes = np.asarray(domain_sizes, dtype=np.int64).ravel()
        k = sizes.size
        if k == 0:
            raise ConfigError("the mixture needs at least one domain, got none")
        self.config = config
        self.num_domains = k
        self.domain_names = list(domain_names) if domain_names is not None else [f"domain{i}" for i in range(k)]
        if len(self.domain_names) != k:
            raise ConfigError(f"{len(self.domain_names)} domain names for {k} domains")
        if np.any(sizes < 0):
            bad = int(np.flatnonzero(sizes < 0)[0])
            raise ConfigError(f"domain {self.domain_names[bad]!r} has {int(sizes[bad])} samples; sizes must be >= 0")
        # The training domains with samples: the kernels see only these (ids mapped back).
        self._live = np.flatnonzero(sizes > 0)
        if self._live.size == 0:
            raise ConfigError(
                f"all {k} training domains are empty (0 samples each); the mixture needs at least one domain "
                "with samples (check --data-path / the domain map)"
            )
        self._is_empty = sizes == 0
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
        # Sizes of all sources: training domains first, then held-out sources.
        self._sizes = np.concatenate([sizes, held])
        self._access = self._sizes.copy()  # samples reachable in training/probing (subset if limited)
        self._limited = np.zeros(self._sizes.size, dtype=bool)
        if config.token_limits is not None:
            if len(config.token_limits) != k:
                raise ConfigError(f"token_limits has {len(config.token_limits)} entries for {k} domains")
            for i, lim in enumerate(config.token_limits):
                if lim is not None:  # an empty domain keeps accessible size 0, unlimited
                    m = min(int(sizes[i]), int(lim) // int(config.sequence_length))
                    if m < sizes[i]:
                        self._access[i] = m
                        self._limited[i] = True
        self._seed = int(config.seed)
        # Per-source keys of each stream family; an order is keyed by (family key, epoch).
        all_ids = np.arange(self._sizes.size)
        self._keys = {
            salt: _domain_keys(self._seed, salt, all_ids) for salt in (_SALT_TRAIN, _SALT_PROBE, _SALT_SUBSET)
        }
        # The training kernel's per-domain arrays, over the non-empty domains only.
        self._kernel_domains = tuple(
            np.ascontiguousarray(a[self._live])
            for a in (self._access, self._sizes, self._limited, self._keys[_SALT_TRAIN], self._keys[_SALT_SUBSET])
        )
        self._batch_size = int(config.global_batch_size)
        # Training-stream state over the non-empty domains (compact: the kernel updates it in place).
        self._consumed = np.zeros(self._live.size, dtype=np.int64)
        self._reported = np.zeros(self._live.size, dtype=np.int64)
        self._carry = np.zeros(self._live.size, dtype=np.float64)
        self._batches_drawn = 0
        self._ahead: Optional[_LookAhead] = None
        self._worker = None  # one long-lived thread for the look-ahead, started at the first prefetch()
        self.lookahead_hits = 0
        """Global batches served from :meth:`prefetch` (the rest were computed when asked for)."""
        self._probe_consumed = np.zeros(self._sizes.size, dtype=np.int64)  # every source, by id
        self._basis = None
        self._basis_fingerprint: Optional[str] = None
        self._basis_cdf: Dict[int, tuple] = {}
        self._basis_probe_calls: Dict[int, int] = {}
        uniform = np.zeros(k)
        uniform[self._live] = 1.0 / self._live.size
        self._install_weights(uniform, None)
        if weights is not None:
            self.set_weights(weights)

    # ----------------------------------------------------------------- weights
    @property
    def weights(self) -> np.ndarray:
        """Current fine-domain weights (a copy), summing to one, 0 on empty domains."""
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

    @property
    def empty_domains(self) -> np.ndarray:
        """Ids of the training domains with no samples (never sampled or probed)."""
        return np.flatnonzero(self._is_empty)

    def _validate_simplex(self, values: Any, length: int, what: str, names: Sequence[str]) -> np.ndarray:
        try:
            w = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a sequence of {length} numbers, got {values!r}") from None
        if w.size != length:
            raise ConfigError(
                f"{what} has {w.size} entries, expected {length} (one per {'basis' if what.startswith('basis') else 'domain'})"
            )
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

    def _empty_names(self, ids: np.ndarray) -> str:
        shown = ", ".join(repr(self.domain_names[i]) for i in ids[:5])
        return shown + (f" and {ids.size - 5} more" if ids.size > 5 else "")

    def _drop_empty(self, w: np.ndarray, what: str) -> np.ndarray:
        """``w`` (normalised, k entries) with the mass on empty domains dropped and the rest renormalised.

        Raises:
            ConfigError: all of the mass is on empty domains (named).
        """
        if self._live.size == self.num_domains:
            return w
        dropped = np.flatnonzero(self._is_empty & (w > 0))
        if dropped.size == 0:
            return w
        w = w.copy()
        w[dropped] = 0.0
        total = w.sum()
        if not total > 0:
            raise ConfigError(
                f"{what} put all their mass on empty domains ({self._empty_names(dropped)}: 0 samples each), "
                f"which are never sampled; give positive weight to at least one of the {self._live.size} "
                "domains with samples"
            )
        return w / total

    def _install_weights(self, weights: np.ndarray, gamma: Optional[np.ndarray]) -> None:
        """Current weights (k entries, 0 on empty domains) and the kernel's copy over non-empty ones."""
        self._weights = weights
        compact = self._live.size < self.num_domains
        self._live_weights = np.ascontiguousarray(weights[self._live]) if compact else weights
        self._gamma = gamma

    def set_weights(self, weights: Sequence[float]) -> None:
        """Replace the mixture weights; they apply from the next :meth:`global_batch`.

        Args:
            weights: k finite numbers >= 0, not all zero (normalised here). Weight on
                empty domains is dropped and the rest renormalised.

        Raises:
            ConfigError: wrong length, NaN/Inf, a negative entry, all zeros, or all the
                weight on empty domains (the message names the domain).
        """
        w = self._validate_simplex(weights, self.num_domains, "mixture weights", self.domain_names)
        self._install_weights(self._drop_empty(w, "mixture weights"), None)

    def set_basis(self, matrix: Any, basis_names: Optional[Sequence[str]] = None) -> None:
        """Install the basis matrix P (N x K, rows on the simplex) for two-level sampling.

        Each row's mass on empty domains is dropped and the row renormalised, so a basis
        distribution is "P_n restricted to the domains with samples", for training and probes.

        Args:
            matrix: dense numpy array or scipy.sparse matrix (converted to CSR).
            basis_names: names used in error messages; default ``basis{n}``.

        Raises:
            ConfigError: wrong number of columns, negative/non-finite entries, a row that
                does not sum to one (within 1e-6), or a row whose mass is all on empty domains.
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
            raise ConfigError(f"basis row {names[bad[0]]!r} sums to {rows[bad[0]]:.8g}, not 1; normalise each row of P")
        self._basis = self._basis_without_empty_domains(P, names)
        self._basis_names = names
        self._basis_fingerprint = f"{n_basis}x{k}:{digest.hexdigest()}"
        self._basis_cdf = {}
        self._gamma = None

    def _basis_without_empty_domains(self, P: Any, names: Sequence[str]) -> Any:
        """``P`` with each row's mass on empty domains dropped and the row renormalised.

        Rows without such mass are kept bit for bit (and ``P`` itself when no row has any).

        Raises:
            ConfigError: a row has all of its mass on empty domains (named).
        """
        if self._live.size == self.num_domains:
            return P
        empty = self._is_empty
        if isinstance(P, np.ndarray):
            lost = P[:, empty].sum(axis=1)
            if not lost.any():
                return P
            kept = np.where(empty[None, :], 0.0, P)
        else:  # CSR: drop the stored entries in empty columns
            in_empty = empty[P.indices]
            row_of = np.repeat(np.arange(P.shape[0]), np.diff(P.indptr))
            lost = np.bincount(row_of[in_empty], weights=P.data[in_empty], minlength=P.shape[0])
            if not lost.any():
                return P
            kept = P.copy()
            kept.data[in_empty] = 0.0
            kept.eliminate_zeros()
        remaining = np.asarray(kept.sum(axis=1)).ravel()
        dead = np.flatnonzero(remaining <= 0)
        if dead.size:
            raise ConfigError(
                f"basis row {names[dead[0]]!r} has all its mass on empty domains (0 samples), which are never "
                "sampled; drop that row from the basis or give it mass on domains with samples"
            )
        scale = np.where(lost > 0, 1.0 / remaining, 1.0)
        if isinstance(kept, np.ndarray):
            kept *= scale[:, None]
        else:
            kept.data *= np.repeat(scale, np.diff(kept.indptr))
        return kept

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
        self._install_weights(alpha / alpha.sum(), g)

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
        ahead = self._take_lookahead()
        if num == 1 and ahead is not None:
            out, self._carry, self._consumed = ahead  # domain ids already mapped
            self.lookahead_hits += 1
        else:
            # Allocation, carry update, stream positions, permutations and the in-batch order of
            # all num batches in one call; carry and consumed (arrays this object owns) are
            # updated in place. The kernel numbers the non-empty domains 0..k'-1.
            out = self._ext.sampler_global_batches(
                self._live_weights,
                self._carry,
                self._consumed,
                *self._kernel_domains,
                num,
                self._batch_size,
                self._batches_drawn,
                _PHI,
                _SQRT2_FRAC,
            )
            if self._live.size < self.num_domains:
                out[..., 0] = self._live[out[..., 0]]
        self._batches_drawn += num
        return out

    def prefetch(self) -> None:
        """Start computing the next global batch in a background thread (off the step's critical path).

        The next :meth:`global_batch` takes it if the sampler's state is the one it started from
        (no weight, basis or state change in between; a change makes that call compute the batch
        itself), so the batches are exactly those without look-ahead. The thread works on copies
        of the carry and the counters; nothing of this object changes until the batch is taken.
        Below ``LOOKAHEAD_MIN_DOMAINS`` non-empty domains it does nothing.
        """
        if self._ahead is None and self._live.size >= LOOKAHEAD_MIN_DOMAINS:
            if self._worker is None:
                from concurrent.futures import ThreadPoolExecutor

                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mixture-sampler-lookahead")
            live = self._live if self._live.size < self.num_domains else None
            self._ahead = _LookAhead(
                self._worker,
                self._ext,
                self._live_weights,
                self._carry,
                self._consumed,
                self._kernel_domains,
                self._batch_size,
                self._batches_drawn,
                live,
            )

    def _take_lookahead(self) -> Optional[tuple]:
        """The prefetched (batch, carry, consumed) when it was computed from the current state, else None."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        return ahead.result(self._live_weights, self._carry, self._consumed, self._batches_drawn)

    def _stream_samples(self, dom: np.ndarray, pos: np.ndarray, salt: int) -> np.ndarray:
        """Sample index at stream position ``pos`` of each source (epoch = pos // accessible size)."""
        return self._ext.sampler_stream_samples(
            dom, pos, self._access, self._sizes, self._limited, self._keys[salt], self._keys[_SALT_SUBSET]
        )

    def _subset_order(self, dom: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Position ``pos`` of each source's fixed seeded order; a limited domain's subset is its first m entries."""
        return self._ext.sampler_permute(pos, self._sizes[dom], _mix64(self._keys[_SALT_SUBSET][dom]))

    def rank_micro_batches(self, batch: np.ndarray, dp_rank: int, dp_size: int) -> List[np.ndarray]:
        """This rank's micro-batches of a global batch (Megatron semantics).

        Rank ``r`` takes the contiguous slice ``[r*G/D, (r+1)*G/D)`` and splits it into
        micro-batches of ``micro_batch_size``; the slices of all ranks partition the batch.

        Raises:
            ConfigError: GBS not divisible by MBS * dp_size, or dp_rank out of range.
        """
        batch = np.asarray(batch)
        check_batch_geometry(batch.shape[0], self.config.micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        return rank_micro_batches(batch, dp_rank, dp_size, self.config.micro_batch_size)

    # ----------------------------------------------------------------- probe and eval
    def _check_source(self, domain_id: int, purpose: str) -> int:
        limit = self._sizes.size
        if not isinstance(domain_id, (int, np.integer)) or not 0 <= domain_id < limit:
            raise ConfigError(f"domain id {domain_id!r} is outside [0, {limit})")
        d = int(domain_id)
        if d < self.num_domains and self._is_empty[d]:
            raise ConfigError(f"domain {self.domain_names[d]!r} (id {d}) is empty (0 samples); it cannot be {purpose}")
        return d

    def probe_batch(self, domain_id: int, size: int) -> np.ndarray:
        """A batch from one source for gradient probes, from its own shuffled cycle.

        Draws from what training may use (a token-limited domain's subset), so probes
        see the data the model is fitting; held-out sources (ids >= k) use all samples.
        Never advances the training stream.

        Returns:
            int64 (size, 2) ``(domain_id, sample_index)`` rows.

        Raises:
            ConfigError: an id out of range, or an empty domain.
        """
        d = self._check_source(domain_id, "probed")
        size = _positive(size, "probe batch size")
        pos = self._probe_consumed[d] + np.arange(size, dtype=np.int64)
        dom = np.full(size, d, dtype=np.int64)
        samples = self._stream_samples(dom, pos, _SALT_PROBE)
        self._probe_consumed[d] += size
        return np.stack([dom, samples], axis=1)

    def basis_labels(self, batch: np.ndarray) -> np.ndarray:
        """A basis index per row of the global batch just drawn, from P(n | j) = gamma_n P_nj / alpha_j.

        The rows' fine domains j follow alpha = gamma^T P (the current basis weights); labelled so, the pair
        (n, j) follows "n ~ gamma, then j ~ P_n", and the rows labelled n are draws from P_n (DGA's in-step
        estimator over bases groups micro-batches by them). Deterministic in (seed, batches drawn): the
        same on every rank and after a resume.
        """
        if self._basis is None or self._gamma is None:
            raise ConfigError("basis_labels needs basis weights: call set_basis(P) and set_basis_weights first")
        domains = np.asarray(batch)[:, 0]
        uniq, inverse = np.unique(domains, return_inverse=True)
        columns = self._basis[:, uniq]
        columns = columns.toarray() if hasattr(columns, "toarray") else np.asarray(columns)
        cdf = np.cumsum(self._gamma[:, None] * columns, axis=0)  # N x unique domains
        cdf /= cdf[-1]
        key = _stream_keys(self._seed, _SALT_LABEL, np.array([0]), np.array([self._batches_drawn]))[0]
        u = np.random.default_rng(int(key)).random(domains.size)
        # The first n whose cumulative posterior exceeds u: one N x rows comparison, no loop over domains.
        labels = (cdf[:, inverse] <= u[None, :]).sum(axis=0)
        return np.minimum(labels, cdf.shape[0] - 1).astype(np.int64)

    def probe_batch_from_basis(self, basis: int, size: int) -> np.ndarray:
        """A batch whose fine domains follow basis row ``P_n`` (systematic sampling).

        The ``size`` points ``(u + i) / size`` are mapped through the row's CDF, so fine
        domain j gets ``floor`` or ``ceil`` of ``size * P_nj`` samples; the offset ``u``
        changes deterministically from call to call. Samples then come from each fine
        domain's probe stream. Never advances the training stream. Empty domains hold
        no mass in the installed rows, so they are never picked.

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

        Raises:
            ConfigError: an id out of range, or an empty domain.
        """
        d = self._check_source(domain_id, "evaluated")
        nb, bs = _positive(num_batches, "eval batches"), _positive(batch_size, "eval batch size")
        size = int(self._sizes[d])
        j = np.arange(nb * bs, dtype=np.int64)
        pos = (size - 1 - j) % size
        dom = np.full(j.size, d, dtype=np.int64)
        samples = self._subset_order(dom, pos)
        rows = np.stack([dom, samples], axis=1)
        return [rows[i * bs : (i + 1) * bs] for i in range(nb)]

    # ----------------------------------------------------------------- statistics
    def _per_domain(self, values: np.ndarray) -> np.ndarray:
        """Values held over the non-empty domains, as k entries (0 on empty domains)."""
        out = np.zeros(self.num_domains, dtype=values.dtype)
        out[self._live] = values
        return out

    def consumption(self, reset: bool = True) -> Dict[str, np.ndarray]:
        """Per-domain samples, tokens and epochs consumed by the training stream.

        Args:
            reset: start a new 'since last call' interval after this call.

        Returns:
            Dict of (k,) arrays: ``samples``, ``epochs`` (fractional, over the accessible
            set; 0 for empty domains), ``samples_delta``, ``epochs_delta`` (since the last
            call with ``reset=True``) and, when ``sequence_length`` is set, ``tokens`` and
            ``tokens_delta``.
        """
        access = self._access[self._live].astype(np.float64)  # over the non-empty domains, like the counters
        delta = self._consumed - self._reported
        samples, samples_delta = self._per_domain(self._consumed), self._per_domain(delta)
        out = {
            "samples": samples,
            "epochs": self._per_domain(self._consumed / access),
            "samples_delta": samples_delta,
            "epochs_delta": self._per_domain(delta / access),
        }
        if self.config.sequence_length is not None:
            out["tokens"] = samples * int(self.config.sequence_length)
            out["tokens_delta"] = samples_delta * int(self.config.sequence_length)
        if reset:
            self._reported = self._consumed.copy()
        return out

    @property
    def batches_drawn(self) -> int:
        """Global batches drawn so far."""
        return self._batches_drawn

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """JSON/pickle-friendly state (counters, carry, seeds; no permutations, no weights).

        Small at any k: counters are sparse (ids and values of the non-zero ones), sizes
        are kept as a digest; the carry is k floats (0 on empty domains). The weights are not
        part of it: whoever sets them (the trainer's mixing strategy) saves them and sets them
        again on resume (:meth:`set_weights` / :meth:`set_basis_weights`, before or after
        :meth:`load_state_dict`). The installed basis is recorded by its fingerprint.
        """
        k = self.num_domains
        return {
            "format": STATE_FORMAT,
            "seed": self._seed,
            "domain_sizes": _sizes_digest(self._sizes[:k]),
            "held_out_sizes": self._sizes[k:].tolist(),
            "accessible_sizes": _sizes_digest(self._access),
            "batches_drawn": self._batches_drawn,
            "consumed": _sparse(self._consumed, self._live),
            "reported": _sparse(self._reported, self._live),
            "carry": self._per_domain(self._carry).tolist(),
            "basis_fingerprint": self._basis_fingerprint if self._basis is not None else None,
            "probe_consumed": _sparse(self._probe_consumed, np.arange(self._sizes.size)),
            "basis_probe_calls": {str(n): c for n, c in sorted(self._basis_probe_calls.items())},
        }

    def check_state(
        self,
        state: Any,
        where: str = "mixture-sampler state",
        fix: str = "load a state this sampler saved",
        weights_fix: Optional[str] = None,
    ) -> None:
        """CheckpointError naming ``where``, the entry and ``fix``, unless ``state``'s numbers are usable:
        counters integers >= 0, the carry k finite numbers; in a v1/v2 state (which held the weights)
        the weights on the simplex, checked when ``weights_fix`` is given (None: they will be replaced).
        The identity checks (seed, sizes, token limits, basis) are :meth:`load_state_dict`'s."""
        from megatron_dga.state_checks import check_count, check_sparse_counts, check_vector, state_error

        if not isinstance(state, dict):
            raise state_error(where, f"the sampler state is {type(state).__name__}, not a dict", fix)
        k = self.num_domains
        check_count(state.get("batches_drawn"), "sampler batches_drawn", where, fix)
        check_vector(state.get("carry"), k, "sampler carry", where, fix)
        for key in ("consumed", "reported", "probe_consumed"):
            check_sparse_counts(state.get(key), f"sampler {key}", where, fix)
        if weights_fix is not None and state.get("format") in _WITH_WEIGHTS:
            check_vector(state.get("weights"), k, "sampler weights", where, weights_fix, simplex=True)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the stream then continues exactly where it was, with the
        weights set by their owner (a v1/v2 state, which held them, installs its own).

        A state saved with a basis needs the same basis installed (:meth:`set_basis`) first.

        Raises:
            CheckpointError: the state was written for other domains, sizes, token limits,
                seed or basis, or is malformed.
        """
        fmt = state.get("format") if isinstance(state, dict) else type(state)
        if fmt not in _READABLE_FORMATS:
            raise CheckpointError(f"not a mixture-sampler state (format {fmt!r}, expected {STATE_FORMAT!r})")
        k = self.num_domains

        def sizes_id(value: Any) -> Any:  # v1 states hold the full lists
            return _sizes_digest(np.asarray(value, dtype=np.int64)) if isinstance(value, list) else value

        checks = [
            ("seed", self._seed, state.get("seed")),
            ("domain_sizes", _sizes_digest(self._sizes[:k]), sizes_id(state.get("domain_sizes"))),
            ("held_out_sizes", self._sizes[k:].tolist(), state.get("held_out_sizes")),
            ("accessible_sizes (token limits)", _sizes_digest(self._access), sizes_id(state.get("accessible_sizes"))),
        ]
        for what, mine, theirs in checks:
            if mine != theirs:
                raise CheckpointError(
                    f"mixture-sampler checkpoint has {what} {theirs}, this run has {mine}; resume with the "
                    "same data, --seed and token limits"
                )
        with_weights = fmt in _WITH_WEIGHTS
        try:
            consumed = _dense(state["consumed"], k)
            reported = _dense(state["reported"], k)
            probe = _dense(state["probe_consumed"], self._sizes.size)
            carry = np.array(state["carry"], dtype=np.float64)
            weights = np.array(state["weights"], dtype=np.float64) if with_weights else np.zeros(k)
            batches = int(state["batches_drawn"])
            calls = {int(n): int(c) for n, c in state["basis_probe_calls"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"mixture-sampler checkpoint is malformed ({exc!r})") from None
        if carry.shape != (k,) or weights.shape != (k,):
            raise CheckpointError(
                f"mixture-sampler checkpoint carry/weights have {carry.size}/{weights.size} entries, expected {k}"
            )
        empty = self._is_empty
        on_empty = [
            name
            for name, v in (
                ("consumed", consumed),
                ("reported", reported),
                ("probe_consumed", probe[:k]),
                ("carry", carry),
                ("weights", weights),
            )
            if np.any(v[empty] != 0)
        ]
        if on_empty:
            raise CheckpointError(
                f"mixture-sampler checkpoint has non-zero {', '.join(on_empty)} on empty domains, which are never "
                "sampled: the state is damaged; resume from an earlier checkpoint"
            )
        gamma = state.get("basis_weights") if with_weights else None
        saved_basis = gamma is not None if with_weights else state.get("basis_fingerprint") is not None
        if saved_basis and (self._basis is None or state.get("basis_fingerprint") != self._basis_fingerprint):
            raise CheckpointError(
                "mixture-sampler checkpoint was saved with a different basis matrix "
                f"({state.get('basis_fingerprint')}, this run: {self._basis_fingerprint}); install the same "
                "--dga-basis with set_basis() before loading"
            )
        live = self._live
        # Fresh arrays (fancy indexing copies): the kernel updates carry and consumed in place.
        self._consumed, self._reported, self._carry = consumed[live], reported[live], carry[live]
        self._probe_consumed = probe
        if with_weights:
            self._install_weights(weights, None if gamma is None else np.asarray(gamma, dtype=np.float64))
        self._batches_drawn = batches
        self._basis_probe_calls = calls


class _LookAhead:
    """One global batch computed in a background thread from a snapshot of the sampler's state.

    The snapshot holds the state's arrays themselves: the sampler replaces them (new weights, a
    loaded state) rather than writing into them, except in the kernel call of
    :meth:`DynamicMixtureSampler.global_batches`, which first takes (joins) this look-ahead. So the
    state is unchanged exactly when the same objects and the same batch count are current.
    """

    def __init__(
        self, worker, ext, weights, carry, consumed, domains, batch_size: int, drawn: int, live: Optional[np.ndarray]
    ) -> None:
        self._inputs = (weights, carry, consumed, drawn)

        def work():
            c, n = carry.copy(), consumed.copy()
            batch = ext.sampler_global_batches(weights, c, n, *domains, 1, batch_size, drawn, _PHI, _SQRT2_FRAC)
            if live is not None:  # the kernel numbers the non-empty domains 0..k'-1
                batch[..., 0] = live[batch[..., 0]]
            return batch, c, n

        self._future = worker.submit(work)

    def result(self, weights, carry, consumed, drawn: int) -> Optional[tuple]:
        # A failure is not raised here: the synchronous call that follows recomputes the batch and raises it.
        error = self._future.exception()
        w, c, n, d = self._inputs
        if error is not None or not (w is weights and c is carry and n is consumed and d == drawn):
            return None
        return self._future.result()


def _positive(value: Any, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _sizes_digest(sizes: np.ndarray) -> str:
    """Identity of a size vector for checkpoints: count, total and a hash (k ints would make the state big)."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    digest = hashlib.blake2b(sizes.astype("<i8").tobytes(), digest_size=12).hexdigest()
    return f"{sizes.size} entries, {int(sizes.sum())} samples, blake2b {digest}"


def _sparse(values: np.ndarray, ids: np.ndarray) -> Dict[str, List[int]]:
    """The non-zero entries of ``values`` as ``{"index": ids[...], "value": [...]}``."""
    idx = np.flatnonzero(values)
    return {"index": ids[idx].tolist(), "value": values[idx].tolist()}


def _dense(sparse: Dict[str, List[int]], size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    idx = np.asarray(sparse["index"], dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"index out of range for {size} entries")
    out[idx] = np.asarray(sparse["value"], dtype=np.int64)
    return out
