"""The mixing interface: how a strategy sees the trainer and hands back domain weights.

A strategy is a small object: state in, weights out. The trainer calls
``initial_weights()`` once, then ``after_step(view)`` after every optimizer step; a
returned vector replaces the sampler's weights from the next global batch on. The
``TrainerView`` gives what online methods like DGA need (extra forward/backward probes,
the grad buffers, the optimizer's second moments, collectives) without exposing the
loop, so a new strategy never touches the trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Type

import numpy as np
import torch

from megatron_dga.errors import ConfigError, NumericalError
from megatron_dga.mixing.config import MixingConfig


@dataclass
class DomainInfo:
    """What a strategy knows about the generic domains."""

    names: List[str]
    """Domain names in sampler order (shard basenames without _text_document)."""
    num_samples: np.ndarray
    """Sequences available per domain (after any token limit)."""
    num_tokens: np.ndarray
    """Tokens available per domain (after any token limit)."""
    static_weights: Optional[np.ndarray] = None
    """Weights given with --data-path W1 P1 ..., normalised; None for plain prefixes."""

    @property
    def k(self) -> int:
        return len(self.names)


class TrainerView(Protocol):
    """The trainer as a mixing strategy sees it (implemented in training/view.py)."""

    iteration: int
    """Optimizer steps completed so far."""

    global_batch_size: int
    """Sequences per training step over all data-parallel ranks."""

    def track_domain_losses(self) -> None:
        """At setup: every training step also sums its token losses per domain (for step_domain_losses)."""

    def step_domain_losses(self) -> torch.Tensor:
        """After a step: (2, k) float64 on the device, per domain the token-loss sum and token count of the
        last training step over all ranks; identical on every rank (one all-reduce of 2k values)."""

    def observe_training_backward(self, fn) -> None:
        """At setup: each training step's global batch is grouped by domain (the same samples, most
        micro-batches of one domain), and ``fn(i, n, micro_batch)`` is called once micro-batch ``i`` of this
        rank's ``n`` has accumulated its gradient / ``n`` into the grad buffers, before any reduction."""

    def probe_domain(self, domain: int, size: int, groups: int = 0) -> List:
        """This rank's micro-batches of a fixed-size probe batch from one domain; with ``groups`` > 0 the
        batch is cut into that many contiguous groups over all ranks and this rank gets its groups, each a
        list of micro-batches (``data.sampler.rank_probe_groups``)."""

    def probe_basis(self, basis: int, size: int, groups: int = 0) -> List:
        """Like probe_domain, with fine domains drawn from basis distribution P_n."""

    def probe_specific(self, size: int) -> List[Dict[str, torch.Tensor]]:
        """This rank's micro-batches of a probe batch from the specific set."""

    def set_basis(self, basis) -> None:
        """At setup: sample the fine domains from basis distributions; weights are then over its bases."""

    def check_specific(self, size: int, flag: str) -> None:
        """At setup: errors unless the specific set exists and ``size`` (set by ``flag``) splits over the ranks."""

    def backward(self, micro_batches, *, sync_grads: bool):
        """Zero the grad buffers, then accumulate the mean-loss gradient of micro_batches (LossStats).
        The gradient is the true one: with --fp16 the loss scale is divided out."""

    def parameters(self) -> List[torch.nn.Parameter]:
        """This rank's trainable parameters, in the order of grads()."""

    def forward_token_losses(self, micro_batches) -> List[torch.Tensor]:
        """Forward only (no grad): per micro-batch, the masked per-token losses (b, s)."""

    def grads(self) -> List[torch.Tensor]:
        """The grad buffers' per-parameter views (main_grad), in a fixed parameter order."""

    def counted(self) -> List[bool]:
        """Per parameter: counted on this rank (not a TP duplicate, not a tied copy)."""

    def counted_before_reduction(self) -> List[bool]:
        """Per parameter: counted in a sum over this rank's gradients before the step's reduction (not a TP
        duplicate; both tied copies, which each hold their part of the tied gradient until then)."""

    def param_chunks(self) -> List[int]:
        """Per parameter (grads() order): the index of the model chunk (virtual pipeline stage) holding it."""

    def adam_preconditioner(self) -> Optional[Dict[str, object]]:
        """Keyword arguments of ops.grad_dot for Adam's diag(1/(sqrt(v_hat)+eps)):
        {"exp_avg_sq": per-parameter v, "bias_correction2": 1 - beta2^t, "eps": adam eps},
        or None when unavailable (before the first step, or a sharded optimizer)."""

    def all_reduce(self, tensor: torch.Tensor, group: str = "world") -> torch.Tensor:
        """Sum over 'world', 'dp' (data-parallel) or 'mp' (model-parallel) ranks, in place."""

    def data_parallel(self) -> tuple:
        """(dp_rank, dp_size)."""

    def model_parallel_leader(self) -> bool:
        """This rank is the first of its model-parallel group (tensor and pipeline rank 0): it alone
        contributes a value that its model-parallel peers hold too to a sum over the world."""

    def domain_budget(self) -> Dict[str, object]:
        """The training stream's use of the domains: ``distinct`` (k,) samples each domain may use (its
        --domain-token-limit subset, else all of it), ``used`` (k,) samples drawn from each so far, and
        ``remaining``, the training samples still to come (identical on every rank)."""


class MixingStrategy:
    """Base class. Subclasses set ``name`` and override what they need."""

    name: str = ""

    def __init__(self, cfg: MixingConfig, domains: DomainInfo):
        self.cfg = cfg
        self.domains = domains
        self.basis = None
        """A weights_io.Basis when the weights are over basis distributions (N) instead of domains (k)."""
        self.weights: Optional[np.ndarray] = None
        """The current weights, for strategies that change them (their state saves them); None for fixed ones."""

    def setup(self, view: TrainerView) -> None:
        """Called once by the trainer, before the initial weights and any checkpoint load: declare what
        the strategy needs (``view.check_specific`` for the specific set, ``view.set_basis`` for weights
        over basis distributions). Nothing by default."""
        del view

    def initial_weights(self) -> np.ndarray:
        raise NotImplementedError

    def after_step(self, view: TrainerView) -> Optional[np.ndarray]:
        """New weights after this optimizer step, or None to keep the current ones."""
        return None

    def current_weights(self) -> np.ndarray:
        """The weights the sampler draws from now: the strategy is their one owner (on resume, after
        ``load_state_dict``, the trainer hands these to the sampler). A copy."""
        return self.initial_weights() if self.weights is None else self.weights.copy()

    def metrics(self) -> Dict[str, object]:
        """Values to log at the next log line (e.g. alignments); empty by default. Their keys are the
        metrics.jsonl keys; TensorBoard/W&B tags come from mixing/metrics.py."""
        return {}

    @property
    def basis_names(self) -> Optional[List[str]]:
        """Names of the basis distributions the weights are over, or None when they are over the domains."""
        return None if self.basis is None else list(self.basis.basis_names)

    def list_labels(self) -> Dict[str, List[str]]:
        """Metric key -> names of its list's entries, for list metrics not over the domains."""
        return {}

    @property
    def num_weights(self) -> int:
        """Length of the weight vector: the domains, or the basis distributions with a basis."""
        return self.domains.k if self.basis is None else int(self.basis.matrix.shape[0])

    def state_dict(self) -> Dict:
        return {}

    def check_state(self, state, where: str, fix: str) -> None:
        """CheckpointError naming ``where``, the entry and ``fix`` unless ``state`` (a state_dict() as saved)
        is one this strategy can load; called before anything of the checkpoint is loaded. The base checks
        the weights (on the simplex, ``num_weights`` long) when the state holds them; extend it for more."""
        from megatron_dga.state_checks import check_vector, state_error

        if not isinstance(state, dict):
            raise state_error(where, f"mixing state is {type(state).__name__}, expected a dict", fix)
        if state.get("weights") is not None:
            check_vector(state["weights"], self.num_weights, "mixing weights", where, fix, simplex=True)

    def load_state_dict(self, state: Dict) -> None:
        del state


CHECK_WEIGHTS_ENV = "MEGATRON_DGA_CHECK_WEIGHTS"
"""Set to 0 to skip the cross-rank bit-identity check of new weights."""


def check_identical_across_ranks(view: TrainerView, weights: np.ndarray) -> None:
    """Raise NumericalError unless ``weights`` are bit-identical on every rank (every online strategy's
    new weights; set MEGATRON_DGA_CHECK_WEIGHTS=0 to skip it).

    Each float64 is split into its 8 bytes, held exactly as small integers in float64;
    one all-reduce sums n, x and x^2 per byte over the ranks. With integer sums exact
    (< 2^53 up to ~370k ranks), n * sum(x^2) == sum(x)^2 holds iff every rank holds the
    same byte (Cauchy-Schwarz), whatever order the all-reduce adds in.
    """
    if os.environ.get(CHECK_WEIGHTS_ENV, "1") == "0":
        return
    bits = np.ascontiguousarray(weights, dtype=np.float64).view(np.uint64)
    shifts = np.arange(0, 64, 8, dtype=np.uint64)
    chunks = ((bits[None, :] >> shifts[:, None]) & np.uint64(0xFF)).astype(np.float64).ravel()
    t = torch.from_numpy(np.concatenate([[1.0], chunks, chunks * chunks]))
    if view.grads():
        t = t.to(view.grads()[0].device)
    view.all_reduce(t, group="world")
    t = t.cpu().numpy()
    n, s1, s2 = t[0], t[1 : 1 + chunks.size], t[1 + chunks.size :]
    differ = np.flatnonzero((n * s2 != s1 * s1).reshape(8, -1).any(axis=0))
    if differ.size:
        raise NumericalError(
            f"mixing weights differ between ranks for domain indices {differ[:10].tolist()} (this rank: "
            f"{weights[differ[:10]].tolist()}): the ranks would sample different mixtures. The updates "
            "come from all-reduced values, so look for non-deterministic collectives or ranks that loaded "
            f"different checkpoints; {CHECK_WEIGHTS_ENV}=0 disables this check"
        )


_REGISTRY: Dict[str, Type[MixingStrategy]] = {}


def register(name: str) -> Callable[[Type[MixingStrategy]], Type[MixingStrategy]]:
    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> Sequence[str]:
    return sorted(_REGISTRY)


def build_mixing(cfg: MixingConfig, domains: DomainInfo) -> MixingStrategy:
    """The strategy named by --mixing."""
    # The built-in strategies register themselves (@register) when imported.
    import megatron_dga.mixing.dga
    import megatron_dga.mixing.fixed
    import megatron_dga.mixing.odm
    import megatron_dga.mixing.pike  # noqa: F401 - imported for @register

    try:
        cls = _REGISTRY[cfg.strategy]
    except KeyError:
        raise ConfigError(f"--mixing {cfg.strategy!r} is unknown; available: {', '.join(available())}") from None
    return cls(cfg, domains)
