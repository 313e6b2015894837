"""The trainer's data: tokenizer, per-domain megatron GPTDatasets, the dynamic sampler.

Sources, in sampler id order: the k training domains, then (when given) the specific
train set (probes for g_spe) and the specific eval set. Every rank holds the same
sampler and draws the same ids; each then takes its data-parallel share. Sample ids
are computed in the main process, so a weight change applies from the very next global
batch (no prefetch runs ahead of the trainer).
"""
from __future__ import annotations

import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_dga.data.domains import DomainDatasetConfig, build_domain_datasets, parse_data_path
from megatron_dga.data.mixture import MixtureDataset, StepLoader
from megatron_dga.data.mock import write_mock_corpus
from megatron_dga.data.sampler import DynamicMixtureSampler, MixtureSamplerConfig
from megatron_dga.data.tokenizers import build_tokenizer
from megatron_dga.errors import ConfigError
from megatron_dga.mixing.base import DomainInfo
from megatron_dga.platform import ParallelContext
from megatron_dga.training.config import PretrainConfig

def _token_limits(values: Optional[List[int]], k: int) -> Optional[List[Optional[int]]]:
    """--domain-token-limit as the sampler's per-domain list (None = unlimited)."""
    if not values:
        return None
    if len(values) not in (1, k):
        raise ConfigError(
            f"--domain-token-limit has {len(values)} values for {k} domains; give one for all or one per domain"
        )
    per_domain = values * k if len(values) == 1 else list(values)
    limits = [v if v > 0 else None for v in per_domain]
    return limits if any(v is not None for v in limits) else None


class DataPipeline:
    """Builds the datasets and turns sampler ids into this rank's micro-batches."""

    def __init__(self, cfg: PretrainConfig, ctx: ParallelContext):
        data, sched = cfg.data, cfg.schedule
        self.ctx = ctx
        self.micro_batch_size = sched.micro_batch_size
        self.tokenizer = build_tokenizer(
            data.tokenizer_type, tokenizer_model=data.tokenizer_model, vocab_file=data.vocab_file,
            merge_file=data.merge_file, vocab_size=data.vocab_size,
        )
        specific_data_path = data.specific_data_path
        if data.mock_data:
            names, prefixes, static, mock_specific = self._write_mock_data(cfg)
            specific_data_path = specific_data_path or mock_specific
        else:
            names, prefixes, static = parse_data_path(data.data_path)
        ds_cfg = DomainDatasetConfig(sequence_length=cfg.model.seq_length, seed=cfg.parallel.seed,
                                     path_to_cache=data.data_cache_path)
        train_fraction = data.train_fraction
        self.domains = build_domain_datasets(prefixes, self.tokenizer, ds_cfg, names=names,
                                             documents=(0.0, train_fraction))
        sources = list(self.domains.datasets)
        source_names = [f"domain {n!r}" for n in names]  # for errors naming a bad sample's source
        held_out = []
        # Per-domain held-out sets for the domain eval loss: the "valid" shards of
        # --per-split-data-args-path, else the --split part not trained on.
        self.valid_ids: Optional[List[int]] = None
        valid, valid_prefixes = None, data.per_split_valid_prefixes
        if valid_prefixes is not None:
            valid = build_domain_datasets(valid_prefixes, self.tokenizer, ds_cfg, names=names)
        elif train_fraction < 1.0:
            valid = build_domain_datasets(prefixes, self.tokenizer, ds_cfg, names=names,
                                          documents=(train_fraction, 1.0))
        if valid is not None:
            self.valid_ids = list(range(len(sources), len(sources) + len(valid)))
            sources.extend(valid.datasets)
            source_names.extend(f"domain {n!r} (validation part)" for n in names)
            held_out.extend(int(n) for n in valid.num_samples)
        self.specific_id = self.specific_eval_id = None
        for attr, path, flag in (("specific_id", specific_data_path, "--specific-data-path"),
                                 ("specific_eval_id", data.specific_eval_data_path, "--specific-eval-data-path")):
            if path:
                extra = build_domain_datasets([path], self.tokenizer, ds_cfg, names=[flag.strip("-")])
                setattr(self, attr, len(sources))
                sources.append(extra.datasets[0])
                source_names.append(flag)
                held_out.append(int(extra.num_samples[0]))
        k = len(self.domains)
        limits = _token_limits(data.domain_token_limit, k)
        self.sampler = DynamicMixtureSampler(
            self.domains.num_samples,
            MixtureSamplerConfig(
                global_batch_size=sched.global_batch_size, micro_batch_size=sched.micro_batch_size,
                seed=cfg.parallel.seed, sequence_length=cfg.model.seq_length, token_limits=limits,
                data_parallel_size=ctx.dp_size,
            ),
            domain_names=names,
            held_out_sizes=held_out,
        )
        self.dataset = MixtureDataset(sources[:k], sources[k:], vocab_size=self.tokenizer.vocab_size,
                                      source_names=source_names)
        # Training batches through DataLoader workers (--num-workers); indices stay in this process.
        self.loader = StepLoader(self.dataset, self.sampler, ctx.dp_rank, ctx.dp_size, num_workers=data.num_workers,
                                 pin_memory=torch.cuda.is_available())
        access = self.sampler.accessible_sizes
        self.domain_info = DomainInfo(
            names=list(names),
            num_samples=access,
            num_tokens=np.minimum(self.domains.num_tokens, access * cfg.model.seq_length)
            if limits else self.domains.num_tokens,
            static_weights=None if static is None else np.asarray(static, dtype=np.float64),
        )

    def _write_mock_data(self, cfg: PretrainConfig):
        """--mock-data: synthetic shards in a temporary directory that lives as long as this pipeline.

        Returns the domains' (names, prefixes, weights=None) and the specific set's prefix.
        """
        self._mock_dir = tempfile.TemporaryDirectory(prefix="megatron-dga-mock-")
        shards = write_mock_corpus(self._mock_dir.name, vocab_size=self.tokenizer.vocab_size, eod=self.tokenizer.eod,
                                   seq_length=cfg.model.seq_length, seed=cfg.parallel.seed,
                                   tokenizer_type=cfg.data.tokenizer_type)
        return (*parse_data_path(shards["domains"]), shards["mock_specific"])

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def weights(self) -> np.ndarray:
        """Current per-domain sampling weights (alpha; gamma^T P with a basis)."""
        return self.sampler.weights

    @property
    def has_specific_eval(self) -> bool:
        return self.specific_eval_id is not None

    def set_basis(self, basis) -> None:
        self.sampler.set_basis(basis.matrix, basis_names=basis.basis_names)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Weights over the domains, or over the basis distributions once a basis is set."""
        if self.sampler.has_basis:
            self.sampler.set_basis_weights(weights)
        else:
            self.sampler.set_weights(weights)

    # ------------------------------------------------------------------ batches

    def next_train_micro_batches(self) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch, drawn with the current weights."""
        return list(self.loader.next_step())

    def _rank_share(self, rows: np.ndarray) -> List[Dict[str, torch.Tensor]]:
        """This data-parallel rank's contiguous share of rows, cut into micro-batches."""
        mine = np.array_split(rows, self.ctx.dp_size)[self.ctx.dp_rank]
        mbs = self.micro_batch_size
        return [self.fetch(mine[i:i + mbs]) for i in range(0, len(mine), mbs)]

    def probe_domain(self, domain: int, size: int):
        return self._rank_share(self.sampler.probe_batch(domain, size))

    def probe_basis(self, basis: int, size: int):
        return self._rank_share(self.sampler.probe_batch_from_basis(basis, size))

    def check_specific(self, size: int) -> None:
        """Errors, before training starts, for a strategy that probes the specific set."""
        if self.specific_id is None:
            raise ConfigError("this mixing strategy needs the specific set: pass --specific-data-path PREFIX")
        if size % self.ctx.dp_size:
            raise ConfigError(
                f"--dga-specific-batch-size {size} must be divisible by the data-parallel size {self.ctx.dp_size} "
                "(the specific gradient is averaged over ranks like a training batch)"
            )

    def probe_specific(self, size: int):
        self.check_specific(size)
        return self._rank_share(self.sampler.probe_batch(self.specific_id, size))

    def _eval_rows(self, source: int, iters: int) -> np.ndarray:
        return np.concatenate(self.sampler.eval_batches(source, iters, self.micro_batch_size))

    def specific_eval_micro_batches(self, iters: int):
        return self._rank_share(self._eval_rows(self.specific_eval_id, iters))

    def domain_eval_micro_batches(self, domain: int, iters: int):
        source = domain if self.valid_ids is None else self.valid_ids[domain]
        return self._rank_share(self._eval_rows(source, iters))

    def fetch(self, rows: np.ndarray) -> Dict[str, torch.Tensor]:
        """Collate the samples (source_id, sample_index) in this process, with "domain_id"."""
        return self.dataset.load(rows)

    # ------------------------------------------------------------------ accounting and state

    def consumption_since_last_log(self) -> Dict[str, List[float]]:
        c = self.sampler.consumption(reset=True)
        return {"domain_samples": c["samples_delta"].tolist(), "domain_epochs": c["epochs"].tolist()}

    def state_dict(self) -> Dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict) -> None:
        self.sampler.load_state_dict(state)
