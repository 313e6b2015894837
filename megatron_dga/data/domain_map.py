"""Fine-domain maps: the fine-domain id of every document of ordinary Megatron shards.

A corpus clustered into hundreds of thousands of fine domains cannot live in one shard per
domain (file descriptors, megatron's BlendedDataset limit, start-up time). A *domain map*
keeps the shards as they are and records, for every document of every shard, the id of
its fine domain, plus the shards' identities so a map is never applied to other data.

File format (``megatron-dga/domain-map-v1``): an uncompressed numpy ``.npz`` that
``np.load(path, allow_pickle=False)`` reads, with two members:

* ``header``: a 0-d unicode array holding one JSON object::

      {"format": "megatron-dga/domain-map-v1",
       "levels": [64, 64, 64],                   # [K] flat, or any depth; K = prod(levels)
       "names": null,                            # or K explicit names (labelled domains)
       "shards": [{"name": "part0_text_document", "num_documents": 1000,
                   "num_tokens": 250000, "idx_sha256": "<64 hex>"}, ...],
       "clusters_dir": "clusters" | null,        # relative to the map file
       "metadata": {...}}                        # provenance, free-form

* ``domain_ids``: int32 ``(total documents,)``, the fine id of every document, shards
  concatenated in ``shards`` order, values in ``[0, K)``. A hierarchical id is row-major over
  the levels: ``((c1 * k2) + c2) * k3 + c3``.

Written by ``tools/cluster_domains.py --input-shards ... --output-map FILE``; read by the
trainer (``--domain-map FILE`` next to ``--data-path``) and ``tools/importance_weights.py``.
Nothing here builds per-domain Python objects: names are derived on demand, so a map of
262,144 domains over a million documents reads in milliseconds.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from megatron_dga.errors import DataError
from megatron_dga.fileio import NPZ_READ_ERRORS, load_npz, sha256_files

MAP_FORMAT = "megatron-dga/domain-map-v1"
"""The ``format`` string of the header; any other value is refused."""

_MAX_DOMAINS = 2**31 - 1  # ids are int32
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_REBUILD = "rebuild the map with tools/cluster_domains.py --input-shards PREFIX [PREFIX ...] --output-map FILE"


@dataclass
class MapShard:
    """The identity of one shard a map was built for."""

    name: str
    """Basename of the shard prefix, e.g. ``part0_text_document``; shards are matched by it."""
    num_documents: int
    """Documents in the shard (its ``.idx`` document count)."""
    num_tokens: int
    """Tokens in the shard's ``.bin``."""
    idx_sha256: str
    """SHA-256 (hex) of the ``.idx`` file: the shard's identity. A foreign or rebuilt shard is refused."""


def shard_identity(prefix: str) -> MapShard:
    """Validate the shard at ``prefix`` (``domains.inspect_shard``) and return its identity.

    Raises:
        DataError: the shard is missing or corrupt (the message names the file).
    """
    from megatron_dga.data.domains import inspect_shard

    info = inspect_shard(prefix)
    return MapShard(
        name=_basename(prefix),
        num_documents=int(info.num_documents),
        num_tokens=int(info.num_tokens),
        idx_sha256=sha256_files(prefix + ".idx"),
    )


def _digits(j: int, levels: Sequence[int]) -> List[int]:
    """Row-major digits of ``j`` over ``levels``: ``j = ((d1 * k2) + d2) * k3 + d3``."""
    digits = []
    for k in reversed(levels):
        j, d = divmod(j, int(k))
        digits.append(d)
    return digits[::-1]


def _basename(prefix: str) -> str:
    return os.path.basename(os.path.normpath(prefix))


@dataclass
class DomainMap:
    """Fine-domain ids of every document of a list of shards (see the module docstring)."""

    domain_ids: np.ndarray
    """int32 ``(total documents,)``: the fine-domain id of every document, shards concatenated in
    ``shards`` order; values in ``[0, num_domains)``."""
    shards: List[MapShard]
    """The shards, in the order their documents appear in ``domain_ids``."""
    levels: List[int]
    """``[K]`` for a flat map, ``[k1, k2, ...]`` (any depth) for a hierarchical one; K = prod(levels)."""
    names: Optional[List[str]] = None
    """Explicit domain names (labelled domains), K of them; None derives them from the levels
    like tools/cluster_domains.py names its jsonl domains: ``c03`` flat, ``c03_05_01`` hierarchical."""
    clusters_dir: Optional[str] = None
    """Directory (relative to the map file) with the centroids per level and the embedder state
    written by tools/cluster_domains.py, to assign new documents; None for labelled maps."""
    metadata: Dict[str, Any] = field(default_factory=dict)
    """Provenance: tool, embedding, seed, number of clusters, time, ... (JSON-serialisable)."""

    @property
    def num_domains(self) -> int:
        """K = prod(levels)."""
        return int(math.prod(int(k) for k in self.levels))

    @property
    def num_documents(self) -> int:
        """Documents over all shards."""
        return int(self.domain_ids.shape[0])

    @property
    def document_offsets(self) -> np.ndarray:
        """int64 ``(S + 1,)``: shard ``s`` owns documents ``[offsets[s], offsets[s + 1])`` of ``domain_ids``."""
        counts = np.array([s.num_documents for s in self.shards], dtype=np.int64)
        return np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])

    def _widths(self) -> List[int]:
        return [max(2, len(str(int(k) - 1))) for k in self.levels]

    def domain_name(self, j: int) -> str:
        """The name of fine domain ``j``: the explicit name, else ``c03`` / ``c03_05_01``."""
        j = int(j)
        if not 0 <= j < self.num_domains:
            raise IndexError(f"fine domain {j} out of range [0, {self.num_domains})")
        if self.names is not None:
            return self.names[j]
        return self.group_name(len(self.levels) - 1, j)

    def group_name(self, level: int, g: int) -> str:
        """The name of group ``g`` at hierarchy ``level`` (see :meth:`group_ids`): ``c03``, ``c03_05``, ...

        Always derived from the levels (explicit names label fine domains only).
        """
        self._check_level(level)
        num_groups = int(math.prod(int(k) for k in self.levels[: level + 1]))
        if not 0 <= int(g) < num_groups:
            raise IndexError(f"group {g} out of range [0, {num_groups}) at level {level}")
        parts = [f"{d:0{w}d}" for d, w in zip(_digits(int(g), self.levels[: level + 1]), self._widths())]
        return "c" + "_".join(parts)

    def domain_names(self) -> List[str]:
        """All K names in id order, materialised (to match weights files and bases by name)."""
        if self.names is not None:
            return list(self.names)
        return self.group_names(len(self.levels) - 1)

    def group_names(self, level: int) -> List[str]:
        """The names of all groups at ``level`` in id order (row-major, like :meth:`group_name`)."""
        self._check_level(level)
        digits = [[f"{d:0{w}d}" for d in range(int(k))] for k, w in zip(self.levels[: level + 1], self._widths())]
        return ["c" + "_".join(parts) for parts in itertools.product(*digits)]

    def num_groups(self, level: int) -> int:
        """Groups at ``level``: ``k1 * ... * k_{level+1}``."""
        self._check_level(level)
        return int(math.prod(int(k) for k in self.levels[: level + 1]))

    def group_ids(self, level: int) -> np.ndarray:
        """int32 ``(total documents,)``: every document's group at hierarchy ``level``.

        A group at level ``l`` is a prefix ``(c1, ..., c_{l+1})`` of the hierarchical id, numbered
        row-major in ``[0, k1 * ... * k_{l+1})``: level 0 is the top (coarse) clusters, the last
        level the fine domains themselves.
        """
        self._check_level(level)
        divisor = int(math.prod(int(k) for k in self.levels[level + 1 :]))
        ids = np.asarray(self.domain_ids)
        return ids if divisor == 1 else (ids // np.int32(divisor)).astype(np.int32, copy=False)

    def domain_counts(self) -> np.ndarray:
        """int64 ``(K,)``: documents per fine domain."""
        return np.bincount(self.domain_ids, minlength=self.num_domains).astype(np.int64, copy=False)

    def _check_level(self, level: int) -> None:
        if not 0 <= int(level) < len(self.levels):
            raise IndexError(f"level {level} out of range: the map has {len(self.levels)} level(s) {self.levels}")


# --------------------------------------------------------------------------------------
# Validation, shared by writing and reading
# --------------------------------------------------------------------------------------
def _validate(dmap: DomainMap, where: str) -> None:
    """DataError naming ``where`` for the first inconsistency of ``dmap`` (normalises domain_ids to int32)."""
    levels = dmap.levels
    if (
        not isinstance(levels, (list, tuple))
        or not levels
        or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and int(k) >= 1 for k in levels)
    ):
        raise DataError(
            f"{where}: levels must be a non-empty list of positive ints ([K] or [k1, k2, ...]), "
            f"got {levels!r}; {_REBUILD}"
        )
    dmap.levels = [int(k) for k in levels]
    k = dmap.num_domains
    if k > _MAX_DOMAINS:
        raise DataError(f"{where}: levels {dmap.levels} give {k} domains, more than int32 ids allow")
    if dmap.names is not None:
        if not isinstance(dmap.names, (list, tuple)) or not all(isinstance(n, str) and n for n in dmap.names):
            raise DataError(f"{where}: names must be a list of non-empty strings or null")
        if len(dmap.names) != k:
            raise DataError(
                f"{where}: {len(dmap.names)} names for {k} domains (levels {dmap.levels}); "
                f"give one name per fine domain, or none"
            )
        if len(set(dmap.names)) != k:
            seen, dup = set(), None
            for n in dmap.names:
                if n in seen:
                    dup = n
                    break
                seen.add(n)
            raise DataError(f"{where}: domain name {dup!r} appears more than once; names must be unique")
        dmap.names = list(dmap.names)
    shards = dmap.shards
    if not isinstance(shards, (list, tuple)) or not shards:
        raise DataError(f"{where}: the map lists no shards; {_REBUILD}")
    names = set()
    for s in shards:
        if (
            not isinstance(s.name, str)
            or not s.name
            or not isinstance(s.num_documents, int)
            or s.num_documents < 0
            or not isinstance(s.num_tokens, int)
            or s.num_tokens < 0
            or not isinstance(s.idx_sha256, str)
            or not _SHA_RE.match(s.idx_sha256)
        ):
            raise DataError(
                f"{where}: malformed shard entry {s!r} (name, num_documents >= 0, num_tokens >= 0, "
                f"idx_sha256 as 64 lowercase hex digits); {_REBUILD}"
            )
        if s.name in names:
            raise DataError(f"{where}: shard {s.name!r} is listed twice; each shard appears once")
        names.add(s.name)
    ids = np.asarray(dmap.domain_ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"{where}: domain_ids must be a 1-d integer array, got {ids.dtype} of shape {ids.shape}")
    total = sum(s.num_documents for s in shards)
    if ids.shape[0] != total:
        counts = ", ".join(f"{s.name}: {s.num_documents}" for s in shards)
        raise DataError(
            f"{where}: domain_ids holds {ids.shape[0]} documents but its shards hold {total} "
            f"({counts}); the map is corrupt: {_REBUILD}"
        )
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= k:
            bad = int(np.flatnonzero((ids < 0) | (ids >= k))[0])
            raise DataError(
                f"{where}: document {bad} has domain id {int(ids[bad])}, outside [0, {k}) "
                f"(levels {dmap.levels}); ids range over [{lo}, {hi}]; the map is corrupt: {_REBUILD}"
            )
    dmap.domain_ids = ids.astype(np.int32, copy=False)
    if dmap.clusters_dir is not None and not isinstance(dmap.clusters_dir, str):
        raise DataError(f"{where}: clusters_dir must be a string (relative to the map) or null")
    if not isinstance(dmap.metadata, dict):
        raise DataError(f"{where}: metadata must be a JSON object")


# --------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------
def write_domain_map(path: str, dmap: DomainMap) -> None:
    """Validate ``dmap`` and write it to ``path`` atomically (temp file, fsync, rename).

    Raises:
        DataError: ``dmap`` is inconsistent (the message names ``path``).
        OutputError: ``path`` cannot be written.
    """
    from megatron_dga.fileio import atomic_write

    _validate(dmap, f"domain map {path}")
    header = {
        "format": MAP_FORMAT,
        "levels": dmap.levels,
        "names": dmap.names,
        "shards": [
            {
                "name": s.name,
                "num_documents": int(s.num_documents),
                "num_tokens": int(s.num_tokens),
                "idx_sha256": s.idx_sha256,
            }
            for s in dmap.shards
        ],
        "clusters_dir": dmap.clusters_dir,
        "metadata": dmap.metadata,
    }
    text = json.dumps(header, sort_keys=True)
    atomic_write(path, lambda fh: np.savez(fh, header=np.array(text), domain_ids=dmap.domain_ids))


def read_domain_map(path: str) -> DomainMap:
    """Read and validate the map at ``path``.

    Raises:
        DataError: naming ``path``: missing file, not an npz, wrong format string, missing
            members, a header that is not the documented JSON object, domain_ids whose length is
            not the sum of the shards' documents, ids outside ``[0, K)``, invalid levels, names
            whose count is not K.
    """
    where = f"domain map {path}"
    if not os.path.isfile(path):
        raise DataError(
            f"{where} does not exist; write one with tools/cluster_domains.py --input-shards ... --output-map FILE"
        )
    not_npz = (
        f"{where} is not a domain map (an .npz written by tools/cluster_domains.py --output-map, format {MAP_FORMAT!r})"
    )
    if not zipfile.is_zipfile(path):
        raise DataError(not_npz)
    try:
        with load_npz(path) as npz:
            members = set(npz.files)
            missing = sorted({"header", "domain_ids"} - members)
            if missing:
                raise DataError(f"{not_npz}: members {missing} are missing (it has {sorted(members)})")
            header_arr = npz["header"]
            ids = npz["domain_ids"]
    except DataError:
        raise
    except NPZ_READ_ERRORS as exc:
        raise DataError(f"{not_npz}: numpy cannot read it ({exc})") from None
    if header_arr.shape != () or header_arr.dtype.kind != "U":
        raise DataError(
            f"{not_npz}: member 'header' must be a 0-d unicode array, got {header_arr.dtype} "
            f"of shape {header_arr.shape}"
        )
    try:
        header = json.loads(str(header_arr[()]))
    except ValueError as exc:
        raise DataError(f"{not_npz}: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DataError(f"{not_npz}: its header is a JSON {type(header).__name__}, expected an object")
    fmt = header.get("format")
    if fmt != MAP_FORMAT:
        raise DataError(
            f"{where}: format {fmt!r}, expected {MAP_FORMAT!r}; this version reads only that format: {_REBUILD}"
        )
    missing = sorted({"levels", "shards"} - set(header))
    if missing:
        raise DataError(f"{where}: header lacks {missing}; the map is corrupt: {_REBUILD}")
    raw_shards = header["shards"]
    if not isinstance(raw_shards, list) or not all(isinstance(s, dict) for s in raw_shards):
        raise DataError(f"{where}: header 'shards' must be a list of objects; the map is corrupt: {_REBUILD}")
    try:
        shards = [
            MapShard(
                name=s["name"], num_documents=s["num_documents"], num_tokens=s["num_tokens"], idx_sha256=s["idx_sha256"]
            )
            for s in raw_shards
        ]
    except KeyError as exc:
        raise DataError(f"{where}: a shard entry lacks {exc.args[0]!r}; the map is corrupt: {_REBUILD}") from None
    metadata = header.get("metadata")
    dmap = DomainMap(
        domain_ids=ids,
        shards=shards,
        levels=header["levels"],
        names=header.get("names"),
        clusters_dir=header.get("clusters_dir"),
        metadata={} if metadata is None else metadata,
    )
    _validate(dmap, where)
    return dmap


def clusters_path(map_path: str, dmap: DomainMap) -> Optional[str]:
    """The map's ``clusters_dir`` resolved against the map file's directory (None for labelled maps)."""
    if dmap.clusters_dir is None:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(map_path)), dmap.clusters_dir)


# --------------------------------------------------------------------------------------
# Matching the trainer's --data-path
# --------------------------------------------------------------------------------------
def check_map_matches_shards(dmap: DomainMap, prefixes: Sequence[str], map_path: str) -> List[int]:
    """Check that ``prefixes`` (the trainer's --data-path) are exactly the map's shards.

    Every map shard must be given exactly once and vice versa (matched by basename), with the
    same document count and ``.idx`` SHA-256. Each shard is validated (``inspect_shard``) first.

    Returns:
        ``order`` with ``order[m]`` = the position in ``prefixes`` of the map's shard ``m``, so
        ``[prefixes[i] for i in order]`` lists the shards in map order (the order of ``domain_ids``).

    Raises:
        DataError: naming the map file, the shard prefix and what differs, with the fix.
    """
    where = f"--domain-map {map_path}"
    position: Dict[str, int] = {}
    for i, prefix in enumerate(prefixes):
        name = _basename(prefix)
        if name in position:
            raise DataError(
                f"{where}: --data-path gives two shards named {name!r} ({prefixes[position[name]]} and "
                f"{prefix}); a map matches shards by basename, give each once"
            )
        position[name] = i
    map_names = [s.name for s in dmap.shards]
    extra = [p for p in prefixes if _basename(p) not in set(map_names)]
    if extra:
        raise DataError(
            f"{where}: --data-path shard {extra[0]} is not in the map (the map was built for "
            f"{_shortlist(map_names)}); drop it from --data-path or {_REBUILD}"
        )
    missing = [n for n in map_names if n not in position]
    if missing:
        raise DataError(
            f"{where}: the map's shard {missing[0]!r} is not in --data-path "
            f"({len(missing)} of its {len(map_names)} shards are missing); give every shard the map was "
            f"built for, or {_REBUILD}"
        )
    order = []
    for shard in dmap.shards:
        prefix = prefixes[position[shard.name]]
        found = shard_identity(prefix)
        if found.num_documents != shard.num_documents:
            raise DataError(
                f"{where}: {prefix} has {found.num_documents} documents but the map was built for "
                f"{shard.num_documents} (sha256 {shard.idx_sha256[:12]}...): {_REBUILD}"
            )
        if found.idx_sha256 != shard.idx_sha256:
            raise DataError(
                f"{where}: {prefix}.idx is not the shard the map was built for (sha256 "
                f"{found.idx_sha256[:12]}..., the map records {shard.idx_sha256[:12]}...; same name and "
                f"{shard.num_documents} documents, other content): use the shards the map was built "
                f"from, or {_REBUILD}"
            )
        order.append(position[shard.name])
    return order


def _shortlist(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} shards)" if len(names) > limit else "")
