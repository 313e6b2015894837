"""--dga-estimator instep: alignments from the training step's own micro-batches (mixing/instep.py).

On the same micro-batches, parameters and g_spe, the in-step alignments equal a float64 brute force
(each single-domain training micro-batch's gradient dotted with g_spe, averaged per domain over all
ranks) on every layout the estimator runs on: DP=2, TP=2, TP=2 with sequence parallelism, DP=2 with the distributed optimizer and
overlapped grad reduce (where each step's last micro-batch is not counted), PP=2 (1F1B) with the
tied embedding, PP=2 with two virtual stages each (interleaved 1F1B), and all at once on 4 ranks
(PP=2 x DP=2, with and without virtual stages, with the overlapped distributed optimizer).
"""

import os

import numpy as np
import pytest

from tests.helpers.dist_utils import run_distributed
from tests.helpers.gradient_oracle import Float64GPT, gathered
from tests.helpers.layouts import named, train_steps, trainer_from
from tests.helpers.synthetic import data_flags, run_argv

VPP = ["--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"]
LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    # Before the step's reduction each TP rank holds its sequence shard's part of the norms' gradients.
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "dp2_distopt_overlap": ["--use-distributed-optimizer", "--overlap-grad-reduce"],
    # 1F1B over two stages with the tied embedding: before the step's reduction the first stage's
    # embedding and the last stage's output layer each hold their part of its gradient.
    "pp2": ["--pipeline-model-parallel-size", "2"],
    # Interleaved 1F1B, two chunks per stage: backward k runs entry k of megatron's schedule table.
    "vpp2": [*VPP, "--pipeline-model-parallel-size", "2"],
}


def _argv(shards, log_dir, extra=(), iters=1000):
    instep = [
        "--mixing",
        "dga",
        "--dga-estimator",
        "instep",
        "--dga-domain-batch-size",
        "4",
        "--dga-specific-batch-size",
        "4",
    ]
    return run_argv(log_dir, [*instep, *extra], data=data_flags(shards), global_batch=16, iters=iters)


@pytest.fixture(scope="module")
def shards(four_domains):
    """This module's data (tests/mixing/conftest.py)."""
    return four_domains


def _one_window(rank, world_size, shards, tmp, layouts):
    """Per layout: two steps, an update (no g_spe yet: every domain probed, g_spe kept), one observed
    step, and the update that closes its window; plus what the float64 reference needs."""
    import warnings

    import torch

    from megatron_dga import platform

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = {}
    for layout, extra in layouts.items():
        trainer = trainer_from(_argv(shards, os.path.join(tmp, layout), extra))
        train_steps(trainer, 2)
        strategy, sampler = trainer.mixing, trainer.data.sampler
        state = sampler.state_dict()
        first = strategy.measure_alignments(trainer.view)
        after = sampler.state_dict()
        sampler.load_state_dict(state)  # the specific probe is drawn first: these are g_spe's samples
        fetch = lambda rows: {key: t.numpy() for key, t in trainer.data.fetch(rows).items()}
        specific = fetch(sampler.probe_batch(trainer.data.specific_id, 4))
        sampler.load_state_dict(after)
        if trainer.ctx.pp_size > 1:  # this stage's parameters by global name (the tied copy once)
            params = named(trainer)
        else:  # theta of the observed step
            params = {n: gathered(p, p, trainer.ctx.tp_size) for n, p in trainer.model.named_parameters()}
        observed = []
        real = strategy.instep.observe

        def recording(index, count, micro_batch, chunk):
            if chunk == 0:  # with virtual stages each micro-batch's backward runs on every chunk
                observed.append((index, count, {k: v.numpy().copy() for k, v in micro_batch.items()}))
            real(index, count, micro_batch, chunk)

        trainer.after_backward = recording
        trainer.train_step()
        second = strategy.measure_alignments(trainer.view)
        out[layout] = {
            "first_instep_domains": first.instep_domains,
            "alignments": second.alignments,
            "instep_domains": second.instep_domains,
            "instep_micro_batches": second.instep_micro_batches,
            "observed": observed if trainer.ctx.tp_rank == 0 and trainer.ctx.pp_rank == 0 else [],
            "backwards": len(observed),
            "micro_batches": 16 // 2 // trainer.ctx.dp_size,
            "params": params,
            "specific": specific,
            "model": trainer.cfg.model,
        }
    platform.shutdown()
    return out


def _references(rank, world_size, runs_by_layout):
    """Each layout's float64 reference (``_reference``), on one process."""
    from megatron_dga import platform

    platform.initialize(platform.ParallelConfig())
    out = {layout: _reference(runs) for layout, runs in runs_by_layout.items()}
    platform.shutdown()
    return out


def _reference(run_by_rank):
    """(a_i over the single-domain micro-batches of all ranks, micro-batches per domain), float64."""
    run = run_by_rank[0]
    params = {name: value for rank_run in run_by_rank for name, value in rank_run["params"].items()}
    gpt = Float64GPT(run["model"], params)
    g_spe = gpt.grad(run["specific"])
    sums, counts = {}, {}
    for rank_run in run_by_rank:
        for _, _, mb in rank_run["observed"]:
            domains = mb["basis_id"] if "basis_id" in mb else mb["domain_id"]  # over a basis: its labels
            if (domains != domains[0]).any():
                continue
            batch = {k: mb[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
            d = int(domains[0])
            sums[d] = sums.get(d, 0.0) + gpt.dot(gpt.grad(batch), g_spe)
            counts[d] = counts.get(d, 0) + 1
    return {d: sums[d] / counts[d] for d in sums}, counts


def _check_against_brute_force(shards, tmp_path, layouts, world_size):
    ranks = run_distributed(_one_window, world_size=world_size, args=(shards, str(tmp_path), layouts))
    by_layout = {layout: [r[layout] for r in ranks] for layout in layouts}
    references = run_distributed(_references, world_size=1, args=(by_layout,))[0]
    for layout, runs in by_layout.items():
        assert all(r["first_instep_domains"] == 0 for r in runs)  # no g_spe yet: every domain probed
        ref, counts = references[layout]
        # Grouped by domain, a global batch of 16 in micro-batches of 2 over 4 domains (3 bases): most are
        # single-domain.
        assert len(ref) >= 3, (layout, counts)
        per_rank = runs[0]["micro_batches"]
        # Every backward reported, on every stage; with overlap and one chunk the last one starts the
        # reduction (the interleaved schedule starts each chunk's after its last backward).
        expected = per_rank - 1 if "overlap" in layout and "vpp" not in layout else per_rank
        assert [r["backwards"] for r in runs] == [expected] * world_size, layout
        for rank_run in runs:
            assert rank_run["instep_domains"] == len(ref), layout
            assert rank_run["instep_micro_batches"] == sum(counts.values()), layout
            got = np.array([rank_run["alignments"][d] for d in sorted(ref)])
            want = np.array([ref[d] for d in sorted(ref)])
            scale = np.abs(want).max()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale, err_msg=layout)
            assert rank_run["alignments"].tobytes() == runs[0]["alignments"].tobytes()
        # The test can fail: forgetting the schedule's 1/n divides by 8 (4 per rank); a micro-batch
        # read after the reduction would add the other rank's half.
        assert np.abs(want / per_rank - want).max() > 100 * 1e-4 * scale


def test_instep_alignments_equal_float64_brute_force_on_every_layout(shards, tmp_path):
    _check_against_brute_force(shards, tmp_path, LAYOUTS, world_size=2)


def test_instep_alignments_on_pipeline_stages_with_the_overlapped_distributed_optimizer(shards, tmp_path):
    """The production combinations on 4 ranks: PP=2 x DP=2, with and without virtual stages, and TP=2 with
    sequence parallelism x DP=2, each with --use-distributed-optimizer --overlap-grad-reduce (small buckets:
    several reductions each)."""
    overlapped = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "5000"]
    layouts = {
        "pp2_dp2_distopt_overlap": ["--pipeline-model-parallel-size", "2", *overlapped],
        "vpp2_dp2_distopt_overlap": [*VPP, "--pipeline-model-parallel-size", "2", *overlapped],
        "tp2_sp_dp2_distopt_overlap": ["--tensor-model-parallel-size", "2", "--sequence-parallel", *overlapped],
    }
    _check_against_brute_force(shards, tmp_path, layouts, world_size=4)


BASIS = np.array([[0.85, 0.05, 0.05, 0.05], [0.05, 0.85, 0.05, 0.05], [0.05, 0.05, 0.45, 0.45]])


def test_instep_alignments_over_a_basis_group_micro_batches_by_basis_label(shards, tmp_path):
    """With --dga-basis each training row carries a basis label drawn from P(n | its fine domain) (so the rows
    labelled n are draws from P_n); micro-batches are grouped by label, and basis n's alignment is the mean
    over its single-label micro-batches: against the float64 brute force over the same micro-batches, DP=2,
    with and without DataLoader workers."""
    from megatron_dga.mixing.weights_io import save_basis

    basis = str(tmp_path / "basis.npz")
    save_basis(basis, BASIS, ["lean0", "lean1", "rest"], [f"dom{i}" for i in range(4)])
    layouts = {
        "dp2_basis": ["--dga-basis", basis],
        # DataLoader workers read the micro-batches; the labels are drawn and attached in the main process.
        "dp2_basis_workers": ["--dga-basis", basis, "--num-workers", "1"],
    }
    _check_against_brute_force(shards, tmp_path, layouts, world_size=2)


def test_instep_run_logs_in_step_updates_and_trains_on_the_same_batches(shards, tmp_path):
    """End to end (one process): the first update probes every domain, later ones read the training
    micro-batches; grouping the batch by domain leaves the first step's loss as the exact run's."""
    from megatron_dga.pretrain_gpt import main
    from megatron_dga.training.metrics import read_metrics

    runs = {}
    for estimator in ("exact", "instep"):
        log_dir = tmp_path / estimator
        argv = _argv(shards, log_dir, ["--dga-interval", "4"], iters=12)
        argv[argv.index("instep")] = estimator
        assert main(argv) == 0
        runs[estimator] = read_metrics(os.path.join(log_dir, "metrics.jsonl"))
    instep = [m for m in runs["instep"] if "dga_update" in m]
    assert [m["dga_instep_domains"] for m in instep][:1] == [0] and len(instep) == 3
    assert all(m["dga_instep_domains"] >= 3 and m["dga_instep_micro_batches"] >= 8 for m in instep[1:])
    assert all("dga_instep_domains" not in m for m in runs["exact"])
    assert runs["instep"][0]["lm_loss"] == pytest.approx(runs["exact"][0]["lm_loss"], rel=1e-6)


def test_cost_model_counts_only_the_specific_gradient():
    from megatron_dga.mixing.cost_model import dga_overhead

    assert dga_overhead(4, 8, 16, 10, 16, "instep") == 16 / (10 * 16)
    assert dga_overhead(4, 8, 16, 10, 16, "exact") == (4 * 8 + 16) / (10 * 16)


def test_micro_batches_of_several_domains_are_named_with_the_fix(shards, tmp_path, caplog):
    # One micro-batch of the whole batch of 16 over 4 domains: nothing is single-domain, so every update
    # probes every domain; said once, with the flag that fixes it.
    from megatron_dga.pretrain_gpt import main

    argv = _argv(shards, tmp_path, ["--dga-interval", "2"], iters=6)
    argv[argv.index("--micro-batch-size") + 1] = "16"
    with caplog.at_level("WARNING", logger="megatron_dga.mixing.instep"):
        assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "megatron_dga.mixing.instep"]
    assert len(said) == 1, said
    assert "no domain drew 1 single-domain training micro-batch(es)" in said[0]
    assert "micro-batches of 16 sequences over 4 domains" in said[0] and "--micro-batch-size 1 or 2" in said[0]
