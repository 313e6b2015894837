"""The cost model of DGA's extra work (docs/algorithm.md, "Cost model").

One DGA update every T_r training steps of B sequences measures the alignments of ``sources``
domains (the k domains, or the N basis distributions with --dga-basis):

* exact estimator: one backward probe of b_dom sequences per source and one of b_spe specific
  sequences, ``(sources * b_dom + b_spe)`` forward+backward sequences;
* finite differences (--dga-estimator fd): the specific gradient (forward+backward over b_spe)
  and two forward passes over the probe batch; a forward costs ~1/3 of a forward+backward, so
  ``(b_spe + 2/3 * sources * b_dom)``;
* in-step (--dga-estimator instep): the specific gradient only, ``b_spe`` (the domain alignments come
  from the training micro-batches; a fused dot over the grad buffers per micro-batch and the probes of
  domains that drew too few micro-batches are not counted).

Amortised over the T_r * B sequences trained between updates, that is the overhead ratio of
:func:`dga_overhead`: what a measured slowdown is compared with (benchmarks/bench_dga_overhead.py,
benchmarks/bench_train_throughput.py, the runner's results table). Anything measured above it is
implementation overhead.
"""

from __future__ import annotations

ESTIMATORS = ("exact", "fd", "instep")
"""The alignment estimators the model covers (--dga-estimator)."""

FORWARD_FRACTION = 1.0 / 3.0
"""Cost of a forward pass as a fraction of a forward+backward (backward ~ twice the forward)."""


def dga_overhead(
    sources: int, domain_batch: int, specific_batch: int, interval: int, global_batch: int, estimator: str = "exact"
) -> float:
    """DGA's extra forward+backward sequences per trained sequence.

    Args:
        sources: domains probed per update (k), or basis distributions (N) with --dga-basis.
        domain_batch: b_dom, sequences per source probe (--dga-domain-batch-size).
        specific_batch: b_spe, specific sequences per update (--dga-specific-batch-size).
        interval: T_r, training steps between updates (--dga-interval).
        global_batch: B, sequences per training step (--global-batch-size).
        estimator: ``exact``, ``fd`` or ``instep`` (--dga-estimator).

    Returns:
        ``(sources * b_dom + b_spe) / (T_r * B)`` for exact,
        ``(b_spe + 2 * FORWARD_FRACTION * sources * b_dom) / (T_r * B)`` for fd,
        ``b_spe / (T_r * B)`` for instep.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}: expected one of {ESTIMATORS}")
    if interval < 1 or global_batch < 1:
        raise ValueError(f"interval {interval} and global_batch {global_batch} must be >= 1")
    probes = sources * domain_batch
    extra = {
        "exact": probes + specific_batch,
        "fd": specific_batch + 2.0 * FORWARD_FRACTION * probes,
        "instep": specific_batch,
    }[estimator]
    return extra / (interval * global_batch)
