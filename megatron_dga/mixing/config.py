"""The mixing section of the job config: --mixing, the fixed mixtures' inputs and the online strategies' flags.

``MixingConfig`` is the section (its flags are generated from its fields, as every section's);
:func:`check_job` holds the checks that need other sections' values, which the job config
passes in as plain arguments (this package imports nothing from ``training/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

from megatron_dga.config_checks import ReadOnlyOnceParsed, refuse_without
from megatron_dga.errors import ConfigError
from megatron_dga.mixing.initial import check_initial

DGA_MAX_DIRECT_DOMAINS = 256
"""Most domains --mixing dga probes one by one; beyond, --dga-basis is required (each update probes every domain)."""


_DGA_DEFAULTS: Dict[str, Any] = {
    "dga_interval": 10,
    "dga_eta": 10.0,
    "dga_ema": 0.1,
    "dga_min_weight": 0.0,
    "dga_domain_batch_size": 8,
    "dga_specific_batch_size": 16,
    "dga_preconditioner": "none",
    "dga_basis": None,
    "dga_init": None,  # resolved by check_job: it depends on --data-path
    "dga_estimator": "exact",
    "dga_fd_step": 1e-4,
    "dga_max_epochs": None,  # off: no token budgets on the simplex
    "dga_noise": "off",
    "dga_noise_groups": 4,
    "dga_instep_min_micro_batches": 1,
}
"""Defaults of the DGA-only fields. The fields default to None ("not given") so that a DGA flag
given without --mixing dga is an error rather than silently ignored; __post_init__ fills these in."""

_ODM_DEFAULTS: Dict[str, Any] = {
    "odm_interval": 1,
    "odm_reward_ema": 0.9,
}
"""Defaults of the ODM-only fields (mixing/odm.py), filled in as _DGA_DEFAULTS."""

_PIKE_DEFAULTS: Dict[str, Any] = {
    "pike_interval": 10,
    "pike_eta": 10.0,
    "pike_ema": 0.1,
    "pike_min_weight": 0.0,
    "pike_domain_batch_size": 8,
    "pike_penalty": 1.0,
}
"""Defaults of the PiKE-only fields (mixing/pike.py), filled in as _DGA_DEFAULTS."""

STRATEGY_FLAGS: Dict[str, Dict[str, Any]] = {"dga": _DGA_DEFAULTS, "odm": _ODM_DEFAULTS, "pike": _PIKE_DEFAULTS}
"""--mixing NAME -> the defaults of the fields that act with it only (one prefix per strategy)."""

ONLINE_STARTS_UNIFORM = ("odm", "pike")
"""Online strategies without initial-weight flags: they start uniform, so --data-path weights are refused."""


def logged_strategy(section: Optional[dict]) -> Optional[str]:
    """The --mixing of a run from the ``mixing`` section of its run_info.json config (runs logged before the
    field was renamed ``strategy`` have it under ``mixing``)."""
    section = section or {}
    return section.get("strategy", section.get("mixing"))


@dataclass
class MixingConfig(ReadOnlyOnceParsed):
    """How the domain weights are chosen. The DGA flags act with --mixing dga only (an error otherwise)."""

    strategy: Optional[str] = None
    """--mixing: uniform, natural (by tokens), static (the weights of --data-path W1 P1 W2 P2 ...),
    importance (--importance-weights FILE), dga. Default: static when --data-path gives weights
    (Megatron's meaning of them), else natural. Weights in --data-path are never ignored: with
    --mixing natural, uniform or importance they are an error; with --mixing dga they are DGA's
    initial weights (--dga-init static)."""
    static_weights: Optional[List[float]] = None
    """Weights from `--data-path W1 P1 ...` (used by --mixing static)."""
    importance_weights: Optional[str] = None
    """Weights file written by tools/importance_weights.py (--importance-weights), read by --mixing
    importance and by --mixing dga --dga-init importance (an error with any other mixing)."""
    dga_interval: Optional[int] = None
    """T_r: training steps between weight updates (--dga-interval, default 10)."""
    dga_eta: Optional[float] = None
    """Mirror-descent step size on the alignments (--dga-eta, default 10)."""
    dga_ema: Optional[float] = None
    """beta of alpha_new = (1-beta) alpha + beta alpha_hat (--dga-ema, default 0.1); 1 disables the EMA.
    How this reads the paper's "EMA 0.1": docs/algorithm.md, step 5."""
    dga_min_weight: Optional[float] = None
    """Floor c: alpha = (1-c) alpha + c/k keeps every domain alive (--dga-min-weight, default 0)."""
    dga_domain_batch_size: Optional[int] = None
    """b_dom: sequences per domain probe (--dga-domain-batch-size, default 8)."""
    dga_specific_batch_size: Optional[int] = None
    """b_spe: sequences of the specific set per update (--dga-specific-batch-size, default 16)."""
    dga_preconditioner: Optional[Literal["none", "adam"]] = None
    """P in <g_i, P g_spe>: identity (none, the default) or Adam's diag(1/(sqrt(v_hat)+eps))
    (--dga-preconditioner)."""
    dga_basis: Optional[str] = None
    """N x K basis file for distribution reweighting (--dga-basis); DGA then starts uniform over the
    N bases (--dga-init and --data-path weights, which weigh the K domains, are errors with it)."""
    dga_init: Optional[str] = None
    """Initial weights (--dga-init): uniform, natural, static (the weights of --data-path W1 P1 ...),
    importance (--importance-weights FILE) or a weights file. Default: static when --data-path gives
    weights, else uniform; --data-path weights with another --dga-init are an error naming both."""
    dga_estimator: Optional[Literal["exact", "fd", "instep"]] = None
    """Alignment estimator (--dga-estimator): exact gradients of probe batches (the default), finite
    differences along g_spe (fd), or the training step's own micro-batches, grouped by domain, against
    the last update's g_spe (instep: no domain probes; mixing/instep.py)."""
    dga_fd_step: Optional[float] = None
    """fd estimator step h relative to the parameter norm, h = dga_fd_step * |theta| (--dga-fd-step,
    default 1e-4, with --dga-estimator fd only); 1e-4 minimised the error against the exact
    estimator in fp32 (curvature above, rounding below)."""
    dga_max_epochs: Optional[float] = None
    """Token budgets on the simplex (--dga-max-epochs R; off by default): after each update, cap every
    domain's weight so that, drawn at it for the rest of training, the domain uses at most R epochs of its
    distinct samples (its --domain-token-limit subset, else the whole domain): the weights are projected
    in KL onto {alpha_i <= (R n_i - used_i) / samples to come} (mixing/caps.py). With --dga-basis the caps
    act on the fine domains' weights gamma^T P."""
    dga_noise: Optional[Literal["off", "measure", "shrink"]] = None
    """Alignment noise (--dga-noise; off by default). measure: each domain probe is cut into
    --dga-noise-groups groups, each back-propagated on its own, and every update logs each domain's
    standard error of a_i and the fraction of groups whose estimate has a_i's sign
    (dga_alignment_stderr, dga_sign_agreement); shrink also updates on a_i * SNR_i^2 / (1 + SNR_i^2),
    SNR_i = |a_i| / stderr_i (eta scaled down on the domains whose alignment is within its noise)."""
    dga_instep_min_micro_batches: Optional[int] = None
    """--dga-estimator instep: a domain with fewer single-domain training micro-batches since the last
    update falls back to a probe batch (--dga-instep-min-micro-batches, default 1)."""
    dga_noise_groups: Optional[int] = None
    """G, the independent groups of each domain probe with --dga-noise (default 4): at least 2, dividing
    --dga-domain-batch-size and a multiple of the data-parallel size."""

    odm_interval: Optional[int] = None
    """ODM (--mixing odm): training steps between bandit updates (--odm-interval, default 1, the paper's);
    each update's rewards are the per-domain mean token losses of the training steps since the last."""
    odm_reward_ema: Optional[float] = None
    """ODM: smoothing alpha of the reward estimate R_i <- alpha R_i + (1 - alpha) L_i / pi_i
    (--odm-reward-ema, default 0.9, the paper's); 0 keeps only the latest reward."""
    pike_interval: Optional[int] = None
    """PiKE (--mixing pike): training steps between weight updates (--pike-interval, default 10)."""
    pike_eta: Optional[float] = None
    """PiKE: mirror-descent step size on the scores (--pike-eta, default 10)."""
    pike_ema: Optional[float] = None
    """PiKE: EMA of the weights, as --dga-ema (--pike-ema, default 0.1; 1 = none)."""
    pike_min_weight: Optional[float] = None
    """PiKE: floor c, as --dga-min-weight (--pike-min-weight, default 0)."""
    pike_domain_batch_size: Optional[int] = None
    """PiKE: sequences per domain probe, split in two halves on every rank (--pike-domain-batch-size,
    default 8; at least 2 per data-parallel rank)."""
    pike_penalty: Optional[float] = None
    """PiKE: c in the score |g_i|^2 - c (w_i |g_i|^2 + tr(Sigma_i) / (2 B)) (--pike-penalty, default 1):
    the smoothness x learning-rate factor of the loss bound that trades gradient size against
    gradient noise; 0 weighs domains by their squared gradient norm alone."""

    def __post_init__(self):
        # "Given" = set to something other than the default: a resolved config (all defaults filled in,
        # e.g. through dataclasses.replace) validates again as it did the first time.
        given_by = {
            strategy: {
                name: getattr(self, name)
                for name, default in defaults.items()
                if getattr(self, name) is not None and getattr(self, name) != default
            }
            for strategy, defaults in STRATEGY_FLAGS.items()
        }
        given = given_by["dga"]
        estimator, init = self.dga_estimator, self.dga_init  # as given, before the defaults fill in
        for defaults in STRATEGY_FLAGS.values():
            for name, default in defaults.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        # Values first (a typed value that can never work), then combinations that would be ignored.
        if self.dga_interval <= 0:
            raise ConfigError(f"--dga-interval must be > 0, got {self.dga_interval}")
        if not 0 <= self.dga_eta < float("inf"):
            raise ConfigError(
                f"--dga-eta must be a finite number >= 0 (the mirror-descent step size), got {self.dga_eta}"
            )
        if not 0 < self.dga_ema <= 1:
            raise ConfigError(f"--dga-ema must be in (0, 1] (1 = no EMA), got {self.dga_ema}")
        if not 0 <= self.dga_min_weight < 1:
            raise ConfigError(f"--dga-min-weight must be in [0, 1), got {self.dga_min_weight}")
        if self.dga_domain_batch_size <= 0 or self.dga_specific_batch_size <= 0:
            raise ConfigError("--dga-domain-batch-size and --dga-specific-batch-size must be > 0")
        if self.dga_preconditioner not in ("none", "adam"):
            raise ConfigError(f"--dga-preconditioner must be none or adam, got {self.dga_preconditioner!r}")
        if not self.dga_fd_step > 0:
            raise ConfigError(f"--dga-fd-step must be > 0, got {self.dga_fd_step}")
        if self.dga_estimator not in ("exact", "fd", "instep"):
            raise ConfigError(f"--dga-estimator must be exact, fd or instep, got {self.dga_estimator!r}")
        if self.dga_instep_min_micro_batches < 1:
            raise ConfigError(f"--dga-instep-min-micro-batches must be >= 1, got {self.dga_instep_min_micro_batches}")
        if "dga_instep_min_micro_batches" in given and estimator != "instep":
            raise ConfigError(
                f"--dga-instep-min-micro-batches {self.dga_instep_min_micro_batches} acts with --dga-estimator "
                "instep only; add --dga-estimator instep or drop it"
            )
        if self.dga_max_epochs is not None and not 0 < self.dga_max_epochs < float("inf"):
            raise ConfigError(
                f"--dga-max-epochs must be a number > 0 (epochs of a domain's distinct samples), got {self.dga_max_epochs}"
            )
        self._check_noise(estimator, given)
        self._check_odm_and_pike()
        for strategy, flags in given_by.items():
            if self.strategy != strategy:
                refuse_without(
                    flags,
                    f"--mixing {strategy}",
                    f"{strategy.upper() if strategy != 'pike' else 'PiKE'} is not running "
                    f"(--mixing {self.strategy or 'not given'})",
                )
        if "dga_fd_step" in given and estimator != "fd":
            raise ConfigError(
                f"--dga-fd-step {self.dga_fd_step} acts with --dga-estimator fd only; "
                "add --dga-estimator fd or drop --dga-fd-step"
            )
        if self.dga_basis and init is not None:
            check_initial("--dga-init", init, static_given=None, importance_weights=None, basis=self.dga_basis)
        uses_importance = self.strategy == "importance" or (self.strategy == "dga" and init == "importance")
        if self.importance_weights and not uses_importance:
            here = f"--mixing {self.strategy or 'not given'}"
            if self.strategy == "dga":
                here += f", --dga-init {init or 'not given'}"
            raise ConfigError(
                f"--importance-weights {self.importance_weights} is read by --mixing importance and by --mixing dga "
                f"--dga-init importance only (here {here}): it would be ignored; add one of those or drop it"
            )
        if uses_importance:
            check_initial(
                "--mixing" if self.strategy == "importance" else "--dga-init",
                "importance",
                static_given=None,
                importance_weights=self.importance_weights,
            )

    @property
    def probes_every_domain(self) -> bool:
        """The strategy back-propagates a probe batch of every domain at each update (DGA without a basis,
        PiKE): every domain must hold a sample, which the data pipeline checks at start-up."""
        return (self.strategy == "dga" and not self.dga_basis) or self.strategy == "pike"

    def _check_noise(self, estimator: Optional[str], given: Dict[str, Any]) -> None:
        if self.dga_noise not in ("off", "measure", "shrink"):
            raise ConfigError(f"--dga-noise must be off, measure or shrink, got {self.dga_noise!r}")
        if "dga_noise_groups" in given and self.dga_noise == "off":
            raise ConfigError(
                f"--dga-noise-groups {self.dga_noise_groups} acts with --dga-noise measure or shrink only; "
                "add --dga-noise or drop --dga-noise-groups"
            )
        if self.dga_noise == "off":
            return
        if estimator in ("fd", "instep"):
            raise ConfigError(
                f"--dga-noise {self.dga_noise} needs a gradient per probe group, which --dga-estimator {estimator} "
                "never forms; use --dga-estimator exact or drop --dga-noise"
            )
        groups, size = self.dga_noise_groups, self.dga_domain_batch_size
        if groups < 2 or size % groups:
            raise ConfigError(
                f"--dga-noise-groups {groups} must be at least 2 and divide --dga-domain-batch-size {size} "
                "(equal groups of the domain probe); change one of them"
            )

    def _check_odm_and_pike(self) -> None:
        if self.odm_interval <= 0:
            raise ConfigError(f"--odm-interval must be > 0, got {self.odm_interval}")
        if not 0 <= self.odm_reward_ema < 1:
            raise ConfigError(
                f"--odm-reward-ema must be in [0, 1) (0 = the latest reward only), got {self.odm_reward_ema}"
            )
        if self.pike_interval <= 0:
            raise ConfigError(f"--pike-interval must be > 0, got {self.pike_interval}")
        if not 0 <= self.pike_eta < float("inf"):
            raise ConfigError(f"--pike-eta must be a finite number >= 0, got {self.pike_eta}")
        if not 0 < self.pike_ema <= 1:
            raise ConfigError(f"--pike-ema must be in (0, 1] (1 = no EMA), got {self.pike_ema}")
        if not 0 <= self.pike_min_weight < 1:
            raise ConfigError(f"--pike-min-weight must be in [0, 1), got {self.pike_min_weight}")
        if self.pike_domain_batch_size < 2:
            raise ConfigError(
                f"--pike-domain-batch-size must be >= 2 (each probe is split in two halves), "
                f"got {self.pike_domain_batch_size}"
            )
        if not 0 <= self.pike_penalty < float("inf"):
            raise ConfigError(f"--pike-penalty must be a finite number >= 0, got {self.pike_penalty}")

    def resolve_data_path_weights(self, weights: Optional[List[float]]) -> None:
        """Settle --mixing and --dga-init against the weights of --data-path (None: plain prefixes).

        Megatron's meaning of `--data-path W1 P1 ...` is a static mixture, so given weights are never
        ignored: they choose --mixing static when --mixing is not given, start DGA (--dga-init static)
        with --mixing dga, and are an error with any mixing that would not read them.
        """
        shown = (
            "" if weights is None else " ".join(f"{w:g}" for w in weights[:4]) + (" ..." if len(weights) > 4 else "")
        )
        if weights is not None:
            if self.strategy is None:
                self.strategy = "static"
            elif self.strategy in ("natural", "uniform", "importance") + ONLINE_STARTS_UNIFORM:
                raise ConfigError(
                    f"--data-path gives weights ({shown}), which --mixing {self.strategy} would ignore"
                    + (" (it starts uniform)" if self.strategy in ONLINE_STARTS_UNIFORM else "")
                    + "; use "
                    "--mixing static to sample by them (the default when --mixing is not given), --mixing dga "
                    "to start DGA from them, or give the prefixes without weights"
                )
            elif self.strategy == "dga":
                if self.dga_basis:
                    raise ConfigError(
                        f"--data-path gives weights ({shown}) over the domains, but with --dga-basis {self.dga_basis} "
                        "DGA weighs the basis distributions (and starts uniform over them); drop the weights"
                    )
                if self.dga_init is None:
                    self.dga_init = "static"
                elif self.dga_init != "static":
                    raise ConfigError(
                        f"--data-path gives weights ({shown}) and --dga-init {self.dga_init} also sets DGA's initial "
                        "weights; drop the weights from --data-path (plain prefixes) or drop --dga-init"
                    )
        else:
            self.strategy = self.strategy or "natural"
            if self.strategy == "static":
                check_initial("--mixing", "static", static_given=False, importance_weights=None)
            if self.strategy == "dga" and self.dga_init == "static":
                check_initial("--dga-init", "static", static_given=False, importance_weights=None)
        self.dga_init = self.dga_init or "uniform"


def check_job(
    mixing: MixingConfig,
    *,
    data_path_weights: Optional[List[float]],
    domain_map: Optional[str],
    use_distributed_optimizer: bool,
    precision: Optional[str],
    transformer_engine: bool,
) -> None:
    """The mixing checks that involve other sections; settles --mixing and --dga-init (in place).

    Args:
        mixing: the section, validated on its own.
        data_path_weights: the weights of --data-path W1 P1 ... (None: plain prefixes, or no --data-path).
        domain_map: --domain-map FILE, or None.
        use_distributed_optimizer: --use-distributed-optimizer.
        precision: "--bf16" or "--fp16" when the model trains in 16 bits, else None.
        transformer_engine: the model runs transformer-engine layers here.
    """
    if domain_map is not None:  # before --data-path weights settle --mixing: a map has none
        _check_mixing_over_map(mixing, domain_map)
    mixing.resolve_data_path_weights(data_path_weights)
    if mixing.strategy != "dga":
        return
    if mixing.dga_estimator == "fd" and precision:
        # fd moves the parameters by h ~ 1e-4 |theta| along g_spe: in half precision that step
        # rounds away (and fd.py refuses half-precision parameters at the first update).
        raise ConfigError(
            f"--dga-estimator fd with {precision}: the finite-difference step is rounded away in "
            "16-bit parameters; use --dga-estimator exact (the default)"
        )
    if mixing.dga_estimator == "fd" and transformer_engine:
        # fd's +-h losses differ by ~1e-4 relative; transformer-engine runs fp32 GEMMs in TF32 (10-bit
        # mantissa), whose rounding is that large: the step was tuned, and CI checks it, in true fp32.
        raise ConfigError(
            "--dga-estimator fd with transformer-engine layers: they compute fp32 GEMMs in TF32, whose "
            "rounding (~1e-3) swamps the finite differences (~1e-4 of the loss); use --dga-estimator exact "
            "(the default), or megatron-core's local layers in true fp32 (--attention-backend local)"
        )
    if mixing.dga_estimator == "instep":
        _check_instep_layout(precision)
    if mixing.dga_preconditioner == "adam" and use_distributed_optimizer:
        raise ConfigError(
            "--dga-preconditioner adam cannot be combined with --use-distributed-optimizer: each rank "
            "holds Adam's second moments for its own shard only; use --dga-preconditioner none or drop "
            "--use-distributed-optimizer"
        )


def _check_instep_layout(precision: Optional[str]) -> None:
    """What --dga-estimator instep does not support (it reads the grad buffers after each micro-batch's backward)."""
    if precision == "--fp16":
        raise ConfigError(
            "--dga-estimator instep with --fp16: the grad buffers hold loss-scaled gradients that a step may "
            "overflow; use --bf16, or --dga-estimator exact"
        )


def _check_mixing_over_map(mixing: MixingConfig, path: str) -> None:
    """Mixings that cannot work over a map's fine domains fail before any data is read."""
    if mixing.strategy == "static":
        raise ConfigError(
            f"--mixing static with --domain-map {path}: static weights over the fine domains come "
            "from a weights file: use --mixing importance --importance-weights FILE (written by "
            f"tools/importance_weights.py --domain-map {path})"
        )
    if mixing.strategy == "dga" and not mixing.dga_basis:
        from megatron_dga.data.domain_map import read_domain_map

        k = read_domain_map(path).num_domains
        if k > DGA_MAX_DIRECT_DOMAINS:
            raise ConfigError(
                f"--mixing dga over the {k} fine domains of --domain-map {path} would probe every domain at every "
                f"update ({k} probe batches; at most {DGA_MAX_DIRECT_DOMAINS} without a basis): reweight N basis "
                f"distributions instead: tools/importance_weights.py --domain-map {path} --basis-sets ... "
                "--basis-output basis.npz, then --dga-basis basis.npz"
            )
    if mixing.strategy == "pike":
        from megatron_dga.data.domain_map import read_domain_map

        k = read_domain_map(path).num_domains
        if k > DGA_MAX_DIRECT_DOMAINS:
            raise ConfigError(
                f"--mixing pike over the {k} fine domains of --domain-map {path} would probe every domain at every "
                f"update ({k} probe batches; at most {DGA_MAX_DIRECT_DOMAINS}), and PiKE has no basis "
                "reweighting: use --mixing odm (no probes) or --mixing dga --dga-basis FILE"
            )
