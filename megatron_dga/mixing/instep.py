"""DGA's in-step estimator (--dga-estimator instep): alignments from the training step's own micro-batches.

With each global batch grouped by domain (the same samples, sorted by domain before they are cut over
the ranks and into micro-batches: ``TrainerView.observe_training_backward``), most training micro-batches
hold one domain, and each is a sample of that domain's gradient at the current parameters. Its
alignment with the last saved g_spe is the difference of <buffers, P g_spe> after and before its
backward, times the number of micro-batches (the schedule divides each loss by it): one fused
``ops.grad_dot`` over the grad buffers per micro-batch, no extra forward or backward. Each pipeline stage
adds the dot over its own parameters (the tied embedding's two copies both, and under
--sequence-parallel every TP rank's part of the norms: ``TrainerView.counted_before_reduction``).

Between two updates the dots are summed per domain on the device (no host read). At the update ONE
all-reduce of 2k values (the dot sums over every rank: data-parallel ranks add their micro-batches,
model-parallel ranks their parameter shards; the counts from the first model-parallel rank of each
replica) gives a_i = the mean over the window's micro-batches of domain i. A micro-batch of several
domains is not counted. A domain with fewer than --dga-instep-min-micro-batches in the window falls
back to a probe (``alignment.exact_alignments``) against the fresh g_spe that every update computes and
keeps for the next window (+4 bytes per parameter on every rank for the whole run). The first update
has no saved g_spe and probes every domain; so does the first after a resume (g_spe is a full gradient
and is not checkpointed).

With --dga-basis the same runs over the N basis distributions: each training row carries a basis label
drawn from P(n | its fine domain) (``DynamicMixtureSampler.basis_labels``), so the rows labelled n are
draws from P_n, and micro-batches are grouped by label (``basis_id``) instead of domain.

Compared with the exact estimator, the alignments are stale (g_spe is the last update's) and average
the parameters over the window, as the training micro-batches do. On the same micro-batches, the same
parameters and the same g_spe they equal the exact estimator's (tests/mixing/test_instep.py).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_dga import ops
from megatron_dga.mixing.alignment import AlignmentResult, exact_alignments, preconditioner_kwargs
from megatron_dga.mixing.base import TrainerView

logger = logging.getLogger(__name__)


class InStepAlignments:
    """The window's per-domain sums of training micro-batch alignments, and the saved g_spe."""

    def __init__(self, num_domains: int, preconditioner: str, min_micro_batches: int, label: str = "domain_id"):
        self.num_domains = num_domains
        """k domains, or N basis distributions (``label`` "basis_id": each training row's basis label)."""
        self.label = label
        self.preconditioner = preconditioner
        self.min_micro_batches = min_micro_batches
        self.target: Optional[List[torch.Tensor]] = None
        """g_spe of the last update (one tensor per parameter, as ``view.grads()``); None before the first."""
        self._sums: Optional[torch.Tensor] = None
        self._counts = np.zeros(num_domains)
        self._previous: Dict[int, torch.Tensor] = {}
        """Per model chunk: <its buffers, P g_spe> after its last reported backward in this step."""
        self._precond: Dict[str, object] = {}
        self._view: Optional[TrainerView] = None
        self._micro_batch_size = 0
        self._warned = False
        self._counted: Dict[int, List[bool]] = {}
        """Per model chunk: the parameters counted before the reduction, within that chunk."""

    def attach(self, view: TrainerView) -> None:
        """At setup: group the training batches by domain and observe each micro-batch's backward."""
        self._view = view
        counted, chunks = view.counted_before_reduction(), view.param_chunks()  # fixed for the run
        self._counted = {c: [ok and at == c for ok, at in zip(counted, chunks)] for c in sorted(set(chunks))}
        view.observe_training_backward(self.observe)

    def observe(self, index: int, count: int, micro_batch: Dict[str, torch.Tensor], chunk: int = 0) -> None:
        """After micro-batch ``index`` of ``count`` on model chunk ``chunk``: add its alignment over that
        chunk's parameters to its domain's sum (one domain only); the micro-batch counts once, at chunk 0,
        its last backward on this rank."""
        if self.target is None:
            return
        view = self._view
        if index == 0:  # the step zeroed the buffers (each chunk's first backward is micro-batch 0's)
            self._previous.pop(chunk, None)
            if chunk == max(self._counted):  # the step's first backward: Adam's moments are this step's
                self._precond = preconditioner_kwargs(view, self.preconditioner)
        cumulative = ops.grad_dot(view.grads(), self.target, counted=self._counted[chunk], **self._precond)
        previous = self._previous.get(chunk)
        dot = cumulative if previous is None else cumulative - previous
        self._previous[chunk] = cumulative
        domains = micro_batch[self.label]
        self._micro_batch_size = len(domains)
        if len(domains) == 0 or not bool((domains == domains[0]).all()):
            return
        domain = int(domains[0])
        if self._sums is None:
            self._sums = torch.zeros(self.num_domains, dtype=torch.float64, device=cumulative.device)
        self._sums[domain] += dot * count
        if chunk == 0:
            self._counts[domain] += 1

    def alignments(
        self, view: TrainerView, domain_batch_size: int, specific_batch_size: int, probe_fn=None
    ) -> AlignmentResult:
        """Close the window: the in-step alignments, probes for the domains that drew too few micro-batches,
        and the new g_spe kept for the next window."""
        k = self.num_domains
        grads = view.grads()
        device = grads[0].device if grads else "cpu"
        totals = torch.zeros(2, k, dtype=torch.float64, device=device)
        if self._sums is not None:
            totals[0] = self._sums
        if view.model_parallel_leader():
            totals[1] = torch.as_tensor(self._counts, dtype=torch.float64, device=device)
        view.all_reduce(totals, group="world")
        sums, counts = totals.cpu().numpy()
        measured = counts >= self.min_micro_batches if self.target is not None else np.zeros(k, dtype=bool)
        if self.target is not None and not measured.any() and not self._warned:
            self._warned = True
            logger.warning(
                "--dga-estimator instep: no domain drew %d single-domain training micro-batch(es) since the last "
                "update (micro-batches of %d sequences over %d domains), so every domain was probed, at the exact "
                "estimator's cost; use --micro-batch-size 1 or 2 (the gradient is the same)",
                self.min_micro_batches,
                self._micro_batch_size,
                k,
            )
        fallback = [int(i) for i in np.flatnonzero(~measured)]
        probed = exact_alignments(
            view, fallback, domain_batch_size, specific_batch_size, self.preconditioner, probe_fn, keep_target=True
        )
        alignments = np.zeros(k)
        alignments[measured] = sums[measured] / counts[measured]
        alignments[fallback] = probed.alignments
        self.target, probed.target = probed.target, None
        self._sums, self._counts, self._previous = None, np.zeros(k), {}
        return AlignmentResult(
            alignments=alignments,
            domain_grad_norms=None,
            specific_grad_norm=probed.specific_grad_norm,
            domain_probe_loss=_scatter(probed.domain_probe_loss, fallback, k),
            specific_probe_loss=probed.specific_probe_loss,
            instep_domains=int(measured.sum()),
            instep_micro_batches=int(counts[measured].sum()),
        )


def _scatter(values: np.ndarray, at: Sequence[int], k: int) -> np.ndarray:
    out = np.full(k, np.nan)
    out[list(at)] = values
    return out
