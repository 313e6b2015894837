"""Read, write and validate the mixture-weights file and the basis file.

Both formats are fixed in ``docs/DESIGN.md``; this module is the only code that
touches them, so tools (``tools/importance_weights.py``) and the trainer
(``--mixing importance``, ``--dga-init FILE``, ``--dga-basis FILE``) agree by
construction.

Weights file (JSON)::

    {"format": "megatron-dga/weights-v1",
     "domains": ["c00", "c01", ...],
     "weights": [0.25, 0.75, ...],
     "meta": {...}}

``weights[i]`` belongs to ``domains[i]``; weights are finite, ``>= 0`` and sum to 1
within ``SIMPLEX_ATOL``. Consumers match weights to training domains BY NAME:
``load_weights(path, expected_domains=names)`` returns them in the order of
``names`` and fails, listing the missing and extra names, when the two sets differ.

Basis file (``.npz``): ``matrix`` (N x K float64, every row on the simplex),
``basis_names`` (N strings), ``domain_names`` (K strings). An optional ``meta``
entry (a JSON string, 0-d array) records provenance; readers ignore unknown keys.
A sparse basis (e.g. histograms over K = 262,144 fine domains) stores the matrix in CSR
form instead of ``matrix``: ``matrix_data`` (nnz float64), ``matrix_indices`` (nnz int64
column ids) and ``matrix_indptr`` (N + 1 int64 row pointers); the shape is (N, K) from the
names. :func:`save_basis` writes this form when given a ``scipy.sparse`` matrix, and
:func:`load_basis` then returns a ``scipy.sparse.csr_matrix`` (the sampler takes either).
Names are stored as fixed-width unicode arrays so the file loads with
``allow_pickle=False``.

Writes are atomic (temporary file in the same directory, then ``os.replace``), so
a reader never sees a half-written file even while a long run re-reads it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from megatron_dga.errors import DataError
from megatron_dga.fileio import NPZ_READ_ERRORS, NotNpzError, atomic_write, load_npz

WEIGHTS_FORMAT = "megatron-dga/weights-v1"
"""Value of the ``format`` key every weights file carries."""

SIMPLEX_ATOL = 1e-6
"""Largest accepted ``|sum(weights) - 1|`` for a weights vector or a basis row."""

_BASIS_KEYS = ("matrix", "basis_names", "domain_names")
_CSR_KEYS = ("matrix_data", "matrix_indices", "matrix_indptr")


@dataclass
class WeightsFile:
    """Contents of a weights file.

    Attributes:
        domains: Domain names, in file order.
        weights: float64 array aligned with ``domains``, on the simplex.
        meta: Free-form provenance recorded by the writer (may be empty).
    """

    domains: list[str]
    weights: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Basis:
    """Contents of a basis file.

    Attributes:
        matrix: (N, K) float64; row ``n`` is basis distribution ``P_n`` over the K
            fine domains, on the simplex. A numpy array, or a ``scipy.sparse.csr_matrix``
            when the file stores the matrix sparse.
        basis_names: N names, one per row.
        domain_names: K names, one per column.
        meta: Provenance recorded by the writer (empty when the file has none).
    """

    matrix: np.ndarray
    basis_names: list[str]
    domain_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers
def _atomic_write(path: str, write: Callable[[Any], None], binary: bool) -> None:
    """Atomic write (megatron_dga.fileio), with a clear error for a missing directory."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise DataError(f"cannot write '{path}': directory '{directory}' does not exist; create it first")
    atomic_write(path, write, binary=binary)


def _check_names(names: Sequence[Any], what: str, source: str) -> list[str]:
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n:
            raise DataError(f"{source}: {what}[{i}] is {n!r}; every name must be a non-empty string")
        out.append(n)
    if len(set(out)) != len(out):
        dups = sorted(n for n, c in Counter(out).items() if c > 1)
        raise DataError(f"{source}: duplicate {what} {dups}; each name may appear once")
    return out


def check_simplex(
    vec: np.ndarray, source: str, what: str, fix: str | None = None, error: type[Exception] = DataError
) -> None:
    """Raise ``error`` unless every row of ``vec`` (1-D: the vector) is finite, >= 0 and sums to 1.

    The one check of "weights on the simplex", for files and checkpoints alike. Vectorised
    over the rows of a basis matrix; the message names ``source``, the first bad row
    (``what`` then reads ``"<what> row i"``), the positions and a value, and ends with
    ``fix`` (default: how to repair a weights or basis file).
    """
    rows = np.atleast_2d(vec)
    label = (lambda i: what) if vec.ndim == 1 else (lambda i: f"{what} row {i}")
    repair = fix or "fix the values, or regenerate the file with tools/importance_weights.py"
    bad_rows = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if bad_rows.size:
        i = int(bad_rows[0])
        bad = np.flatnonzero(~np.isfinite(rows[i]))[:5].tolist()
        raise error(
            f"{source}: {label(i)} has non-finite entries at positions {bad} (e.g. {float(rows[i, bad[0]])!r}); "
            f"all must be finite: {repair}"
        )
    bad_rows = np.flatnonzero((rows < 0).any(axis=1))
    if bad_rows.size:
        i = int(bad_rows[0])
        bad = np.flatnonzero(rows[i] < 0)[:5].tolist()
        raise error(
            f"{source}: {label(i)} has negative entries at positions {bad} (e.g. {float(rows[i, bad[0]])!r}); "
            f"weights must be >= 0: {repair}"
        )
    totals = rows.sum(axis=1, dtype=np.float64)
    bad_rows = np.flatnonzero(np.abs(totals - 1.0) > SIMPLEX_ATOL)
    if bad_rows.size:
        i = int(bad_rows[0])
        raise error(
            f"{source}: {label(i)} sums to {float(totals[i])!r}, not 1 (tolerance {SIMPLEX_ATOL}); "
            f"{fix or 'normalise it (divide by its sum) before writing'}"
        )


def _as_float(x: float, source: str) -> float:
    """A JSON number as a float; JSON integers are unbounded and overflow a float64."""
    try:
        return float(x)
    except OverflowError:
        raise DataError(f"{source}: weight {x} is too large for a float; weights lie in [0, 1]") from None


def _reorder(file_names: list[str], expected: Iterable[str], source: str, what: str) -> np.ndarray:
    """Index array that maps ``file_names`` onto ``expected`` order, or a DataError."""
    expected = _check_names(list(expected), f"expected {what}", source)
    have, want = set(file_names), set(expected)
    if have != want:
        missing = sorted(want - have)
        extra = sorted(have - want)
        raise DataError(
            f"{source}: {what} do not match the training domains "
            f"(missing from file: {_preview(missing)}; in file but not in training: {_preview(extra)}). "
            "Weights are matched BY NAME: regenerate the file for these domains or fix the domain list"
        )
    pos = {n: i for i, n in enumerate(file_names)}
    return np.array([pos[n] for n in expected], dtype=np.int64)


def _preview(names: list[str], limit: int = 10) -> str:
    if not names:
        return "none"
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {names[:limit]}{more}"


# --------------------------------------------------------------------------- weights
def save_weights(
    path: str | os.PathLike,
    domains: Sequence[str],
    weights: Sequence[float] | np.ndarray,
    meta: dict[str, Any] | None = None,
) -> None:
    """Validate and atomically write a weights file.

    Args:
        path: Destination ``.json`` path; its directory must exist.
        domains: Unique, non-empty domain names.
        weights: One weight per domain, finite, ``>= 0``, summing to 1 within
            ``SIMPLEX_ATOL``. Written as given (not renormalised) so the file
            reproduces exactly what the caller computed.
        meta: JSON-serialisable provenance (method, inputs, smoothing, ...).

    Raises:
        DataError: On any violation of the format, naming ``path`` and the problem.
    """
    source = os.fspath(path)
    names = _check_names(list(domains), "domains", source)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != len(names):
        raise DataError(f"{source}: got {w.shape} weights for {len(names)} domains; need one weight per domain")
    check_simplex(w, source, "weights")
    doc = {"format": WEIGHTS_FORMAT, "domains": names, "weights": [float(x) for x in w], "meta": dict(meta or {})}
    try:
        text = json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: meta is not JSON-serialisable ({e}); pass plain str/number/list/dict values") from e
    _atomic_write(source, lambda f: f.write(text + "\n"), binary=False)


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read and validate a weights file, keeping the file's domain order.

    Raises:
        DataError: Missing/unparsable file, wrong ``format`` tag, length mismatch,
            negative or non-finite weights, or a sum off 1 by more than ``SIMPLEX_ATOL``.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(f"weights file '{source}' not found; create it with tools/importance_weights.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"weights file '{source}' is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(
            f"{source}: top level is {type(doc).__name__}, expected a JSON object with format/domains/weights"
        )
    tag = doc.get("format")
    if tag != WEIGHTS_FORMAT:
        raise DataError(
            f"{source}: format tag is {tag!r}, expected {WEIGHTS_FORMAT!r}; this is not a megatron-dga weights file"
        )
    for key in ("domains", "weights"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{source}: '{key}' is {type(doc.get(key)).__name__}, expected a list")
    names = _check_names(doc["domains"], "domains", source)
    raw = doc["weights"]
    if len(raw) != len(names):
        raise DataError(f"{source}: {len(raw)} weights for {len(names)} domains; the two lists must have equal length")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw):
        bad = next(x for x in raw if not isinstance(x, (int, float)) or isinstance(x, bool))
        raise DataError(f"{source}: weight {bad!r} is not a number")
    w = np.array([_as_float(x, source) for x in raw], dtype=np.float64)
    check_simplex(w, source, "weights")
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{source}: 'meta' is {type(meta).__name__}, expected an object")
    return WeightsFile(domains=names, weights=w, meta=meta)


def load_weights(path: str | os.PathLike, expected_domains: Sequence[str] | None = None) -> np.ndarray:
    """Load the weights vector, optionally reordered to match ``expected_domains``.

    Args:
        path: A weights file written by :func:`save_weights`.
        expected_domains: Training domain names. When given, the result is in this
            order, and the file must name exactly these domains.

    Returns:
        float64 array on the simplex.

    Raises:
        DataError: Invalid file (see :func:`read_weights`) or, with
            ``expected_domains``, a name mismatch listing missing and extra names.
    """
    wf = read_weights(path)
    if expected_domains is None:
        return wf.weights
    return wf.weights[_reorder(wf.domains, expected_domains, os.fspath(path), "domain names")]


# --------------------------------------------------------------------------- basis
def save_basis(
    path: str | os.PathLike,
    matrix: np.ndarray,
    basis_names: Sequence[str],
    domain_names: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> None:
    """Validate and atomically write a basis ``.npz`` file.

    Args:
        path: Destination path. Written exactly there (NumPy's automatic ``.npz``
            suffix does not apply), so name it ``*.npz`` by convention.
        matrix: (N, K) array, each row finite, ``>= 0``, summing to 1; a ``scipy.sparse``
            matrix is written in CSR form (``matrix_data``/``matrix_indices``/``matrix_indptr``).
        basis_names: N unique names (one per row).
        domain_names: K unique names (one per column).
        meta: Optional JSON-serialisable provenance, stored as the ``meta`` entry.

    Raises:
        DataError: Wrong shapes, names, or a row off the simplex.
    """
    import scipy.sparse as sp

    source = os.fspath(path)
    b_names = _check_names(list(basis_names), "basis_names", source)
    d_names = _check_names(list(domain_names), "domain_names", source)
    arrays: dict[str, np.ndarray] = {
        "basis_names": np.array(b_names, dtype=np.str_),
        "domain_names": np.array(d_names, dtype=np.str_),
    }
    if sp.issparse(matrix):
        m = sp.csr_matrix(matrix, dtype=np.float64)
        m.sum_duplicates()
        _check_csr_basis(m, len(b_names), len(d_names), source)
        arrays.update(
            matrix_data=m.data, matrix_indices=m.indices.astype(np.int64), matrix_indptr=m.indptr.astype(np.int64)
        )
    else:
        m = np.asarray(matrix, dtype=np.float64)
        _check_basis_matrix(m, len(b_names), len(d_names), source)
        arrays["matrix"] = m
    if meta:
        try:
            arrays["meta"] = np.array(json.dumps(meta, allow_nan=False), dtype=np.str_)
        except (TypeError, ValueError) as e:
            raise DataError(f"{source}: meta is not JSON-serialisable ({e})") from e
    _atomic_write(source, lambda f: np.savez(f, **arrays), binary=True)


def _check_csr_basis(m, n: int, k: int, source: str) -> None:
    """The checks of :func:`_check_basis_matrix` for a CSR matrix (structure, entries, row sums)."""
    if m.shape != (n, k) or n == 0 or k == 0:
        raise DataError(
            f"{source}: sparse matrix has shape {m.shape}, expected (N={n} basis_names, K={k} domain_names), both >= 1"
        )
    if not np.all(np.isfinite(m.data)) or np.any(m.data < 0):
        bad = np.flatnonzero(~np.isfinite(m.data) | (m.data < 0))[0]
        row = int(np.searchsorted(m.indptr, bad, side="right")) - 1
        raise DataError(
            f"{source}: matrix row {row} has entry {float(m.data[bad])!r} at position "
            f"{int(m.indices[bad])}; weights must be finite and >= 0: regenerate the file with "
            "tools/importance_weights.py"
        )
    totals = np.asarray(m.sum(axis=1)).ravel()
    bad_rows = np.flatnonzero(np.abs(totals - 1.0) > SIMPLEX_ATOL)
    if bad_rows.size:
        i = int(bad_rows[0])
        raise DataError(
            f"{source}: matrix row {i} sums to {float(totals[i])!r}, not 1 (tolerance {SIMPLEX_ATOL}); "
            "normalise it (divide by its sum) before writing"
        )


def _read_csr_basis(z, n: int, k: int, source: str):
    """The CSR members of an open basis .npz as a validated ``csr_matrix`` (N, K)."""
    import scipy.sparse as sp

    data, indices, indptr = (z[key] for key in _CSR_KEYS)
    if (
        data.ndim != 1
        or indices.shape != data.shape
        or indptr.shape != (n + 1,)
        or data.dtype.kind not in "fiu"
        or indices.dtype.kind not in "iu"
        or indptr.dtype.kind not in "iu"
    ):
        raise DataError(
            f"{source}: CSR members have shapes data {data.shape}, indices {indices.shape}, indptr "
            f"{indptr.shape} (expected equal nnz, and N + 1 = {n + 1} row pointers); rebuild the file"
        )
    if (
        indptr[0] != 0
        or indptr[-1] != data.size
        or np.any(np.diff(indptr) < 0)
        or (indices.size and (indices.min() < 0 or indices.max() >= k))
    ):
        raise DataError(
            f"{source}: CSR row pointers or column ids out of range (K = {k} domain_names); the file is "
            "damaged: rebuild it with tools/importance_weights.py --basis-sets"
        )
    m = sp.csr_matrix((data.astype(np.float64), indices.astype(np.int64), indptr.astype(np.int64)), shape=(n, k))
    _check_csr_basis(m, n, k, source)
    return m


def _check_basis_matrix(m: np.ndarray, n: int, k: int, source: str) -> None:
    if m.ndim != 2 or m.shape != (n, k):
        raise DataError(f"{source}: matrix has shape {m.shape}, expected (N={n} basis_names, K={k} domain_names)")
    if n == 0 or k == 0:
        raise DataError(f"{source}: basis needs at least one row and one column, got shape {m.shape}")
    check_simplex(m, source, "matrix")


def load_basis(path: str | os.PathLike, expected_domains: Sequence[str] | None = None) -> Basis:
    """Load and validate a basis file.

    Args:
        path: A ``.npz`` written by :func:`save_basis`.
        expected_domains: Training (fine) domain names. When given, the columns
            are reordered to this order and the names must match exactly.

    Returns:
        A :class:`Basis` with a float64 matrix (a ``csr_matrix`` when the file stores it sparse).

    Raises:
        DataError: Missing keys, wrong shapes/dtypes, rows off the simplex, or a
            domain-name mismatch listing missing and extra names.
    """
    source = os.fspath(path)
    try:
        with load_npz(source) as z:
            sparse = "matrix" not in z.files and all(k in z.files for k in _CSR_KEYS)
            missing = [k for k in _BASIS_KEYS if k not in z.files and not (sparse and k == "matrix")]
            if missing:
                raise DataError(
                    f"{source}: basis file lacks {missing} (has {sorted(z.files)}); expected keys {list(_BASIS_KEYS)}"
                )
            b_raw, d_raw = z["basis_names"], z["domain_names"]
            meta_raw = z["meta"] if "meta" in z.files else None
            for key, arr in (("basis_names", b_raw), ("domain_names", d_raw)):
                if arr.ndim != 1 or arr.dtype.kind != "U":
                    raise DataError(
                        f"{source}: '{key}' has dtype {arr.dtype} and shape {arr.shape}; expected a 1-D string array"
                    )
            b_names = _check_names(b_raw.tolist(), "basis_names", source)
            d_names = _check_names(d_raw.tolist(), "domain_names", source)
            m = _read_csr_basis(z, len(b_names), len(d_names), source) if sparse else z["matrix"]
    except FileNotFoundError:
        raise DataError(
            f"basis file '{source}' not found; build it with tools/importance_weights.py --basis-sets"
        ) from None
    except DataError:
        raise
    except NotNpzError as e:  # a text file, a .npy, a pickle
        raise DataError(
            f"{source}: cannot read as a basis .npz: {e}; give the .npz that "
            "tools/importance_weights.py --basis-output writes"
        ) from None
    except ValueError:  # an object array inside the archive (allow_pickle=False refuses it)
        raise DataError(
            f"{source}: cannot read as a basis .npz: it holds object arrays (names must be unicode "
            "arrays); rebuild it with tools/importance_weights.py --basis-output"
        ) from None
    except NPZ_READ_ERRORS as e:  # (ValueError is answered above) a truncated or damaged .npz
        raise DataError(
            f"{source}: cannot read as a basis .npz ({e}); the file is damaged: rebuild it with "
            "tools/importance_weights.py --basis-sets"
        ) from None
    if not sparse:
        if m.dtype.kind not in "fiu":
            raise DataError(f"{source}: 'matrix' has dtype {m.dtype}; expected float64")
        m = m.astype(np.float64)
        _check_basis_matrix(m, len(b_names), len(d_names), source)
    meta: dict[str, Any] = {}
    if meta_raw is not None:
        try:
            meta = json.loads(str(meta_raw))
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: 'meta' entry is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DataError(f"{source}: 'meta' entry holds a JSON {type(meta).__name__}, expected an object")
    if expected_domains is not None:
        order = _reorder(d_names, expected_domains, source, "domain_names")
        m = m[:, order].tocsr() if sparse else np.ascontiguousarray(m[:, order])
        d_names = [d_names[i] for i in order]
    return Basis(matrix=m, basis_names=b_names, domain_names=d_names, meta=meta)
