"""Torch glue: a map-style dataset keyed by ``(domain_id, sample_index)`` and step-wise loading.

A source is one dataset (a megatron-core ``GPTDataset``), or one of the many sources a
:class:`MultiSource` stands for (the K fine domains of a domain map, in one object).

Sample *indices* are always computed in the main process by
:class:`~megatron_dga.data.sampler.DynamicMixtureSampler`; DataLoader workers only read
samples. So a weight change made by the trainer reaches the data without talking to
the workers.

Loading: :class:`StepLoader`. The trainer asks for each step explicitly::

      loader = StepLoader(dataset, sampler, dp_rank, dp_size, num_workers=2)
      for step in range(steps):
          for micro_batch in loader.next_step():   # draws the global batch NOW
              ...
          sampler.set_weights(new_weights)          # applies to the next next_step()

  ``next_step()`` draws one global batch with the weights current at that call and
  returns an iterator over this rank's collated micro-batches. Worker prefetching
  (``prefetch_factor``) stays inside that global batch: it can never run ahead into a
  batch drawn with stale weights. Workers are persistent across steps.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from megatron_dga.data.sampler import DynamicMixtureSampler, check_batch_geometry, rank_micro_batches
from megatron_dga.errors import ConfigError, DataError


class MultiSource:
    """Many sources in one object, for when one dataset object per source would not scale.

    A :class:`MixtureDataset` part is either one dataset (one source) or a ``MultiSource``
    standing for ``len(num_samples)`` consecutive sources, e.g. the K = 262,144 fine domains of
    a domain map (``megatron_dga.data.fine_domains.FineDomains``), with no per-source object.
    Subclasses set :attr:`num_samples` and implement :meth:`get`.
    """

    num_samples: np.ndarray
    """int64 (n,): samples of each source; zero is allowed (an empty source is never sampled)."""

    def get(self, source: int, index: int) -> Dict[str, Any]:
        """Sample ``index`` of local source ``source`` as a dict of tensors or arrays."""
        raise NotImplementedError

    def source_name(self, source: int) -> str:
        """Name of local source ``source`` in error messages."""
        return f"source {source}"

    def source_path(self, source: int, index: int) -> Optional[str]:
        """The shard prefix a sample was read from (named in errors), if known."""
        return None


class MixtureDataset(torch.utils.data.Dataset):
    """Map-style dataset over several sources, indexed by ``(domain_id, sample_index)``.

    Args:
        domain_datasets: the training domains, in source-id order: datasets (e.g. megatron-core
            ``GPTDataset`` s, one source each) and/or :class:`MultiSource` objects (``n``
            consecutive sources each).
        held_out_datasets: extra sources (the specific set, held-out evaluation sets), same
            kinds, with the ids after the domains', matching the sampler's ``held_out_sizes``.
        vocab_size: when given, every batch collated through :meth:`load` or
            :class:`StepLoader` must hold token ids in ``[0, vocab_size)``
            (:meth:`check_token_ids`).
        source_names: names of the sources in error messages: one per source, or a function of
            the source id (default: a MultiSource's own names, else ``source <id>``).

    ``dataset[(d, i)]`` returns source d's sample i as a dict of tensors (numpy arrays
    are converted) with an extra ``domain_id`` (int64 scalar tensor).
    """

    def __init__(
        self,
        domain_datasets: Sequence[Any],
        held_out_datasets: Sequence[Any] = (),
        vocab_size: Optional[int] = None,
        source_names: Optional[Union[Sequence[str], Callable[[int], str]]] = None,
    ) -> None:
        self._parts = list(domain_datasets) + list(held_out_datasets)
        counts = [len(p.num_samples) if isinstance(p, MultiSource) else 1 for p in self._parts]
        self.num_domains = int(sum(counts[: len(domain_datasets)]))
        if self.num_domains == 0:
            raise ConfigError("MixtureDataset needs at least one domain dataset")
        # Source id -> part: the first source id of every part (few parts, any number of sources).
        self._part_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.sizes = np.concatenate(
            [
                np.asarray(p.num_samples, dtype=np.int64)
                if isinstance(p, MultiSource)
                else np.array([len(p)], dtype=np.int64)
                for p in self._parts
            ]
        )
        self.vocab_size = vocab_size
        self._names = source_names
        if source_names is not None and not callable(source_names) and len(source_names) != len(self.sizes):
            raise ConfigError(f"{len(source_names)} source names for {len(self.sizes)} sources")

    @property
    def num_sources(self) -> int:
        """Training domains plus held-out sources."""
        return int(self.sizes.size)

    def _locate(self, source: int):
        """(part, local source id) of a global source id."""
        p = int(np.searchsorted(self._part_start, source, side="right")) - 1
        return self._parts[p], source - int(self._part_start[p])

    def source_name(self, source: int) -> str:
        if self._names is not None:
            return self._names(source) if callable(self._names) else self._names[source]
        part, local = self._locate(source)
        return part.source_name(local) if isinstance(part, MultiSource) else f"source {source}"

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def __getitem__(self, key) -> Dict[str, torch.Tensor]:
        domain_id, sample_index = int(key[0]), int(key[1])
        if not 0 <= domain_id < self.num_sources:
            raise IndexError(f"domain id {domain_id} is outside [0, {self.num_sources})")
        if not 0 <= sample_index < self.sizes[domain_id]:
            raise IndexError(f"sample {sample_index} is outside domain {domain_id} of size {self.sizes[domain_id]}")
        part, local = self._locate(domain_id)
        sample = part.get(local, sample_index) if isinstance(part, MultiSource) else part[sample_index]
        out = {
            name: (torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v)
            for name, v in sample.items()
        }
        out["domain_id"] = torch.tensor(domain_id, dtype=torch.int64)
        return out

    def load(self, keys: np.ndarray) -> Dict[str, torch.Tensor]:
        """Read and collate the samples of an index array (e.g. a probe batch) in this process."""
        keys = np.asarray(keys)
        return self.check_token_ids(collate_samples([self[k] for k in keys]), keys)

    def check_token_ids(self, batch: Dict[str, torch.Tensor], keys) -> Dict[str, torch.Tensor]:
        """Return ``batch`` if its token ids lie in ``[0, vocab_size)``, else raise DataError.

        The start-up scan of a shard without a sidecar reads a bounded sample only
        (``DomainDatasetConfig.token_id_sample_bytes``); this catches the rest for one
        min/max reduction per tensor, before the embedding fails with a bare IndexError.

        Args:
            batch: a collated batch (``tokens`` and, for GPT samples, ``labels``).
            keys: its ``(source_id, sample_index)`` rows, in batch order (named in the error).
        """
        if self.vocab_size is None:
            return batch
        for name in ("tokens", "labels"):
            ids = batch.get(name)
            if ids is None or ids.numel() == 0:
                continue
            low, high = torch.aminmax(ids)
            if int(low) >= 0 and int(high) < self.vocab_size:
                continue
            bad = (ids < 0) | (ids >= self.vocab_size)
            row = int(bad.reshape(len(ids), -1).any(dim=1).nonzero()[0])
            value = int(ids[row][bad[row]][0])
            source, sample = (int(x) for x in keys[row])
            part, local = self._locate(source)
            path = (
                part.source_path(local, sample)
                if isinstance(part, MultiSource)
                else getattr(part, "dataset_path", None)
            )
            raise DataError(
                f"{self.source_name(source)}{f' ({path}.bin)' if path else ''}, sample {sample}: {name} hold id "
                f"{value}, outside the vocabulary [0, {self.vocab_size}); the shard was tokenized with another "
                "tokenizer: train with the one the shards were made with (--tokenizer-model/--vocab-file, or a "
                "--vocab-size above the largest id for NullTokenizer), or re-run preprocessing with this one"
            )
        return batch


def collate_samples(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack a list of sample dicts into a dict of batched tensors (leading batch dim)."""
    if not samples:
        raise ValueError("cannot collate an empty micro-batch")
    return {name: torch.stack([s[name] for s in samples]) for name in samples[0]}


def _as_key_list(rows: np.ndarray) -> List[tuple]:
    return [(int(d), int(i)) for d, i in rows]


class _CurrentStepSampler:
    """Batch sampler yielding the micro-batches of the step the loader set last."""

    def __init__(self) -> None:
        self.micro_batches: List[List[tuple]] = []

    def __iter__(self):
        return iter(self.micro_batches)

    def __len__(self) -> int:
        return len(self.micro_batches)


class StepLoader:
    """Loads this rank's micro-batches one global batch (optimizer step) at a time.

    Args:
        dataset: the :class:`MixtureDataset`.
        sampler: the shared :class:`DynamicMixtureSampler` (same on every rank).
        dp_rank: this rank's data-parallel index.
        dp_size: the data-parallel world size.
        num_workers: DataLoader worker processes (0: read in this process).
        pin_memory: pin host memory for faster host-to-GPU copies.
        prefetch_factor: micro-batches each worker reads ahead (within the step).
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        sampler: DynamicMixtureSampler,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: Optional[int] = None,
    ) -> None:
        check_batch_geometry(sampler.config.global_batch_size, sampler.config.micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
        if num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {num_workers}")
        self.dataset, self.sampler = dataset, sampler
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.last_global_batch: Optional[np.ndarray] = None
        self.group_by_domain = False
        """Sort each global batch by domain (stably) before it is cut over ranks and into micro-batches: the
        same samples, grouped so that most micro-batches hold one domain (DGA's in-step estimator). With a
        basis, by each row's basis label (``sampler.basis_labels``), which each micro-batch then carries as
        ``basis_id``."""
        self._workers, self._pin_memory = num_workers, pin_memory
        self._step_sampler = _CurrentStepSampler()
        kwargs: Dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor or 2)
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self._step_sampler,
            num_workers=num_workers,
            collate_fn=collate_samples,
            pin_memory=pin_memory,
            **kwargs,
        )

    def next_step(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Draw the next global batch (current weights) and iterate this rank's micro-batches.

        Returns:
            Iterator of collated micro-batches, in order; the global batch drawn is kept in
            :attr:`last_global_batch`.
        """
        batch = self.sampler.global_batch()
        # The next step's global batch is computed while this step runs (the same batch either way).
        self.sampler.prefetch()
        labels = None
        if self.group_by_domain:
            labels = self.sampler.basis_labels(batch) if self.sampler.has_basis else batch[:, 0]
            order = np.argsort(labels, kind="stable")
            batch, labels = batch[order], labels[order]
        self.last_global_batch = batch
        if self._workers == 0:
            # Read in this process, without a DataLoader iterator per step (it would read the same way).
            micro_batches = self._read_rows(batch)
        else:
            mbs = self.sampler.rank_micro_batches(batch, self.dp_rank, self.dp_size)
            keys = [_as_key_list(m) for m in mbs]
            self._step_sampler.micro_batches = keys
            # Checked here, in the main process: an error raised inside a worker would come back
            # wrapped in the worker's traceback text. The DataLoader yields batches in order.
            micro_batches = (self.dataset.check_token_ids(mb, k) for mb, k in zip(self._loader, keys))
        if labels is None or not self.sampler.has_basis:
            return iter(micro_batches)
        mine = rank_micro_batches(labels, self.dp_rank, self.dp_size, self.sampler.config.micro_batch_size)
        return ({**mb, "basis_id": torch.as_tensor(ids)} for mb, ids in zip(micro_batches, mine))

    def _read_rows(self, batch: np.ndarray) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``batch``, read and collated in this process."""
        out = []
        for rows in self.sampler.rank_micro_batches(batch, self.dp_rank, self.dp_size):
            micro = self.dataset.load(rows)
            out.append({k: v.pin_memory() for k, v in micro.items()} if self._pin_memory else micro)
        return out
