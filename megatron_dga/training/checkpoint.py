"""Atomic, Megatron-style checkpoints: one directory per iteration, two formats.

Layout::

    <save>/latest_checkpointed_iteration.txt        tracker: the last complete iteration
    <save>/iter_0000100/megatron_dga.json           completeness marker (CRC-32 of every file), written last
    torch_dist (default):
    <save>/iter_0000100/{metadata.json,common.pt,.metadata,__*_*.distcp}   megatron dist_checkpointing
    torch (legacy):
    <save>/iter_0000100/common.pt                   state shared by all ranks (global rank 0)
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt        pipeline size 1
    <save>/iter_0000100/mp_rank_01_002/model_optim_rng.pt    pipeline size > 1

torch_dist (:func:`save_distributed_checkpoint`) is megatron-core's sharded format: every
rank writes its shards and a load reshards them onto another TP/PP/DP layout. In the
torch format the ``mp_rank_{tp:02d}`` directory gets the ``_{pp:03d}`` suffix only when
the pipeline size is above 1, as in Megatron-LM; each model-parallel file is written by
data-parallel rank 0 of that model-parallel rank and read back by every data-parallel
rank, so the data-parallel size may change between save and load, TP and PP may not.

Atomicity protocol of :func:`save_checkpoint` (all ranks of ``group`` call it):

1. The coordinator (rank 0 of ``group``) picks ``iter_XXXXXXX.tmp-<unique>`` and
   broadcasts the name; writers put their file there (temp file, fsync, ``os.replace``).
2. All ranks exchange success/failure; a failure anywhere raises on every rank and
   the temporary directory is left behind (cleaned by a later save). Each rank then reads
   its share of the files back for their CRC-32s: at once, or in a background thread while
   training goes on (:class:`PendingCheckpoint`, the trainer's saves), and the steps below
   run when every rank is done.
3. The coordinator checks every expected file, then writes ``megatron_dga.json`` (the
   completeness marker, with each file's size and CRC-32, verified on load), fsyncs and
   renames the directory to ``iter_XXXXXXX``. An existing directory of the same
   iteration is first renamed aside to ``iter_XXXXXXX.old-<unique>``; a crash
   between those two renames is recovered by the loader.
4. The tracker file is replaced atomically, then old checkpoints beyond
   ``keep_last`` and stale ``.tmp-*``/``.old-*``/``.del-*`` directories are removed.

A crash at any point therefore leaves the tracker naming a complete checkpoint.
All ranks are assumed to see the same file system under ``save_dir``.

Trust model: loading a checkpoint never runs code from it. Before any library reads the
directory, :func:`resolve_checkpoint` checks the completeness marker (every field, every file
of the directory listed in it, every listed path a plain relative one inside it, no symbolic
links), and :func:`verify_checkpoint` checks every file's CRC-32 and vets every pickle a
library will read with a restricted loader: torch.distributed.checkpoint's ``.metadata``
(plain ``pickle.load`` in torch) admits only DCP's metadata dataclasses, torch.Size, dtypes and
layouts (:data:`DCP_METADATA_GLOBALS`); ``common.pt`` and every object stored inside a
``.distcp`` file (DCP unpickles those with ``weights_only=False``) must load with
``torch.load(weights_only=True)``. Anything else, and any damaged file, is one CheckpointError
naming the file and the fix; the loaded parameters are checked finite. The checksums detect
damage, not tampering (whoever can edit the files can rewrite the marker): the safety comes
from the vetting, which holds for files that do not change while they are loaded.

Serialisation: ``torch.save``; loading uses ``torch.load(weights_only=True)`` by
default, so states must consist of tensors and plain Python values (dict, list,
tuple, str, int, float, bool, None, torch.dtype/Size/device). :func:`save_checkpoint`
checks this before writing, so a NumPy array in a sampler state fails at save time
with the key path, not at resume time. Pass ``weights_only=False`` to both functions
to store arbitrary picklable objects (only ever load such checkpoints from a trusted
source: unpickling can run code).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import megatron_dga
from megatron_dga import comm
from megatron_dga.errors import CheckpointError, ConfigError
from megatron_dga.fileio import atomic_write, atomic_write_text, describe_os_error, fsync_dir, is_relative_inside

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
"""Megatron-LM's name for the file holding the last complete iteration."""
METADATA_FILENAME = "megatron_dga.json"
"""Our completeness marker (dist_checkpointing writes its own metadata.json beside it)."""
COMMON_FILENAME = "common.pt"
MODEL_FILENAME = "model_optim_rng.pt"
METADATA_FORMAT = "megatron-dga/checkpoint-v2"
CKPT_FORMATS = ("torch_dist", "torch")
DCP_METADATA_FILENAME = ".metadata"
"""torch.distributed.checkpoint's pickled index of a torch_dist checkpoint."""
DIST_CKPT_CONFIG_FILENAME = "metadata.json"
"""megatron dist_checkpointing's own JSON metadata of a torch_dist checkpoint."""

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_SCRATCH_DIR = re.compile(r"^iter_(\d{7,})\.(tmp|old|del)-[0-9a-z]+$")


@dataclass(frozen=True)
class CheckpointLayout:
    """Where this process sits in the model-parallel x data-parallel grid.

    ``dp`` counts every replica of one model-parallel shard (data-parallel times
    context-parallel ranks), so ``tp_size * pp_size * dp_size`` is the number of
    ranks that call :func:`save_checkpoint`.
    """

    tp_size: int = 1
    """Tensor-model-parallel size (--tensor-model-parallel-size)."""
    pp_size: int = 1
    """Pipeline-model-parallel size (--pipeline-model-parallel-size)."""
    dp_size: int = 1
    """Data-parallel size (replicas of each model-parallel shard)."""
    tp_rank: int = 0
    """This process's tensor-parallel rank, in [0, tp_size)."""
    pp_rank: int = 0
    """This process's pipeline stage, in [0, pp_size)."""
    dp_rank: int = 0
    """This process's data-parallel rank, in [0, dp_size); rank 0 writes the shard."""

    def __post_init__(self):
        for kind in ("tp", "pp", "dp"):
            size, rank = getattr(self, f"{kind}_size"), getattr(self, f"{kind}_rank")
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"CheckpointLayout.{kind}_size must be a positive integer, got {size!r}")
            if not isinstance(rank, int) or not 0 <= rank < size:
                raise ConfigError(f"CheckpointLayout.{kind}_rank must be in [0, {kind}_size={size}), got {rank!r}")

    @classmethod
    def from_context(cls, ctx) -> "CheckpointLayout":
        """Build from any object with tp/pp/dp ``_rank``/``_size`` attributes (platform.ParallelContext)."""
        return cls(
            tp_size=ctx.tp_size,
            pp_size=ctx.pp_size,
            dp_size=ctx.dp_size,
            tp_rank=ctx.tp_rank,
            pp_rank=ctx.pp_rank,
            dp_rank=ctx.dp_rank,
        )

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size

    @property
    def is_writer(self) -> bool:
        """True on the rank that writes this model-parallel rank's file."""
        return self.dp_rank == 0

    def shard_dirname(self, tp_rank: Optional[int] = None, pp_rank: Optional[int] = None) -> str:
        """``mp_rank_TT`` (pipeline size 1) or ``mp_rank_TT_PPP``; this rank's unless given."""
        tp = self.tp_rank if tp_rank is None else tp_rank
        pp = self.pp_rank if pp_rank is None else pp_rank
        return f"mp_rank_{tp:02d}" if self.pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"

    def all_shard_files(self) -> list[str]:
        """Relative paths of every model-parallel file a complete checkpoint holds."""
        return [
            f"{self.shard_dirname(tp, pp)}/{MODEL_FILENAME}" for pp in range(self.pp_size) for tp in range(self.tp_size)
        ]

    def describe(self) -> str:
        return f"TP={self.tp_size} PP={self.pp_size} DP={self.dp_size}"


def iteration_dirname(iteration: int) -> str:
    """``iter_0000100`` for 100 (Megatron's 7-digit zero padding)."""
    return f"iter_{iteration:07d}"


# ----------------------------------------------------------------------------- file helpers


_SAFE_LEAVES = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.Size, torch.device)


def _check_weights_only_safe(obj: Any, path: str) -> None:
    """Raise CheckpointError naming the first value torch.load(weights_only=True) would reject."""
    kind = type(obj)
    # Exact type checks: numpy.float64 subclasses float but pickles as a numpy object.
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int, float, bool, type(None), tuple):
                raise CheckpointError(
                    f"checkpoint state {path} has a key of type {type(key).__name__} ({key!r}); "
                    "use str/int keys (checkpoints load with torch.load(weights_only=True))"
                )
            _check_weights_only_safe(value, f"{path}[{key!r}]")
    elif kind in (list, tuple):
        for i, value in enumerate(obj):
            _check_weights_only_safe(value, f"{path}[{i}]")
    elif isinstance(obj, torch.Tensor) or kind in _SAFE_LEAVES:
        return
    else:
        raise CheckpointError(
            f"checkpoint state {path} is a {kind.__module__}.{kind.__qualname__}, which "
            "torch.load(weights_only=True) refuses; store tensors and plain Python values "
            "(torch.from_numpy(x), x.tolist(), float(x)) or pass weights_only=False to both "
            "save_checkpoint and load_checkpoint"
        )


def _torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _torch_load(path: Path, map_location, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:
        hint = (
            " It holds objects other than tensors/plain Python values; if it comes from a trusted "
            "source, load with weights_only=False."
            if weights_only and "weights_only" in str(exc)
            else " The file is truncated or corrupt; load an earlier iteration (--ckpt-step) instead."
        )
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(exc).__name__}: {exc}.{hint}") from exc


# ----------------------------------------------------------------------------- distributed helpers


class _Comm:
    """The ranks that save together (a group; None is the world), through ``megatron_dga.comm``."""

    def __init__(self, group):
        self.group = group
        self.rank = comm.rank(group)
        self.size = comm.size(group)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        return comm.broadcast_object(obj, 0, self.group)

    def all_gather(self, obj) -> list:
        return comm.all_gather_object(obj, self.group)


def _gather_or_raise(ranks: _Comm, error: Optional[str], what: str, payload: Any = None) -> list:
    """Every rank's ``payload``; CheckpointError on every rank when any rank reports an error."""
    records = ranks.all_gather((error, payload))
    failed = [(rank, msg) for rank, (msg, _) in enumerate(records) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {rank}: {msg}" for rank, msg in failed)
        raise CheckpointError(f"checkpoint {what}: {detail}")
    return [part for _, part in records]


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    state: dict,
    *,
    layout: CheckpointLayout = CheckpointLayout(),
    group=None,
    keep_last: Optional[int] = None,
    common_state: Optional[dict] = None,
    metadata: Optional[dict] = None,
    weights_only: bool = True,
    background: bool = False,
):
    """Save one iteration atomically in the ``torch`` format; every rank of ``group`` must call it.

    Args:
        save_dir: Checkpoint root (--save); created if missing.
        iteration: Training iteration the state belongs to (>= 0).
        state: This model-parallel rank's state (model, optimizer, RNG, ...). Only
            ``layout.dp_rank == 0`` ranks write it; other ranks may pass ``{}``.
        layout: This rank's position; its sizes go into the metadata.
        group: Process group over all ranks that save (None: the default group).
            Ignored when torch.distributed is not initialised.
        keep_last: Keep this many checkpoints with iteration <= ``iteration`` (the
            one just written included) and delete older ones; None keeps all.
            Directories with a higher iteration (left by a run abandoned after an
            earlier resume) are never deleted automatically.
        common_state: State identical on all ranks (args, sampler, mixing state);
            written once, by the coordinator, as ``common.pt``.
        metadata: Extra JSON-serialisable facts for the metadata file (args summary).
        weights_only: Check that states load with ``torch.load(weights_only=True)``.
        background: Checksum and publish in the background (see :class:`PendingCheckpoint`).

    Returns:
        The final checkpoint directory ``<save_dir>/iter_XXXXXXX``; with ``background``, the
        :class:`PendingCheckpoint` that publishes it.

    Raises:
        CheckpointError: On any rank's failure (raised on every rank); the previous
            checkpoint and the tracker are untouched.
        ConfigError: Invalid ``iteration``/``keep_last``, or a group whose size does
            not match the layout.
    """
    is_coordinator = comm.rank(group) == 0

    def write(tmp_dir: Path) -> list:
        written = []
        if layout.is_writer:
            if weights_only:
                _check_weights_only_safe(state, "state")
            shard_dir = tmp_dir / layout.shard_dirname()
            shard_dir.mkdir(exist_ok=True)
            _torch_save(shard_dir / MODEL_FILENAME, state)
            written.append(shard_dir / MODEL_FILENAME)
        if is_coordinator:
            common = {} if common_state is None else common_state
            if weights_only:
                _check_weights_only_safe(common, "common_state")
            _torch_save(tmp_dir / COMMON_FILENAME, common)
            written.append(tmp_dir / COMMON_FILENAME)
        fsync_dir(tmp_dir)
        return written

    expected = layout.all_shard_files() + [COMMON_FILENAME]
    return publish_checkpoint(
        save_dir,
        iteration,
        write,
        layout=layout,
        group=group,
        keep_last=keep_last,
        metadata=metadata,
        ckpt_format="torch",
        expected_files=expected,
        weights_only=weights_only,
        background=background,
    )


def file_record(path: Path) -> dict:
    """{"size", "crc32"} of a file, read in 16 MiB blocks (the checksum verified on load)."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 24)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return {"size": size, "crc32": crc}


def publish_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    write: Callable[[Path], list],
    *,
    layout: CheckpointLayout,
    group=None,
    keep_last: Optional[int] = None,
    metadata: Optional[dict] = None,
    ckpt_format: str,
    expected_files: Optional[list] = None,
    weights_only: bool = True,
    background: bool = False,
):
    """The atomic save protocol of both formats (see the module docstring); every rank calls it.

    ``write(tmp_dir)`` runs on every rank (it may call collectives) and returns the paths of
    the files this rank checksums; the coordinator records them all, with their checksums,
    in the metadata file.

    Returns the published ``iter_XXXXXXX`` directory; with ``background=True`` a
    :class:`PendingCheckpoint` instead, as soon as the files are written: the checksums are
    computed in a thread while training goes on, and its ``finish()`` publishes the checkpoint.
    """
    if not isinstance(iteration, int) or iteration < 0:
        raise ConfigError(f"checkpoint iteration must be a non-negative integer, got {iteration!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError(f"keep_last (--keep-last) must be None or >= 1, got {keep_last!r}")
    ranks = _Comm(group)
    if comm.initialized() and ranks.size != layout.world_size:
        raise ConfigError(
            f"checkpoint layout {layout.describe()} covers {layout.world_size} ranks but the "
            f"process group has {ranks.size}; pass the group of all ranks that save"
        )
    root = Path(save_dir)
    final_dir = root / iteration_dirname(iteration)

    # 1. Agree on a fresh scratch directory.
    tmp_name = None
    error = None
    if ranks.is_coordinator:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp_name = f"{final_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
            (root / tmp_name).mkdir()
        except OSError as exc:
            error = describe_os_error(exc, root / tmp_name if tmp_name else root, "--save")
            tmp_name = None
    tmp_name = ranks.broadcast(tmp_name)
    if tmp_name is None:
        error = error or f"rank 0 could not create a directory under --save {root}"
        raise CheckpointError(f"checkpoint save failed: {error}")
    tmp_dir = root / tmp_name

    # 2. Every rank writes its part.
    error, mine = None, []
    try:
        mine = write(tmp_dir)
    except (Exception, comm.DistCheckpointException) as exc:
        # One line naming the cause and path (a full disk: "no space left on device writing ..."),
        # not torch's "unexpected pos" nor DCP's per-rank tracebacks.
        error = describe_os_error(exc, tmp_dir, "--save")
    _gather_or_raise(ranks, error, f"save failed while writing into {tmp_dir}")

    def publish(files: dict) -> Path:
        # 3. Coordinator completes and publishes the directory.
        error = None
        if ranks.is_coordinator:
            try:
                _finalize(
                    root,
                    tmp_dir,
                    final_dir,
                    iteration,
                    layout,
                    files,
                    expected_files,
                    metadata,
                    ckpt_format,
                    weights_only,
                )
            except Exception as exc:
                error = describe_os_error(exc, final_dir, "--save")
        _gather_or_raise(ranks, error, f"save failed while publishing {final_dir}")
        # 4. Retention; failures here do not invalidate the checkpoint just written.
        if ranks.is_coordinator:
            try:
                _cleanup(root, iteration, keep_last)
            except OSError as exc:
                logger.warning("could not delete old checkpoints under %s: %s", root, exc)
        return final_dir

    pending = PendingCheckpoint(ranks, iteration, tmp_dir, mine, publish, background=background)
    return pending if background else pending.finish()


class PendingCheckpoint:
    """A checkpoint whose files are written into its scratch directory but not yet published.

    What is left of the save is reading the files back for their CRC-32s (each rank its
    share) and the publication (metadata, rename, tracker, retention). In a background
    thread the checksums overlap with training, so a save stalls training no longer than
    writing the files does, as Megatron's own save; until :meth:`finish` the tracker still
    names the previous checkpoint, so a crash meanwhile loses only this one. The thread
    runs no collective: :meth:`ready` and :meth:`finish` are called by every rank together.
    """

    def __init__(
        self,
        ranks: "_Comm",
        iteration: int,
        tmp_dir: Path,
        paths: list,
        publish: Callable[[dict], Path],
        *,
        background: bool,
    ):
        self.iteration = iteration
        self._ranks, self._tmp_dir, self._paths, self._publish = ranks, tmp_dir, list(paths), publish
        self._records: dict = {}
        self._error: Optional[str] = None
        self._thread = None
        if background:
            import threading

            self._thread = threading.Thread(target=self._checksum, name=f"checksum-{tmp_dir.name}", daemon=True)
            self._thread.start()
        else:
            self._checksum()

    def _checksum(self) -> None:
        try:
            # zlib releases the GIL on large blocks, so this overlaps with the training thread.
            self._records = {Path(p).relative_to(self._tmp_dir).as_posix(): file_record(Path(p)) for p in self._paths}
        except Exception as exc:
            self._error = describe_os_error(exc, self._tmp_dir, "--save")

    def ready(self, device="cpu") -> bool:
        """True on every rank once every rank's checksums are done (one all-reduce of one float)."""
        busy = torch.tensor([float(self._thread is not None and self._thread.is_alive())], device=device)
        return not bool(comm.all_reduce(busy, self._ranks.group, op=comm.MAX).item())

    def finish(self) -> Path:
        """Wait for this rank's checksums, then publish on every rank; returns the ``iter_`` directory."""
        if self._thread is not None:
            self._thread.join()
        parts = _gather_or_raise(
            self._ranks, self._error, f"save failed while checksumming {self._tmp_dir}", self._records
        )
        return self._publish({rel: rec for part in parts for rel, rec in part.items()})


def _finalize(
    root, tmp_dir, final_dir, iteration, layout, files, expected_files, metadata, ckpt_format, weights_only
) -> None:
    missing = [rel for rel in (expected_files or []) if not (tmp_dir / rel).is_file()]
    if missing:
        raise CheckpointError(
            f"{len(missing)} model-parallel file(s) missing in {tmp_dir} after all ranks wrote: "
            f"{missing[:4]}; all ranks must see the same file system under --save"
        )
    # Files written by a library (dist_checkpointing's own metadata, .metadata) that no rank
    # reported: the coordinator checksums them too, so every file is verified on load.
    for entry in sorted(tmp_dir.rglob("*")):
        rel = entry.relative_to(tmp_dir).as_posix()
        if entry.is_file() and rel not in files and rel != METADATA_FILENAME:
            files[rel] = file_record(entry)
    now = time.time()
    meta = {
        "format": METADATA_FORMAT,
        "ckpt_format": ckpt_format,
        "iteration": iteration,
        "layout": {"tp_size": layout.tp_size, "pp_size": layout.pp_size, "dp_size": layout.dp_size},
        "megatron_dga_version": megatron_dga.__version__,
        "torch_version": torch.__version__,
        "time_unix": now,
        "time": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        "weights_only": weights_only,
        "files": files,
        "extra": metadata or {},
    }
    try:
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable (finite numbers): {exc}") from exc
    # The metadata file is the completeness marker: written only once everything else is durable.
    atomic_write_text(tmp_dir / METADATA_FILENAME, text)
    fsync_dir(tmp_dir)

    old_dir = None
    if final_dir.exists():
        old_dir = root / f"{final_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(root)
    atomic_write_text(root / TRACKER_FILENAME, f"{iteration}\n")
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _list_iterations(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _ITER_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append(int(match.group(1)))
    return sorted(found)


def _cleanup(root: Path, iteration: int, keep_last: Optional[int]) -> None:
    for entry in root.iterdir():
        if _SCRATCH_DIR.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last is None:
        return
    older = [it for it in _list_iterations(root) if it < iteration]
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    for it in doomed:  # oldest first
        path = root / iteration_dirname(it)
        # Rename first so a crash mid-delete never leaves a half-deleted iter_ directory.
        trash = root / f"{path.name}.del-{uuid.uuid4().hex[:12]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        fsync_dir(root)
        logger.info("deleted checkpoint(s) %s under %s (keep_last=%d)", doomed, root, keep_last)


# ----------------------------------------------------------------------------- load


@contextlib.contextmanager
def reading(ckpt_dir: Path):
    """Wraps every read of ``ckpt_dir`` (:func:`resolve_checkpoint`, :func:`verify_checkpoint`,
    :func:`load_distributed_checkpoint`, :func:`load_checkpoint`).

    A checkpoint can disappear while it is read: the --keep-last rotation of the run that saves
    into that directory removes older checkpoints as it publishes new ones (a converter or an
    evaluation reading a running job's checkpoints), or someone deletes it. Whatever a reader or
    library then raises (FileNotFoundError, a damaged-file CheckpointError, DCP's exception) becomes
    one CheckpointError naming the directory and the fix, when the directory or a file of it is gone.
    """
    try:
        yield
    except (Exception, comm.DistCheckpointException) as exc:
        ckpt_dir = Path(ckpt_dir)
        missing_file = any(isinstance(e, FileNotFoundError) for e in _chain(exc))
        if ckpt_dir.is_dir() and not missing_file:
            raise
        raise CheckpointError(vanished_message(ckpt_dir)) from None


def _chain(exc: BaseException):
    """``exc`` and its causes (a DCP CheckpointException's per-rank failures included)."""
    from megatron_dga.fileio import _causes

    return _causes(exc)


def vanished_message(ckpt_dir: Path) -> str:
    """The error for a checkpoint removed while it was read (:func:`reading`)."""
    root = ckpt_dir.parent
    kept = _list_iterations(root)
    return (
        f"checkpoint {ckpt_dir} was removed while it was being read (a run saving into {root} with --keep-last "
        f"deletes older checkpoints as it saves new ones, or it was deleted); pass --ckpt-step N of one that "
        f"is kept (now under {root}: {kept or 'none'}), or copy the checkpoint elsewhere and read the copy"
    )


def latest_iteration(load_dir: str | os.PathLike) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no tracker.

    Raises:
        CheckpointError: The tracker exists but does not hold a non-negative integer.
    """
    tracker = Path(load_dir) / TRACKER_FILENAME
    try:
        raw = tracker.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint tracker {tracker}: {exc}") from exc
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not text.isascii():
        raise CheckpointError(
            f"checkpoint tracker {tracker} holds {text[:40]!r}, not an iteration number; "
            "write the iteration of a complete iter_XXXXXXX directory into it, or pick one with --ckpt-step"
        )
    return int(text)


def _resolve_dir(root: Path, iteration: int) -> Path:
    path = root / iteration_dirname(iteration)
    if (path / METADATA_FILENAME).is_file():
        return path
    # A crash while replacing an existing directory of the same iteration leaves
    # the complete previous copy renamed aside as .old-*.
    for entry in sorted(root.glob(f"{path.name}.old-*")):
        if (entry / METADATA_FILENAME).is_file():
            logger.warning("%s is missing; loading the complete copy %s left by an interrupted save", path, entry)
            return entry
    available = _list_iterations(root)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is incomplete ({METADATA_FILENAME} missing: the save was interrupted); "
            f"load another iteration, available: {available}"
        )
    raise CheckpointError(f"checkpoint {path} does not exist; available iterations under {root}: {available or 'none'}")


def _fallback(root: Path, iteration: int) -> str:
    """The fix for a damaged checkpoint: the previous iteration under ``root``, if any."""
    earlier = [it for it in _list_iterations(root) if it < iteration]
    return (
        f"load the previous checkpoint with --ckpt-step {earlier[-1]}"
        if earlier
        else "no earlier checkpoint exists under this --load"
    )


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _marker_problem(meta) -> Optional[str]:
    """What is wrong with a parsed completeness marker (None: well-formed)."""
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        return f"it is not megatron-dga checkpoint metadata (format {METADATA_FORMAT!r})"
    if not _is_count(meta.get("iteration")):
        return f"iteration is {meta.get('iteration')!r}, expected an integer >= 0"
    if meta.get("ckpt_format", "torch") not in CKPT_FORMATS:
        return f"ckpt_format is {meta.get('ckpt_format')!r}, expected one of {list(CKPT_FORMATS)}"
    layout = meta.get("layout")
    if not isinstance(layout, dict) or not all(
        _is_count(layout.get(k)) and layout[k] >= 1 for k in ("tp_size", "pp_size", "dp_size")
    ):
        return f"layout is {layout!r}, expected {{tp_size, pp_size, dp_size}} positive integers"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"files is {type(files).__name__ if files is not None else 'missing'}, expected the record of every file"
    for rel, rec in files.items():
        if not is_relative_inside(rel) or rel == METADATA_FILENAME:
            return f"files names {rel!r}, not a relative path inside the checkpoint directory"
        if not (isinstance(rec, dict) and _is_count(rec.get("size")) and _is_count(rec.get("crc32"))):
            return f"files[{rel!r}] is {rec!r}, expected {{size, crc32}} integers"
    if not isinstance(meta.get("extra", {}), dict):
        return f"extra is {type(meta['extra']).__name__}, expected an object"
    return None


def read_checkpoint_metadata(ckpt_dir: str | os.PathLike) -> dict:
    """Parse and check ``<iter dir>/megatron_dga.json``; CheckpointError when missing or malformed."""
    path = Path(ckpt_dir) / METADATA_FILENAME
    named = re.match(r"^iter_(\d{7,})", Path(ckpt_dir).name)
    fallback = _fallback(Path(ckpt_dir).parent, int(named.group(1)) if named else 1 << 62)
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {METADATA_FILENAME} is missing") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(
            f"cannot read checkpoint metadata {path}: {type(exc).__name__}: {exc}; {fallback}"
        ) from None
    problem = _marker_problem(meta)
    if problem:
        raise CheckpointError(
            f"checkpoint metadata {path} is malformed: {problem}; it was not written by a "
            f"complete save of megatron-dga; {fallback}"
        )
    return meta


def check_listing(ckpt_dir: Path, meta: dict) -> None:
    """Every file of ``ckpt_dir`` is listed in its marker and every listed file is there; no symbolic links.

    A file the marker does not list would be read unverified (a library reads every file it finds).
    """
    listed = set(meta["files"])
    fallback = _fallback(ckpt_dir.parent, meta["iteration"])
    for dirpath, dirnames, filenames in os.walk(ckpt_dir):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                raise CheckpointError(
                    f"checkpoint {ckpt_dir} holds a symbolic link {path} (a save never writes "
                    f"one; the checkpoint reads only its own files); {fallback}"
                )
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(ckpt_dir).as_posix()
            if rel not in listed and rel != METADATA_FILENAME:
                raise CheckpointError(
                    f"checkpoint file {ckpt_dir / rel} is not listed in {ckpt_dir / METADATA_FILENAME}, so it cannot "
                    f"be verified (it was added after the save); remove it, or {fallback}"
                )
    missing = sorted(rel for rel in listed if not (ckpt_dir / rel).is_file())
    if missing:
        raise CheckpointError(
            f"checkpoint file {ckpt_dir / missing[0]} is missing (the directory was modified "
            f"after saving; {len(missing)} listed file(s) absent); {fallback}"
        )


def load_checkpoint(
    load_dir: str | os.PathLike,
    *,
    layout: CheckpointLayout = CheckpointLayout(),
    iteration: Optional[int] = None,
    map_location="cpu",
    weights_only: bool = True,
) -> tuple[int, dict, dict]:
    """Load this rank's shard and the common state; no collectives, any rank may call it.

    Args:
        load_dir: Checkpoint root (--load).
        layout: This run's layout. TP and PP sizes must equal the checkpoint's; the
            DP size may differ (every DP rank reads its model-parallel rank's file).
        iteration: Iteration to load; None reads the tracker file.
        map_location: Passed to ``torch.load``.
        weights_only: Passed to ``torch.load``; keep True unless the checkpoint was
            saved with ``weights_only=False`` and comes from a trusted source.

    Returns:
        ``(iteration, state, common_state)``.

    Raises:
        CheckpointError: Missing directory/tracker/iteration, incomplete or
            truncated files, unreadable files, or a TP/PP layout mismatch.
    """
    ckpt_dir, meta = resolve_checkpoint(load_dir, iteration)
    root, iteration = ckpt_dir.parent, meta["iteration"]
    saved = meta["layout"]
    if (saved["tp_size"], saved["pp_size"]) != (layout.tp_size, layout.pp_size):
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was saved with TP={saved['tp_size']} PP={saved['pp_size']} "
            f"(DP={saved['dp_size']}) but this run uses {layout.describe()}; rerun with "
            f"--tensor-model-parallel-size {saved['tp_size']} --pipeline-model-parallel-size "
            f"{saved['pp_size']} (DP may differ), or convert the checkpoint to the new layout"
        )
    shard = f"{layout.shard_dirname()}/{MODEL_FILENAME}"
    with reading(ckpt_dir):
        verify_files(root, ckpt_dir, meta, [shard, COMMON_FILENAME])
        state = _torch_load(ckpt_dir / shard, map_location, weights_only)
        common = _torch_load(ckpt_dir / COMMON_FILENAME, map_location, weights_only)
    error = check_finite(state, str(ckpt_dir / shard), _fallback(root, iteration))
    if error:
        raise CheckpointError(error)
    return iteration, state, common


def verify_files(root: Path, ckpt_dir: Path, meta: dict, rels: list) -> None:
    """Check each file's size and CRC-32 against the metadata; CheckpointError naming the first bad one."""
    for rel in rels:
        path = ckpt_dir / rel
        expected = meta["files"].get(rel)
        if expected is None:
            raise CheckpointError(
                f"checkpoint file {path} is not listed in {ckpt_dir / METADATA_FILENAME}; "
                f"{_fallback(root, meta['iteration'])}"
            )
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (the directory was modified after saving)")
        try:
            got = file_record(path)
        except OSError as exc:  # removed or unreadable meanwhile: a CheckpointError, reported to every rank
            raise CheckpointError(
                f"cannot read checkpoint file {path}: {describe_os_error(exc, path)}; "
                f"{_fallback(root, meta['iteration'])}"
            ) from exc
        if got == expected:
            continue
        if got["size"] != expected["size"]:
            problem = f"is truncated or was replaced: {got['size']} bytes, {expected['size']} at save time"
        else:
            problem = f"is corrupt: CRC-32 {got['crc32']:08x}, {expected['crc32']:08x} at save time"
        raise CheckpointError(f"checkpoint file {path} {problem}; {_fallback(root, meta['iteration'])}")


def check_finite(state: Any, where: str, fallback: str) -> Optional[str]:
    """The error (None: none) for the first floating-point tensors of ``state`` holding NaN or Inf."""
    bad = []

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not bool(torch.isfinite(obj).all()):
                bad.append(path)
        elif isinstance(obj, dict):
            if obj.get("padding") is True:
                # The distributed optimizer's dp_reshardable format fills the gaps between parameters in a
                # bucket with torch.empty padding entries ({'exp_avg': ..., 'padding': True}) and saves them
                # as they are: uninitialised memory, any bit pattern, never read by the optimizer.
                return
            for key, value in obj.items():
                # Adam's per-parameter 'step' is a counter, not loaded data: the distributed optimizer's format
                # saves it in the param groups and hands back this rank's placeholder (uninitialised memory),
                # which optim._repair_torch_adam_steps overwrites after the load.
                if key != "step":
                    walk(value, f"{path}[{key!r}]" if path else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")

    walk(state, "")
    if not bad:
        return None
    return (
        f"checkpoint {where}: {len(bad)} loaded tensor(s) hold NaN or Inf ({', '.join(bad[:3])}); the run that "
        f"saved it had diverged or the files were altered; {fallback}"
    )


# ----------------------------------------------------------------------------- vetting what libraries unpickle


DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # torch.layout's pickle: a lookup by name
    "torch": {"Size"},  # and every torch.<dtype>, admitted by _DCPMetadataUnpickler.find_class
    "collections": {"OrderedDict"},
}
"""The globals torch.distributed.checkpoint's ``.metadata`` pickle may name (the DCP dataclasses of
Metadata and its plans, torch.Size, dtypes, layouts); tests/training/test_checkpoint_trust.py lists those of a real
checkpoint with pickletools and checks they are all here."""


class _DCPMetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`DCP_METADATA_GLOBALS` (and dtypes): no code runs."""

    def find_class(self, module: str, name: str):
        if name in DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which is not a torch.distributed.checkpoint metadata class"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP metadata never does")


def _read_dcp_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as fh:
        md = _DCPMetadataUnpickler(fh).load()
    if (
        not isinstance(md, Metadata)
        or not isinstance(getattr(md, "storage_data", None), dict)
        or not isinstance(getattr(md, "state_dict_metadata", None), dict)
    ):
        raise pickle.UnpicklingError(f"it holds a {type(md).__name__}, not torch.distributed.checkpoint's Metadata")
    return md


def _vet_torch_pickle(data, what: str) -> None:
    """``data`` (a path or bytes) loads with ``torch.load(weights_only=True)``; else the reason, raised."""
    try:
        torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()
        detail = next(
            (line for line in reason if "Unsupported global" in line or "GLOBAL" in line), reason[0] if reason else ""
        )
        raise pickle.UnpicklingError(
            f"{what} does not load with torch.load(weights_only=True): {type(exc).__name__}: {detail[:300]}"
        ) from None


def vet_distributed_checkpoint(ckpt_dir: Path, meta: dict):
    """Vet every file of a torch_dist checkpoint that megatron or torch will parse or unpickle.

    ``metadata.json`` must be a JSON object; ``.metadata`` goes through the restricted unpickler and
    may point only at files of the directory; ``common.pt`` and each object (BytesStorageMetadata item)
    stored in a ``.distcp`` file must load with ``torch.load(weights_only=True)``.

    Returns:
        The vetted torch.distributed.checkpoint ``Metadata`` (tensor shapes and dtypes).

    Raises:
        CheckpointError: naming the file, what it holds and the fix.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    fallback = _fallback(ckpt_dir.parent, meta["iteration"])
    path = ckpt_dir / DIST_CKPT_CONFIG_FILENAME
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"it holds a {type(config).__name__}, not a JSON object")
        path = ckpt_dir / DCP_METADATA_FILENAME
        md = _read_dcp_metadata(path)
        for index, info in md.storage_data.items():
            rel = getattr(info, "relative_path", None)
            if not (isinstance(rel, str) and rel in meta["files"] and "/" not in rel):
                raise ValueError(f"it points {getattr(index, 'fqn', index)!r} at {rel!r}, not a file of the checkpoint")
            if getattr(info, "transform_descriptors", None):
                raise ValueError(
                    f"it stores {index.fqn!r} through transforms {info.transform_descriptors!r}, "
                    "which megatron-dga never writes"
                )
            if not isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
                continue
            path = ckpt_dir / rel
            if not (
                _is_count(info.offset)
                and _is_count(info.length)
                and info.offset + info.length <= meta["files"][rel]["size"]
            ):
                raise ValueError(f"object {index.fqn!r} lies outside the file")
            with open(path, "rb") as fh:
                fh.seek(info.offset)
                _vet_torch_pickle(fh.read(info.length), f"object {index.fqn!r}")
        path = ckpt_dir / COMMON_FILENAME
        if path.is_file():
            _vet_torch_pickle(path, "it")
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint file {path} is refused: {type(exc).__name__}: {exc} (loading a checkpoint "
            f"never runs code from it); {fallback}"
        ) from None
    return md


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of ``exc``, or of the first rank's failure inside a DCP CheckpointException."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        exc = first[0] if isinstance(first, tuple) and first and isinstance(first[0], BaseException) else exc
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def verify_checkpoint(ckpt_dir: Path, meta: dict, *, group=None):
    """Everything a load checks before any library reads ``ckpt_dir``; every rank of ``group`` calls it.

    The ranks checksum the listed files between them (:func:`verify_files`), then each vets what
    libraries will unpickle (:func:`vet_distributed_checkpoint`, torch_dist checkpoints). A failure
    on any rank is a CheckpointError on every rank.

    Returns:
        The vetted torch.distributed.checkpoint ``Metadata`` of a torch_dist checkpoint, else None.
    """
    ranks = _Comm(group)
    rels = sorted(meta["files"])
    with reading(ckpt_dir):
        error = None
        try:
            verify_files(ckpt_dir.parent, ckpt_dir, meta, rels[ranks.rank :: ranks.size])
        except CheckpointError as exc:
            error = str(exc)
        _raise_on_every_rank(ranks, error)
        md, error = None, None
        if meta.get("ckpt_format") == "torch_dist":
            try:
                md = vet_distributed_checkpoint(ckpt_dir, meta)
            except CheckpointError as exc:
                error = str(exc)
            _raise_on_every_rank(ranks, error)
    return md


def _raise_on_every_rank(ranks: "_Comm", error: Optional[str]) -> None:
    """CheckpointError on every rank when any rank has an ``error`` (one rank's message as it is)."""
    failed = [(rank, msg) for rank, msg in enumerate(ranks.all_gather(error)) if msg is not None]
    if len({msg for _, msg in failed}) == 1:
        raise CheckpointError(failed[0][1])
    if failed:
        raise CheckpointError("; ".join(f"rank {rank}: {msg}" for rank, msg in failed))


# ----------------------------------------------------------------------------- torch_dist format


def save_distributed_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    sharded_state: dict,
    *,
    layout: CheckpointLayout = CheckpointLayout(),
    group=None,
    keep_last: Optional[int] = None,
    metadata: Optional[dict] = None,
    background: bool = False,
):
    """Save megatron-core's sharded state dict (torch_dist format) with our atomic protocol.

    Every rank calls it with its ``sharded_state`` (ShardedTensors/ShardedObjects from
    megatron's ``sharded_state_dict`` methods, plus plain common values, which
    dist_checkpointing writes once from rank 0). The files land in a scratch directory
    that is published as ``iter_XXXXXXX`` only once complete; every file's CRC-32 goes
    into the metadata (the ranks checksum the files between them). ``background=True``
    returns a :class:`PendingCheckpoint` once the files are written (see there).
    """

    def write(tmp_dir: Path) -> list:
        from megatron.core import dist_checkpointing

        from megatron_dga import platform

        with platform.megatron_cuda_calls_on_cpu():
            dist_checkpointing.save(sharded_state, str(tmp_dir))
        comm.barrier(group)  # every rank's files are on disk before anyone lists them
        paths = sorted(p for p in tmp_dir.rglob("*") if p.is_file())
        return paths[comm.rank(group) :: comm.size(group)]

    return publish_checkpoint(
        save_dir,
        iteration,
        write,
        layout=layout,
        group=group,
        keep_last=keep_last,
        metadata=metadata,
        ckpt_format="torch_dist",
        background=background,
    )


def resolve_checkpoint(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> tuple[Path, dict]:
    """(iteration directory, its metadata) of the checkpoint ``--load``/``--ckpt-step`` name.

    Reads only the tracker and the completeness marker, and checks the marker is well-formed and
    lists exactly the files of the directory (:func:`check_listing`); the contents are checked by
    :func:`verify_checkpoint` (which :func:`load_distributed_checkpoint` and :func:`load_checkpoint` run).
    """
    root = Path(load_dir)
    if not root.is_dir():
        raise CheckpointError(
            f"--load {root} does not exist or is not a directory; fix the path, or drop --load to start from scratch"
        )
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            available = _list_iterations(root)
            hint = (
                f"it has iteration directories {available}: pick one explicitly (--ckpt-step) or write "
                f"its number into {TRACKER_FILENAME}"
                if available
                else "it holds no checkpoint; point --load at a --save directory of an earlier run"
            )
            raise CheckpointError(f"--load {root} has no {TRACKER_FILENAME}; {hint}")
    ckpt_dir = _resolve_dir(root, iteration)
    with reading(ckpt_dir):
        meta = read_checkpoint_metadata(ckpt_dir)
        if meta["iteration"] != iteration:
            raise CheckpointError(
                f"{ckpt_dir / METADATA_FILENAME} says iteration {meta['iteration']}, expected {iteration}"
            )
        check_listing(ckpt_dir, meta)
    return ckpt_dir, meta


def load_distributed_checkpoint(
    ckpt_dir: Path, meta: dict, sharded_state: dict, *, group=None, verified: bool = False
) -> dict:
    """:func:`verify_checkpoint` (unless ``verified``: the caller ran it), then megatron's dist_checkpointing.load.

    ``sharded_state`` is this run's sharded state dict (its own TP/PP/DP layout): megatron
    reshards the saved tensors into it. Returns the loaded state dict (common values included),
    whose floating-point tensors are checked finite. Every rank of ``group`` calls it; a failure
    on any rank is a CheckpointError on every rank.
    """
    from megatron.core import dist_checkpointing

    from megatron_dga import platform

    if meta.get("ckpt_format") != "torch_dist":
        raise CheckpointError(f"{ckpt_dir} is a {meta.get('ckpt_format', 'torch')!r} checkpoint, not torch_dist")
    if not verified:
        verify_checkpoint(ckpt_dir, meta, group=group)
    fallback = _fallback(ckpt_dir.parent, meta["iteration"])
    state, error = None, None
    with reading(ckpt_dir):
        try:
            with platform.megatron_cuda_calls_on_cpu():
                state = dist_checkpointing.load(sharded_state, str(ckpt_dir))
        except (Exception, comm.DistCheckpointException) as exc:
            error = (
                f"cannot load {ckpt_dir}: {_one_line(exc)}; it does not match this model's "
                f"flags, or is damaged; {fallback}"
            )
            if not ckpt_dir.is_dir() or any(isinstance(e, FileNotFoundError) for e in _chain(exc)):
                error = vanished_message(ckpt_dir)
        if error is None:
            error = check_finite(state, str(ckpt_dir), fallback)
        _raise_on_every_rank(_Comm(group), error)
    return state
