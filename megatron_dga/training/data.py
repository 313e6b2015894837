"""The trainer's data: tokenizer, the domains, the dynamic sampler.

The domains are one megatron GPTDataset per --data-path prefix, or, with --domain-map, the
map's K fine domains inside those shards (one ``FineDomains`` object for all of them).
Sources, in sampler id order: the k training domains, then their per-domain eval sources
(held-out parts; with a hierarchical map one per top-level cluster), then (when given) the
specific train set (probes for g_spe) and the specific eval set. Every rank holds the same
sampler and draws the same ids; each then takes its data-parallel share. Sample ids
are computed in the main process, so a weight change applies from the very next global
batch (no prefetch runs ahead of the trainer).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_dga.data.domain_map import check_map_matches_shards, read_domain_map
from megatron_dga.data.domains import DomainDatasetConfig, build_domain_datasets, parse_data_path
from megatron_dga.data.fine_domains import build_fine_domains
from megatron_dga.data.mixture import MixtureDataset, MultiSource, StepLoader
from megatron_dga.data.mock import write_mock_corpus
from megatron_dga.data.sampler import (
    DynamicMixtureSampler,
    MixtureSamplerConfig,
    rank_micro_batches,
    rank_probe_groups,
)
from megatron_dga.data.tokenizers import build_tokenizer
from megatron_dga.errors import ConfigError, DataError
from megatron_dga.mixing.base import DomainInfo
from megatron_dga.platform import ParallelContext
from megatron_dga.training.config import PretrainConfig

logger = logging.getLogger(__name__)


def _part_sizes(part) -> List[int]:
    """Samples per source of a MixtureDataset part (a dataset, or a MultiSource)."""
    return list(part.num_samples) if isinstance(part, MultiSource) else [len(part)]


def _check_probes_reach_every_domain(cfg: PretrainConfig, dom: "_Domains") -> None:
    """A strategy that probes every domain at every update (DGA without a basis, PiKE): an empty fine domain
    is refused now, not at the first update."""
    mixing = cfg.mixing
    if not mixing.probes_every_domain:
        return
    empty = np.flatnonzero(dom.num_samples == 0)
    if empty.size:
        shown = ", ".join(dom.names[i] for i in empty[:5]) + (" ..." if empty.size > 5 else "")
        instead = (
            "reweight basis distributions instead (--dga-basis FILE, from tools/importance_weights.py "
            "--domain-map ... --basis-sets ... --basis-output FILE)"
            if mixing.strategy == "dga"
            else "use --mixing odm (no probes) or --mixing dga --dga-basis FILE"
        )
        raise ConfigError(
            f"--mixing {mixing.strategy} probes every domain at each update, but {empty.size} of the {len(dom.names)} "
            f"fine domains of --domain-map {cfg.data.domain_map} hold no full sample of --seq-length "
            f"{cfg.model.seq_length} + 1 tokens ({shown}); {instead}, or cluster into fewer fine domains"
        )


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


class _SourceNames:
    """Source id -> name in error messages; picklable (DataLoader workers receive the dataset).

    ``extra`` and ``listed`` name single sources; ``multi`` holds ``(first id, MultiSource, suffix)``
    for sources named by a MultiSource part (a FineDomains names its own fine domains).
    """

    def __init__(self, listed: Sequence[str] = (), multi: Sequence[Tuple[int, MultiSource, str]] = ()):
        self.listed, self.multi, self.extra = list(listed), list(multi), {}

    def __call__(self, source: int) -> str:
        if source in self.extra:
            return self.extra[source]
        for start, part, suffix in self.multi:
            if start <= source < start + len(part.num_samples):
                return part.source_name(source - start) + suffix
        return self.listed[source] if source < len(self.listed) else f"source {source}"


@dataclass
class _Domains:
    """The training domains and their per-domain eval sources, before the specific sets are added."""

    names: List[str]
    """Domain names in sampler order."""
    num_samples: np.ndarray
    """int64 (k,): samples per domain (0 for an empty fine domain)."""
    num_tokens: np.ndarray
    """int64 (k,): tokens per domain."""
    parts: List[Any]
    """MixtureDataset parts of the k domains: one GPTDataset each, or one FineDomains for all."""
    eval_parts: List[Any] = field(default_factory=list)
    """Held-out parts for the per-domain eval loss (source ids k, k+1, ... in order)."""
    eval_names: Optional[List[str]] = None
    """What each eval loss is over: the domains, or the map's top-level clusters; None skips the eval."""
    eval_on_training: bool = False
    """The eval sources are training domains (no held-out part): ``eval_ids`` index the domains."""
    eval_ids: Optional[List[int]] = None
    """With eval_on_training: the domain ids evaluated (all, or the non-empty fine domains)."""
    source_name: Optional["_SourceNames"] = None
    """Source id -> name in errors, for ids below k + len(eval sources)."""
    static_weights: Optional[List[float]] = None
    """The weights of --data-path W1 P1 ... (never with a map)."""
    groups: Optional[np.ndarray] = None
    """int64 (k,): each fine domain's top-level cluster, for the log summaries (hierarchical maps)."""
    group_names: Optional[List[str]] = None
    """Names of the top-level clusters."""


class DataPipeline:
    """Builds the datasets and turns sampler ids into this rank's micro-batches."""

    def __init__(self, cfg: PretrainConfig, ctx: ParallelContext):
        data, sched = cfg.data, cfg.schedule
        self.ctx = ctx
        self.micro_batch_size = sched.micro_batch_size
        self.tokenizer = build_tokenizer(
            data.tokenizer_type,
            tokenizer_model=data.tokenizer_model,
            vocab_file=data.vocab_file,
            merge_file=data.merge_file,
            vocab_size=data.vocab_size,
        )
        specific_data_path = data.specific_data_path
        if data.mock_data:
            names, prefixes, static, mock_specific = self._write_mock_data(cfg)
            specific_data_path = specific_data_path or mock_specific
        else:
            names, prefixes, static = parse_data_path(data.data_path)
        ds_cfg = DomainDatasetConfig(
            sequence_length=cfg.model.seq_length, seed=cfg.parallel.seed, path_to_cache=data.data_cache_path
        )
        if data.domain_map:
            dom = self._fine_domains(
                data.domain_map, prefixes, ds_cfg, data.train_fraction, cfg.logging.log_domains_limit
            )
            _check_probes_reach_every_domain(cfg, dom)
        else:
            dom = self._shard_domains(names, prefixes, static, ds_cfg, data)
        k = len(dom.names)
        self.domain_names, self.eval_names = dom.names, dom.eval_names
        self.domain_groups, self.domain_group_names = dom.groups, dom.group_names
        held_out = [int(n) for part in dom.eval_parts for n in _part_sizes(part)]
        first_eval = k
        self.eval_ids: Optional[List[int]] = (
            dom.eval_ids
            if dom.eval_on_training
            else list(range(first_eval, first_eval + len(held_out)))
            if dom.eval_names is not None
            else None
        )
        extra_parts, extra_names = [], {}
        self.specific_id = self.specific_eval_id = None
        for attr, path, flag in (
            ("specific_id", specific_data_path, "--specific-data-path"),
            ("specific_eval_id", data.specific_eval_data_path, "--specific-eval-data-path"),
        ):
            if path:
                extra = build_domain_datasets([path], self.tokenizer, ds_cfg, names=[flag.strip("-")])
                setattr(self, attr, k + len(held_out))
                extra_names[k + len(held_out)] = flag
                extra_parts.append(extra.datasets[0])
                held_out.append(int(extra.num_samples[0]))
        limits = _token_limits(data.domain_token_limit, k)
        self.sampler = DynamicMixtureSampler(
            dom.num_samples,
            MixtureSamplerConfig(
                global_batch_size=sched.global_batch_size,
                micro_batch_size=sched.micro_batch_size,
                seed=cfg.parallel.seed,
                sequence_length=cfg.model.seq_length,
                token_limits=limits,
                data_parallel_size=ctx.dp_size,
            ),
            domain_names=dom.names,
            held_out_sizes=held_out,
        )
        dom.source_name.extra.update(extra_names)  # errors name a bad sample's source
        self.dataset = MixtureDataset(
            dom.parts, dom.eval_parts + extra_parts, vocab_size=self.tokenizer.vocab_size, source_names=dom.source_name
        )
        # Training batches through DataLoader workers (--num-workers); indices stay in this process.
        self.loader = StepLoader(
            self.dataset,
            self.sampler,
            ctx.dp_rank,
            ctx.dp_size,
            num_workers=data.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        access = self.sampler.accessible_sizes
        self.domain_info = DomainInfo(
            names=list(dom.names),
            num_samples=access,
            num_tokens=np.minimum(dom.num_tokens, access * cfg.model.seq_length) if limits else dom.num_tokens,
            static_weights=None if dom.static_weights is None else np.asarray(dom.static_weights, dtype=np.float64),
        )

    def _shard_domains(self, names, prefixes, static, ds_cfg: DomainDatasetConfig, data) -> _Domains:
        """One megatron GPTDataset per --data-path prefix; held-out parts from --split or the "valid" shards."""
        train_fraction = data.train_fraction
        domains = build_domain_datasets(prefixes, self.tokenizer, ds_cfg, names=names, documents=(0.0, train_fraction))
        source_names = [f"domain {n!r}" for n in names]
        # Per-domain held-out sets for the domain eval loss: the "valid" shards of
        # --per-split-data-args-path, else the --split part not trained on.
        valid, valid_prefixes = None, data.per_split_valid_prefixes
        if valid_prefixes is not None:
            valid = build_domain_datasets(valid_prefixes, self.tokenizer, ds_cfg, names=names)
        elif train_fraction < 1.0:
            valid = build_domain_datasets(
                prefixes, self.tokenizer, ds_cfg, names=names, documents=(train_fraction, 1.0)
            )
        dom = _Domains(
            names=list(names),
            num_samples=domains.num_samples,
            num_tokens=domains.num_tokens,
            parts=list(domains.datasets),
            eval_names=list(names),
            static_weights=static,
        )
        if valid is None:
            dom.eval_on_training, dom.eval_ids = True, list(range(len(names)))
        else:
            dom.eval_parts = list(valid.datasets)
            source_names.extend(f"domain {n!r} (validation part)" for n in names)
        dom.source_name = _SourceNames(listed=source_names)
        return dom

    def _fine_domains(
        self,
        map_path: str,
        prefixes: Sequence[str],
        ds_cfg: DomainDatasetConfig,
        train_fraction: float,
        eval_limit: int,
    ) -> _Domains:
        """The fine domains of --domain-map over the --data-path shards, all in one FineDomains.

        Per-domain eval: a hierarchical map evaluates each top-level cluster (its held-out documents
        packed as one source); a flat map each fine domain when there are at most ``eval_limit``
        (--log-domains-limit), else none (one INFO line). Groups without a full sample are left out.
        """
        dmap = read_domain_map(map_path)
        order = check_map_matches_shards(dmap, prefixes, map_path)
        prefixes = [prefixes[i] for i in order]
        hashes = [s.idx_sha256 for s in dmap.shards]
        k = dmap.num_domains
        names = dmap.domain_names()
        train = build_fine_domains(
            prefixes,
            dmap.domain_ids,
            k,
            self.tokenizer,
            ds_cfg,
            documents=(0.0, train_fraction),
            shard_sha256=hashes,
            names=names,
        )
        if not train.num_samples.any():
            raise DataError(
                f"--domain-map {map_path}: no fine domain holds a full sample of --seq-length "
                f"{ds_cfg.sequence_length} + 1 tokens in its training documents; add data, lower "
                "--seq-length, or cluster into fewer domains"
            )
        empty = int(np.count_nonzero(train.num_samples == 0))
        logger.info(
            "--domain-map %s: %d fine domains (levels %s) over %d documents of %d shards; %d hold no full "
            "sample and are never drawn",
            map_path,
            k,
            dmap.levels,
            dmap.num_documents,
            len(prefixes),
            empty,
        )
        dom = _Domains(names=names, num_samples=train.num_samples, num_tokens=train.num_tokens, parts=[train])
        held_out = (train_fraction, 1.0) if train_fraction < 1.0 else (0.0, 1.0)
        if len(dmap.levels) > 1:
            dom.groups = np.arange(k, dtype=np.int64) // (k // dmap.levels[0])
            dom.group_names = dmap.group_names(0)
            clusters = build_fine_domains(
                prefixes,
                dmap.group_ids(0),
                dmap.levels[0],
                self.tokenizer,
                ds_cfg,
                documents=held_out,
                shard_sha256=hashes,
                names=dom.group_names,
            )
            keep = np.flatnonzero(clusters.num_samples > 0)
            dom.eval_parts = [clusters.select(keep)] if keep.size else []
            dom.eval_names = [dom.group_names[g] for g in keep]
            what = "top-level cluster"
        elif k <= eval_limit and train_fraction < 1.0:
            valid = build_fine_domains(
                prefixes,
                dmap.domain_ids,
                k,
                self.tokenizer,
                ds_cfg,
                documents=held_out,
                shard_sha256=hashes,
                names=names,
            )
            keep = np.flatnonzero(valid.num_samples > 0)
            dom.eval_parts = [valid.select(keep)] if keep.size else []
            dom.eval_names = [names[j] for j in keep]
            what = "fine domain"
        elif k <= eval_limit:  # --split 100,0: evaluate on training samples, as without a map
            dom.eval_on_training = True
            dom.eval_ids = np.flatnonzero(train.num_samples > 0).tolist()
            dom.eval_names = [names[j] for j in dom.eval_ids]
            what = "fine domain"
        else:
            logger.info(
                "--domain-map %s: per-domain eval skipped: %d fine domains in a flat map, more than "
                "--log-domains-limit %d (a hierarchical map is evaluated per top-level cluster); the specific "
                "eval still runs",
                map_path,
                k,
                eval_limit,
            )
            what = None
        if what is not None and not dom.eval_names:
            logger.warning("--domain-map %s: no %s has a full held-out sample; per-domain eval skipped", map_path, what)
        dom.source_name = _SourceNames(
            multi=[(0, train, "")] + [(k, part, " (held-out part)") for part in dom.eval_parts]
        )
        return dom

    def _write_mock_data(self, cfg: PretrainConfig):
        """--mock-data: synthetic shards in a temporary directory that lives as long as this pipeline.

        Returns the domains' (names, prefixes, weights=None) and the specific set's prefix.
        """
        self._mock_dir = tempfile.TemporaryDirectory(prefix="megatron-dga-mock-")
        shards = write_mock_corpus(
            self._mock_dir.name,
            vocab_size=self.tokenizer.vocab_size,
            eod=self.tokenizer.eod,
            seq_length=cfg.model.seq_length,
            seed=cfg.parallel.seed,
            tokenizer_type=cfg.data.tokenizer_type,
        )
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
        return [
            self.fetch(mb) for mb in rank_micro_batches(rows, self.ctx.dp_rank, self.ctx.dp_size, self.micro_batch_size)
        ]

    def probe_domain(self, domain: int, size: int, groups: int = 0):
        return self._probe_share(self.sampler.probe_batch(domain, size), groups)

    def probe_basis(self, basis: int, size: int, groups: int = 0):
        return self._probe_share(self.sampler.probe_batch_from_basis(basis, size), groups)

    def _probe_share(self, rows: np.ndarray, groups: int):
        """This rank's micro-batches of a probe; with ``groups`` > 0 this rank's groups of them (a list of
        micro-batch lists, ``sampler.rank_probe_groups``)."""
        if not groups:
            return self._rank_share(rows)
        ctx = self.ctx
        parts = rank_probe_groups(rows, ctx.dp_rank, ctx.dp_size, groups, self.micro_batch_size)
        return [[self.fetch(mb) for mb in group] for group in parts]

    def check_specific(self, size: int, flag: str) -> None:
        """Errors, before training starts, for a strategy that probes the specific set in batches of ``size``
        (set by ``flag``)."""
        if self.specific_id is None:
            raise ConfigError("this mixing strategy needs the specific set: pass --specific-data-path PREFIX")
        if size % self.ctx.dp_size:
            raise ConfigError(
                f"{flag} {size} must be divisible by the data-parallel size {self.ctx.dp_size} "
                "(the specific gradient is averaged over ranks like a training batch)"
            )

    def probe_specific(self, size: int):
        self.check_specific(size, "the specific probe size")
        return self._rank_share(self.sampler.probe_batch(self.specific_id, size))

    def _eval_rows(self, source: int, iters: int) -> np.ndarray:
        return np.concatenate(self.sampler.eval_batches(source, iters, self.micro_batch_size))

    def specific_eval_micro_batches(self, iters: int):
        return self._rank_share(self._eval_rows(self.specific_eval_id, iters))

    def domain_eval_micro_batches(self, i: int, iters: int):
        """Eval micro-batches of per-domain eval source ``i`` (named ``eval_names[i]``)."""
        return self._rank_share(self._eval_rows(self.eval_ids[i], iters))

    def fetch(self, rows: np.ndarray) -> Dict[str, torch.Tensor]:
        """Collate the samples (source_id, sample_index) in this process, with "domain_id"."""
        return self.dataset.load(rows)

    # ------------------------------------------------------------------ accounting and state

    def consumption_since_last_log(self) -> Dict[str, np.ndarray]:
        c = self.sampler.consumption(reset=True)
        # Arrays: the metrics logger summarises lists longer than --log-domains-limit without a Python list.
        return {"domain_samples": c["samples_delta"], "domain_epochs": c["epochs"]}

    def state_dict(self) -> Dict:
        return self.sampler.state_dict()

    def check_state(self, state, where: str, fix: str, weights_fix: Optional[str]) -> None:
        """The data pipeline's part of a checkpoint: its sampler checks its own entries."""
        self.sampler.check_state(state, where, fix, weights_fix)

    def load_state_dict(self, state: Dict) -> None:
        self.sampler.load_state_dict(state)
