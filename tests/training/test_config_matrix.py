"""DGA in the combinations large Megatron runs use: every layout and optimizer gives one process's alignments.

The factors (each a flag set a production launch combines):

    layout     DP=4 | TP=2 x DP=2 | TP=2 + SP x DP=2 | PP=2 x DP=2 | PP=2 x VPP=2 x DP=2   (4 gloo ranks each)
    optimizer  plain | --use-distributed-optimizer | + --overlap-grad-reduce | + --overlap-param-gather
    precision  fp32 | --bf16
    estimator  exact | fd              (fd with --bf16 is refused at start-up: not a combination)

Every layout keeps DP=2 or more: the distributed optimizer and the overlapped reduction only act
across data-parallel ranks. The full product is 60 valid runs. ``MEGATRON_DGA_FULL_MATRIX=1``
runs the 20 rows of a pairwise covering array (row (layout i, optimizer j) takes the
(precision, estimator) pair number (i + j) mod 3): every pair of values of any two factors
appears in some row, and every layout x optimizer pair in exactly one. CI runs 9 rows
(:data:`CI_ROWS`, ~14 s each on 2 cores): every layout with an overlapped distributed
optimizer in fp32 (where a wrong reduction shows), every value of every factor, fd with the
overlapped optimizers under pipelining. Each row is compared with the one-process run of
its precision and estimator, from the same initial weights (loaded by global parameter name):
the alignments and ||g_spe|| of both DGA updates, the training losses and the new weights.

The first defect this matrix caught: with the distributed optimizer, --overlap-grad-reduce and
pipeline stages, DGA's specific gradient was reduce-scattered, not all-reduced (megatron's
``start_grad_sync`` takes no ``force_all_reduce``), and the alignments moved by ~3 % with no error.
"""

import os

import numpy as np
import pytest

from tests.helpers.dist_utils import run_distributed
from tests.helpers.layouts import load_initial, named, trainer_from
from tests.helpers.synthetic import PIPELINE_GPT_ARGS, data_flags, run_argv, write_domains

MODEL = PIPELINE_GPT_ARGS
DGA = ["--mixing", "dga", "--dga-interval", "1", "--dga-domain-batch-size", "8", "--dga-specific-batch-size", "8"]
ITERS = 2

LAYOUTS = {
    "dp4": [],
    "tp2_dp2": ["--tensor-model-parallel-size", "2"],
    # Sequence parallelism: norms, dropout and residuals split along the sequence (megatron-core's local
    # layers with model.SequenceParallelNorm); DGA's probes sum the norms' gradients over TP too.
    "tp2_sp_dp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
    "vpp2_dp2": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
}
# Small buckets (the model has ~60k parameters): several buckets, each reduced (and gathered) on its own.
OPTIMIZERS = {
    "plain": [],
    "distopt": ["--use-distributed-optimizer"],
    "distopt_overlap_grad": ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "5000"],
    "distopt_overlap_both": [
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--ddp-bucket-size",
        "5000",
    ],
}
PRECISION_ESTIMATOR = [("fp32", "exact"), ("fp32", "fd"), ("bf16", "exact")]
PRECISIONS = {"fp32": [], "bf16": ["--bf16"]}


def pairwise_rows():
    """The pairwise covering array: (layout, optimizer, precision, estimator), 20 rows."""
    return [
        (layout, opt, *PRECISION_ESTIMATOR[(i + j) % 3])
        for i, layout in enumerate(LAYOUTS)
        for j, opt in enumerate(OPTIMIZERS)
    ]


CI_ROWS = [
    ("dp4", "plain", "bf16", "exact"),
    ("dp4", "distopt_overlap_both", "fp32", "fd"),
    ("tp2_dp2", "distopt_overlap_grad", "fp32", "exact"),
    ("tp2_sp_dp2", "distopt_overlap_both", "fp32", "exact"),
    ("tp2_sp_dp2", "distopt", "bf16", "exact"),
    ("pp2_dp2", "distopt_overlap_grad", "fp32", "fd"),
    ("pp2_dp2", "distopt_overlap_both", "bf16", "exact"),
    ("vpp2_dp2", "distopt_overlap_both", "fp32", "exact"),
    ("vpp2_dp2", "distopt_overlap_grad", "fp32", "fd"),
]
"""The rows CI runs (see the module docstring); all of :func:`pairwise_rows` with MEGATRON_DGA_FULL_MATRIX=1."""


def rows():
    return pairwise_rows() if os.environ.get("MEGATRON_DGA_FULL_MATRIX") == "1" else CI_ROWS


def test_the_pairwise_rows_cover_every_pair():
    from itertools import combinations

    table = pairwise_rows()
    values = [list(LAYOUTS), list(OPTIMIZERS), ["fp32", "bf16"], ["exact", "fd"]]
    for a, b in combinations(range(4), 2):
        expected = {(x, y) for x in values[a] for y in values[b]} - {("bf16", "fd")}
        assert {(r[a], r[b]) for r in table} == expected, (a, b)


def test_the_ci_rows_cover_every_value_and_every_layout_overlapped_in_fp32():
    assert len(set(CI_ROWS)) == len(CI_ROWS) and all(row[2:] in PRECISION_ESTIMATOR for row in CI_ROWS)
    for i, values in enumerate([LAYOUTS, OPTIMIZERS, PRECISIONS, ["exact", "fd"]]):
        assert {row[i] for row in CI_ROWS} == set(values), i
    for layout in LAYOUTS:
        assert any(r[0] == layout and r[1].startswith("distopt_overlap") and r[2] == "fp32" for r in CI_ROWS), layout
    assert {r[0] for r in CI_ROWS if r[3] == "fd" and r[1].startswith("distopt_overlap")} >= {"pp2_dp2", "vpp2_dp2"}


def _argv(shards, log_dir, extra):
    return run_argv(log_dir, [*DGA, *extra], data=data_flags(shards), model=MODEL, iters=ITERS)


def _run(rank, world_size, runs, inits):
    """Train each run on these ranks; the logging rank's metrics and (references) the initial weights."""
    from megatron_dga import platform
    from megatron_dga.training.metrics import read_metrics

    out = {}
    for name, (argv, init_key) in runs.items():
        trainer = trainer_from(argv)
        init = named(trainer)
        if init_key is not None:
            load_initial(trainer, inits[init_key])
        trainer.train()
        log_dir = argv[argv.index("--log-dir") + 1]
        metrics = read_metrics(os.path.join(log_dir, "metrics.jsonl")) if trainer.ctx.is_logging_rank else None
        out[name] = {"metrics": metrics, "init": init if world_size == 1 else None}
    platform.shutdown()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    shards = write_domains(str(tmp / "shards"), k=3, docs_per_domain=48, doc_len=64, specific_mixture=[0.5, 0.5, 0.0])
    refs = {
        f"{p}_{e}": (_argv(shards, tmp / f"ref_{p}_{e}", PRECISIONS[p] + ["--dga-estimator", e]), None)
        for p, e in PRECISION_ESTIMATOR
    }
    reference = run_distributed(_run, world_size=1, args=(refs, {}))[0]
    inits = {name: reference[name]["init"] for name in refs}
    runs = {}
    for layout, opt, precision, estimator in rows():
        name = f"{layout}-{opt}-{precision}-{estimator}"
        extra = LAYOUTS[layout] + OPTIMIZERS[opt] + PRECISIONS[precision] + ["--dga-estimator", estimator]
        runs[name] = (_argv(shards, tmp / name, extra), f"{precision}_{estimator}")
    ranks = run_distributed(_run, world_size=4, args=(runs, inits), timeout=900)
    merged = {name: next(r[name]["metrics"] for r in ranks if r[name]["metrics"] is not None) for name in runs}
    return {"reference": {name: reference[name]["metrics"] for name in refs}, "runs": merged}


# Largest alignment difference over the rows, relative to the largest alignment, measured: fp32 8.0e-5,
# bf16 4.4e-2 (bf16 rounds each layout's partial sums differently). The defect above moved fp32
# alignments by 3 % and ||g_spe|| by 2.5 %: the fp32 rows catch it (the bf16 rows check the wiring).
TOLERANCE = {"fp32": 2e-4, "bf16": 6e-2}


@pytest.mark.parametrize("row", rows(), ids=lambda r: "-".join(r))
def test_row_gives_the_one_process_alignments(results, row):
    layout, opt, precision, estimator = row
    got = results["runs"]["-".join(row)]
    ref = results["reference"][f"{precision}_{estimator}"]
    tol = TOLERANCE[precision]
    updates = [m for m in ref if "alignments" in m]
    assert len(updates) == ITERS
    for a, b in zip(updates, [m for m in got if "alignments" in m]):
        scale = np.abs(a["alignments"]).max()
        np.testing.assert_allclose(b["alignments"], a["alignments"], rtol=tol, atol=tol * scale)
        assert b["specific_grad_norm"] == pytest.approx(a["specific_grad_norm"], rel=tol)
    np.testing.assert_allclose([m["lm_loss"] for m in got], [m["lm_loss"] for m in ref], rtol=tol / 10)
    np.testing.assert_allclose(got[-1]["domain_weights"], ref[-1]["domain_weights"], rtol=tol, atol=1e-7)
    assert not np.allclose(ref[-1]["domain_weights"], 1 / 3, rtol=1e-3)  # DGA moved the weights
