"""Virtual pipeline stages (megatron-core's interleaved 1F1B schedule over gloo): PP=2 with two model
chunks per rank trains like one process, resumes bit-identically, and its checkpoint loads into a
PP=2 run without virtual stages.

Two spawns carry every check (each costs ~5 s of imports): one single-process reference run per
configuration, then one PP=2 job with --num-layers-per-virtual-pipeline-stage 1 (4 layers: rank 0
holds layers 0 and 2, rank 1 layers 1 and 3) that runs the same configurations from the reference's
initial weights (loaded by global parameter name, as tests/training/test_pipeline.py does) and the
save/resume runs. The configurations reach every shape of call the schedule gets: training
steps of 4 micro-batches (groups of PP), DGA probes of 3 micro-batches (a group of 3) of unequal
sizes (2, 2, 1 sequences: shapes sent first), and 1-micro-batch evaluations (padded to PP).
"""

import os

import numpy as np
import pytest

from tests.helpers.dist_utils import run_distributed
from tests.helpers.layouts import EMBEDDING, gathered_stages as _gathered, logged_metrics as _metrics, losses as _losses
from tests.helpers.layouts import pipeline_argv, trainer_from as _trainer

VPP = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
DGA = [
    "--micro-batch-size",
    "2",
    "--mixing",
    "dga",
    "--dga-interval",
    "2",
    "--dga-domain-batch-size",
    "6",
    "--dga-specific-batch-size",
    "5",
]
CONFIGS = {
    "dga": DGA + ["--eval-interval", "2", "--eval-iters", "1"],
    # Forward-only interleaved passes (per-token losses on every stage) at shifted weights.
    "dga_fd": DGA + ["--dga-estimator", "fd"],
}
ITERS = 4


def _argv(shards, log_dir, extra, iters=ITERS):
    return pipeline_argv(shards, log_dir, extra, iters)


def _reference(rank, world_size, runs):
    out = {}
    for name, (argv, log_dir) in runs.items():
        trainer = _trainer(argv)
        init = _named_chunks(trainer)
        last = trainer.train()
        out[name] = {"init": init, "final": _named_chunks(trainer), "metrics": _metrics(trainer, log_dir), "last": last}
    return out


def _chunk_facts(trainer):
    """What each chunk of this rank holds: (global layer numbers, embeds, has the output layer)."""
    return [
        ([layer.layer_number for layer in core.decoder.layers], core.pre_process, core.post_process)
        for core in trainer.chunks
    ]


def _load_initial(trainer, init):
    """The reference's initial weights into every chunk (the last chunk's tied embedding copy too)."""
    import torch

    from megatron_dga.model import global_parameter_names

    with torch.no_grad():
        for name, p in global_parameter_names(trainer.chunks).items():
            p.copy_(torch.from_numpy(init[name]))
        last = trainer.chunks[-1]
        if last.post_process and not last.pre_process and last.share_embeddings_and_output_weights:
            last.shared_embedding_or_output_weight().copy_(torch.from_numpy(init[EMBEDDING]))


def _interleaved(rank, world_size, runs, inits, resume):
    out = {}
    for name, (argv, log_dir) in runs.items():
        trainer = _trainer(argv)
        _load_initial(trainer, inits[name])
        last = trainer.train()
        out[name] = {
            "final": _named_chunks(trainer),
            "metrics": _metrics(trainer, log_dir),
            "last": last,
            "chunks": _chunk_facts(trainer),
            "num_params": len(trainer.params),
            "counted": sum(trainer.view.counted()),
        }
    out["resume"] = {}
    for step, argv in resume:
        trainer = _trainer(argv)
        trainer.train()
        log_dir = argv[argv.index("--log-dir") + 1]
        out["resume"][step] = {"final": _named_chunks(trainer), "metrics": _metrics(trainer, log_dir)}
    return out


def _named_chunks(trainer):
    from megatron_dga.model import global_parameter_names

    return {name: p.detach().cpu().numpy().copy() for name, p in global_parameter_names(trainer.chunks).items()}


@pytest.fixture(scope="module")
def results(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vpp")
    ref_runs = {
        name: (_argv(shards, tmp / f"ref_{name}", extra), str(tmp / f"ref_{name}")) for name, extra in CONFIGS.items()
    }
    reference = run_distributed(_reference, world_size=1, args=(ref_runs,))[0]
    runs = {
        name: (_argv(shards, tmp / f"vpp_{name}", extra + VPP), str(tmp / f"vpp_{name}"))
        for name, extra in CONFIGS.items()
    }
    ckpt = str(tmp / "ckpt")
    base = DGA + VPP
    resume = [
        ("straight", _argv(shards, tmp / "straight", base, iters=6)),
        ("first", _argv(shards, tmp / "resumed", base + ["--exit-interval", "4", "--save", ckpt], iters=6)),
        ("resumed", _argv(shards, tmp / "resumed", base + ["--load", ckpt], iters=6)),
        # The same checkpoint without virtual stages (plain 1F1B on the same two ranks).
        ("pp2", _argv(shards, tmp / "pp2", DGA + VPP[:2] + ["--load", ckpt], iters=6)),
    ]
    ranks = run_distributed(
        _interleaved, world_size=2, args=(runs, {name: reference[name]["init"] for name in CONFIGS}, resume)
    )
    return {"reference": reference, "ranks": ranks, "ckpt": ckpt}


def test_each_rank_holds_two_interleaved_chunks(results):
    first, last = results["ranks"]
    # Virtual stage i * PP + r of a 4-layer model with one layer per virtual stage.
    assert first["dga"]["chunks"] == [([1], True, False), ([3], False, False)]
    assert last["dga"]["chunks"] == [([2], False, False), ([4], False, True)]
    # Every chunk's parameters reach DGA, each once; the last chunk's tied embedding copy is not counted.
    ref = results["reference"]["dga"]["final"]
    assert sum(rank["dga"]["num_params"] for rank in results["ranks"]) == len(ref) + 1
    assert sum(rank["dga"]["counted"] for rank in results["ranks"]) == len(ref)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_interleaved_pp2_matches_one_process(results, name):
    ref, ranks = results["reference"][name], results["ranks"]
    np.testing.assert_allclose(_losses(ranks[1][name]["metrics"]), _losses(ref["metrics"]), rtol=1e-5)
    np.testing.assert_allclose(
        [m["grad_norm"] for m in ranks[1][name]["metrics"]], [m["grad_norm"] for m in ref["metrics"]], rtol=1e-5
    )
    assert ranks[0][name]["last"]["lm_loss"] == ranks[1][name]["last"]["lm_loss"]
    final = _gathered(ranks, name)
    assert sorted(final) == sorted(ref["final"])
    for pname, value in ref["final"].items():
        np.testing.assert_allclose(final[pname], value, rtol=1e-4, atol=1e-6, err_msg=pname)
    # DGA updated the weights at iterations 2 and 4, identically on both ranks and as one process.
    assert not np.allclose(ref["last"]["domain_weights"], 1 / 3, rtol=1e-3)
    for rank in ranks:
        np.testing.assert_allclose(
            rank[name]["last"]["domain_weights"], ref["last"]["domain_weights"], rtol=1e-4, atol=1e-7
        )


def test_padded_one_micro_batch_evaluation_matches(results):
    ref, ranks = results["reference"]["dga"], results["ranks"]
    for rank in ranks:
        for key in ("specific_eval_loss", "domain_eval_loss"):
            np.testing.assert_allclose(rank["dga"]["last"][key], ref["last"][key], rtol=1e-5)


def test_checkpoint_resumes_without_virtual_stages(results):
    """model0/model1 hold the layers under their global numbers: a PP=2 run without virtual stages
    continues the run (same math, another schedule: equal to float rounding)."""
    straight = results["ranks"][1]["resume"]["straight"]["metrics"]
    pp2 = results["ranks"][1]["resume"]["pp2"]["metrics"]
    assert [m["iteration"] for m in pp2] == [5, 6]
    np.testing.assert_allclose(_losses(pp2), _losses(straight)[4:], rtol=1e-5)
    np.testing.assert_allclose(pp2[-1]["domain_weights"], straight[-1]["domain_weights"], rtol=1e-4, atol=1e-7)


def test_interleaved_resume_is_bit_identical(results):
    from megatron_dga.training.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(os.path.join(results["ckpt"], "iter_0000004"))
    assert meta["extra"]["virtual_pipeline_stages"] == 2
    ranks = results["ranks"]
    straight = ranks[1]["resume"]["straight"]["metrics"]
    resumed = ranks[1]["resume"]["resumed"]["metrics"]
    assert [m["iteration"] for m in resumed] == list(range(1, 7))
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    assert resumed[-1]["domain_weights"] == straight[-1]["domain_weights"]
    for rank in ranks:
        a, b = rank["resume"]["resumed"]["final"], rank["resume"]["straight"]["final"]
        assert sorted(a) == sorted(b)
        for pname in a:
            np.testing.assert_array_equal(a[pname], b[pname], err_msg=pname)


# ----------------------------------------------------------------------------- flags (no processes)

BASE = ["--data-path", "a_text_document", "--num-layers", "8"]


@pytest.mark.parametrize(
    "flags, vp",
    [
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], 2),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 4),
        (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "4"], 4),
        # One chunk per rank is the plain 1F1B schedule (Megatron sets no virtual size either).
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "4"], None),
        (["--pipeline-model-parallel-size", "2"], None),
    ],
)
def test_virtual_stages_per_rank(flags, vp):
    from megatron_dga.training.arguments import parse_args

    assert parse_args(BASE + flags).parallel.virtual_pipeline_model_parallel_size == vp


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--num-layers-per-virtual-pipeline-stage", "2"],
            "--num-layers-per-virtual-pipeline-stage 2 interleaves the stages of a pipeline, and "
            "--pipeline-model-parallel-size is 1; add --pipeline-model-parallel-size 2 (or more) or drop",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
            "--num-layers 8 is not divisible by --pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage "
            "3 = 6 (layers per virtual stage); use a --num-layers that is a multiple of 6",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "3"],
            "--num-layers 8 is not divisible by --pipeline-model-parallel-size 2 x --num-virtual-stages-per-pipeline-rank "
            "3 = 6 (virtual stages per rank)",
        ),
        (
            [
                "--pipeline-model-parallel-size",
                "2",
                "--num-layers-per-virtual-pipeline-stage",
                "1",
                "--num-virtual-stages-per-pipeline-rank",
                "4",
            ],
            "both set the virtual pipeline stages (Megatron takes one",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "0"],
            "--num-virtual-stages-per-pipeline-rank must be a positive integer, got 0",
        ),
        (["--context-parallel-size", "0"], "--context-parallel-size must be a positive integer, got 0"),
    ],
)
def test_virtual_pipeline_flags_that_cannot_work(flags, message):
    from megatron_dga.errors import ConfigError
    from megatron_dga.training.arguments import parse_args

    with pytest.raises(ConfigError) as exc:
        parse_args(BASE + flags)
    assert message in str(exc.value)


def test_training_steps_must_fill_the_interleaved_groups():
    from megatron_dga.errors import ConfigError
    from megatron_dga.training.step import check_interleaved_micro_batches

    check_interleaved_micro_batches(4, 2, 2, "flags")  # groups of PP=2
    check_interleaved_micro_batches(3, 2, 1, "flags")  # no virtual stages: 1F1B takes any count
    with pytest.raises(ConfigError) as exc:
        check_interleaved_micro_batches(
            3, 2, 2, "--global-batch-size 6 / (--micro-batch-size 2 x data-parallel size 1)"
        )
    assert str(exc.value).startswith(
        "--global-batch-size 6 / (--micro-batch-size 2 x data-parallel size 1) gives 3 micro-batches per step, and the "
        "interleaved pipeline schedule (--pipeline-model-parallel-size 2 with 2 virtual stages per rank) runs them in "
        "groups of 2: use a --global-batch-size that gives a multiple of 2 micro-batches"
    )


def test_short_calls_are_padded_with_micro_batches_that_carry_no_loss():
    import torch

    from megatron_dga.training.step import _PADDING, _pad_for_interleaving

    one = [{"tokens": torch.ones(2, 4, dtype=torch.long), "loss_mask": torch.ones(2, 4)}]
    padded = _pad_for_interleaving(one, num_chunks=2, pp_size=3)
    assert len(padded) == 3 and padded[0] is one[0]
    assert all(mb[_PADDING] and not mb["loss_mask"].any() for mb in padded[1:])
    assert _pad_for_interleaving(one, num_chunks=1, pp_size=3) == one  # 1F1B takes a single micro-batch
