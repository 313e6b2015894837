"""Dynamic Gradient Alignment (Fan, Grangier, Ablin, arXiv 2410.02498).

Every T_r (--dga-interval) steps: alignments a = <g_i, P g_spe> (mixing/alignment.py),
then the update on the simplex that DGA shares with PiKE (``mirror.py``: the fused
``ops.simplex_update``; mirror descent --dga-eta, EMA --dga-ema, floor --dga-min-weight; the rule and
its EMA convention: docs/algorithm.md, "Online update").

With --dga-basis the same runs on weights gamma over N basis distributions (distribution
reweighting): a_n aligns a probe batch drawn from basis n, and the sampler draws fine
domains from alpha = gamma^T P. Non-finite alignments skip the update with a warning
and keep the weights (a probe hit a NaN/Inf gradient).

Estimators (--dga-estimator): "exact" back-propagates every probe (mixing/alignment.py);
"fd" takes central differences of the probe losses along g_spe, two forward passes in
all (mixing/fd.py); "instep" reads the training micro-batches' own gradients, grouped by
domain, against the last update's g_spe (mixing/instep.py). --dga-noise measures each alignment's standard error from groups of
the probe (mixing/alignment.py) and with "shrink" updates on the alignments shrunk by it. Every rank computes the same alignments from one all-reduce, so the
weights must come out bit-identical everywhere; after each update that is checked
(``mixing.base.check_identical_across_ranks``).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from megatron_dga.errors import ConfigError
from megatron_dga.mixing.alignment import exact_alignments, shrink_by_noise
from megatron_dga.mixing.base import TrainerView, register
from megatron_dga.mixing.fd import fd_alignments
from megatron_dga.mixing.initial import initial_weights
from megatron_dga.mixing.instep import InStepAlignments
from megatron_dga.mixing.mirror import MirrorDescentStrategy


@register("dga")
class DGA(MirrorDescentStrategy):
    """Online reweighting of the domains (or of the basis distributions) by gradient alignment."""

    label = "DGA"

    def __init__(self, cfg, domains):
        super().__init__(cfg, domains)
        if cfg.dga_basis:
            from megatron_dga.mixing.weights_io import load_basis

            self.basis = load_basis(cfg.dga_basis, expected_domains=domains.names)
        self.instep = None
        if cfg.dga_estimator == "instep":  # over bases: micro-batches grouped by each row's basis label
            label = "domain_id" if self.basis is None else "basis_id"
            self.instep = InStepAlignments(
                self.num_weights, cfg.dga_preconditioner, cfg.dga_instep_min_micro_batches, label
            )

    def setup(self, view: TrainerView) -> None:
        """Probes the specific set; with --dga-basis the sampler draws from the bases."""
        view.check_specific(self.cfg.dga_specific_batch_size, "--dga-specific-batch-size")
        dp_size = view.data_parallel()[1]
        if self.cfg.dga_noise != "off" and self.cfg.dga_noise_groups % dp_size:
            raise ConfigError(
                f"--dga-noise-groups {self.cfg.dga_noise_groups} must be a multiple of the data-parallel size "
                f"{dp_size} (every rank back-propagates whole groups of the domain probe)"
            )
        if self.basis is not None:
            view.set_basis(self.basis)
        if self.instep is not None:
            self.instep.attach(view)

    # ------------------------------------------------------------------ weights

    def initial_weights(self) -> np.ndarray:
        self.weights = self._init_weights()
        return self.weights.copy()

    def _init_weights(self) -> np.ndarray:
        cfg = self.cfg
        return initial_weights(
            "--dga-init",
            cfg.dga_init,
            self.domains,
            importance_weights=cfg.importance_weights,
            basis=cfg.dga_basis,
            num_bases=self.num_weights,
        )

    def after_step(self, view: TrainerView) -> Optional[np.ndarray]:
        if view.iteration % self.cfg.dga_interval != 0:
            return None
        result = self.measure_alignments(view)
        self._last = {
            "alignments": result.alignments.tolist(),
            "specific_grad_norm": result.specific_grad_norm,
            "dga_update": self.updates + 1,
        }
        if result.domain_grad_norms is not None:
            self._last["domain_grad_norms"] = result.domain_grad_norms.tolist()
        if result.fd_step is not None:
            self._last["dga_fd_step"] = result.fd_step
        if result.instep_domains is not None:
            self._last["dga_instep_domains"] = result.instep_domains
            self._last["dga_instep_micro_batches"] = result.instep_micro_batches
        scores = result.alignments
        if result.stderr is not None:
            self._last["dga_alignment_stderr"] = result.stderr.tolist()
            self._last["dga_sign_agreement"] = result.sign_agreement.tolist()
            if self.cfg.dga_noise == "shrink":
                scores = shrink_by_noise(scores, result.stderr)
        return self.step(
            view,
            scores,
            eta=self.cfg.dga_eta,
            ema=self.cfg.dga_ema,
            floor=self.cfg.dga_min_weight,
            caps=self.token_budget_caps(view, self.cfg.dga_max_epochs),
            basis=None if self.basis is None else self.basis.matrix,
        )

    def measure_alignments(self, view: TrainerView):
        """One alignment pass with the configured estimator (an AlignmentResult); weights untouched."""
        probe_fn = view.probe_basis if self.basis is not None else view.probe_domain
        args = (
            view,
            list(range(self.num_weights)),
            self.cfg.dga_domain_batch_size,
            self.cfg.dga_specific_batch_size,
            self.cfg.dga_preconditioner,
        )
        if self.cfg.dga_estimator == "fd":
            return fd_alignments(*args, probe_fn=probe_fn, relative_step=self.cfg.dga_fd_step)
        if self.instep is not None:
            return self.instep.alignments(view, *args[2:4], probe_fn=probe_fn)
        groups = self.cfg.dga_noise_groups if self.cfg.dga_noise != "off" else 0
        return exact_alignments(*args, probe_fn=probe_fn, noise_groups=groups)

    # ------------------------------------------------------------------ logging and state

    def list_labels(self) -> Dict[str, List[str]]:
        """With --dga-basis the per-update lists run over the N bases, not the K domains."""
        names = self.basis_names
        keys = ("alignments", "domain_grad_norms", "basis_weights", "dga_alignment_stderr", "dga_sign_agreement")
        return {} if names is None else {key: names for key in keys}

    def metrics(self) -> Dict[str, object]:
        out = super().metrics()
        if self.basis is not None and self.weights is not None:
            out["basis_weights"] = self.weights.tolist()
        return out
