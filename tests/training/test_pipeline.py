"""Pipeline parallelism (GPipe schedule over gloo): PP=2 trains like one process.

Two spawns carry all checks (each costs ~5 s of imports): one single-process reference
run per configuration, then one PP=2 job that runs the same configurations, the
tied-embedding checks and a checkpoint/resume round trip. The PP stages start from the
reference's initial weights (loaded by global parameter name), so losses and final
weights must agree up to float reordering.
"""

import os

import numpy as np
import pytest

from tests.helpers.dist_utils import run_distributed
from tests.helpers.layouts import EMBEDDING, load_initial as _load_initial, named as _named
from tests.helpers.layouts import gathered_stages as _gathered, logged_metrics as _metrics, losses as _losses
from tests.helpers.layouts import pipeline_argv, shared_copy as _shared_copy, trainer_from as _trainer

ITERS = 4

# name -> extra flags; each runs on one process and on PP=2.
CONFIGS = {
    "tied_2mb": ["--micro-batch-size", "4", "--eval-interval", "2", "--eval-iters", "1"],
    "untied_4mb": ["--micro-batch-size", "2", "--untie-embeddings-and-output-weights"],
    "dga": ["--micro-batch-size", "4", "--mixing", "dga", "--dga-interval", "2", "--dga-specific-batch-size", "8"],
    # Forward-only pipeline passes (per-token losses on every stage) at shifted weights.
    "dga_fd": [
        "--micro-batch-size",
        "4",
        "--mixing",
        "dga",
        "--dga-interval",
        "2",
        "--dga-specific-batch-size",
        "8",
        "--dga-estimator",
        "fd",
    ],
}


def _argv(shards, log_dir, extra, iters=ITERS):
    return pipeline_argv(shards, log_dir, extra, iters)


def _reference(rank, world_size, runs):
    out = {}
    for name, (argv, log_dir) in runs.items():
        trainer = _trainer(argv)
        init = _named(trainer)
        last = trainer.train()
        out[name] = {"init": init, "final": _named(trainer), "metrics": _metrics(trainer, log_dir), "last": last}
    return out


def _pipelined(rank, world_size, runs, inits, resume):
    out = {}
    for name, (argv, log_dir) in runs.items():
        trainer = _trainer(argv)
        shared = _shared_copy(trainer)
        # megatron copies the first stage's embedding into the last stage's tied copy at construction.
        built = _named(trainer).get(EMBEDDING)
        constructed_shared = None if shared is None else shared.detach().numpy().copy()
        _load_initial(trainer, inits[name])
        last = trainer.train()
        shared = _shared_copy(trainer)
        out[name] = {
            "final": _named(trainer),
            "metrics": _metrics(trainer, log_dir),
            "last": last,
            "built_embedding": built,
            "built_shared": constructed_shared,
            "final_shared": None if shared is None else shared.detach().numpy().copy(),
        }
    out["resume"] = {}
    for step, argv in resume:
        trainer = _trainer(argv)
        trainer.train()
        out["resume"][step] = {
            "final": _named(trainer),
            "metrics": _metrics(trainer, argv[argv.index("--log-dir") + 1]),
        }
    return out


def _four_ranks(rank, world_size, runs, init):
    """PP=2 combined with DP=2, with TP=2 and with TP=2 + sequence parallelism on the same four processes."""
    out = {}
    for name, (argv, log_dir) in runs.items():
        from megatron_dga.model import global_parameter_names

        trainer = _trainer(argv)
        _load_initial(trainer, init)
        last = trainer.train()
        ctx = trainer.ctx
        dims = {
            n: p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            for n, p in global_parameter_names(trainer.model).items()
        }
        out[name] = {
            "final": _named(trainer) if ctx.dp_rank == 0 else None,
            "dims": dims,
            "tp_rank": ctx.tp_rank,
            "metrics": _metrics(trainer, log_dir),
            "last": last,
        }
    return out


@pytest.fixture(scope="module")
def results(shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp")
    ref_runs = {
        name: (_argv(shards, tmp / f"ref_{name}", extra), str(tmp / f"ref_{name}")) for name, extra in CONFIGS.items()
    }
    reference = run_distributed(_reference, world_size=1, args=(ref_runs,))[0]
    pp = ["--pipeline-model-parallel-size", "2"]
    pp_runs = {
        name: (_argv(shards, tmp / f"pp_{name}", extra + pp), str(tmp / f"pp_{name}"))
        for name, extra in CONFIGS.items()
    }
    ckpt = str(tmp / "ckpt")
    base = ["--micro-batch-size", "2", "--mixing", "dga", "--dga-interval", "2"] + pp
    resume = [
        ("straight", _argv(shards, tmp / "straight", base, iters=6)),
        ("first", _argv(shards, tmp / "resumed", base + ["--exit-interval", "3", "--save", ckpt], iters=6)),
        ("resumed", _argv(shards, tmp / "resumed", base + ["--load", ckpt], iters=6)),
    ]
    inits = {name: reference[name]["init"] for name in CONFIGS}
    ranks = run_distributed(_pipelined, world_size=2, args=(pp_runs, inits, resume))
    four = {
        layout: (_argv(shards, tmp / layout, CONFIGS["dga"] + pp + extra), str(tmp / layout))
        for layout, extra in (
            ("dp2", []),
            ("tp2", ["--tensor-model-parallel-size", "2"]),
            ("tp2_sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        )
    }
    four_ranks = run_distributed(_four_ranks, world_size=4, args=(four, inits["dga"]))
    return {"reference": reference, "ranks": ranks, "ckpt": ckpt, "four": four_ranks}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pp2_matches_one_process(results, name):
    ref = results["reference"][name]
    ranks = results["ranks"]
    np.testing.assert_allclose(_losses(ranks[1][name]["metrics"]), _losses(ref["metrics"]), rtol=1e-5)
    # Adam hides a mis-scaled gradient; the norm (over both stages, tied copy once) does not.
    np.testing.assert_allclose(
        [m["grad_norm"] for m in ranks[1][name]["metrics"]], [m["grad_norm"] for m in ref["metrics"]], rtol=1e-5
    )
    # The loss is known on every stage, not only the last.
    assert ranks[0][name]["last"]["lm_loss"] == ranks[1][name]["last"]["lm_loss"]
    final = _gathered(ranks, name)
    assert sorted(final) == sorted(ref["final"])
    rtol = 1e-4 if name.startswith("dga") else 1e-5
    for pname, value in ref["final"].items():
        np.testing.assert_allclose(final[pname], value, rtol=rtol, atol=1e-6, err_msg=pname)
    # The weights moved: the comparison is not between two untouched initialisations.
    assert max(np.abs(ref["final"][p] - ref["init"][p]).max() for p in ref["final"]) > 1e-3


def test_eval_and_dga_weights_match(results):
    ref, ranks = results["reference"], results["ranks"]
    for rank in ranks:
        np.testing.assert_allclose(
            rank["tied_2mb"]["last"]["specific_eval_loss"], ref["tied_2mb"]["last"]["specific_eval_loss"], rtol=1e-5
        )
        np.testing.assert_allclose(
            rank["tied_2mb"]["last"]["domain_eval_loss"], ref["tied_2mb"]["last"]["domain_eval_loss"], rtol=1e-5
        )
        for name in ("dga", "dga_fd"):
            np.testing.assert_allclose(
                rank[name]["last"]["domain_weights"], ref[name]["last"]["domain_weights"], rtol=1e-4, atol=1e-7
            )
    for name in ("dga", "dga_fd"):
        assert not np.allclose(ref[name]["last"]["domain_weights"], 1 / 3, rtol=1e-3)  # DGA did update


def test_tied_embedding_copies_stay_identical(results):
    first, last = results["ranks"]
    for name in ("tied_2mb", "dga", "dga_fd"):
        # At construction megatron copied the first stage's embedding into the last stage.
        np.testing.assert_array_equal(last[name]["built_shared"], first[name]["built_embedding"])
        np.testing.assert_array_equal(last[name]["final_shared"], first[name]["final"][EMBEDDING])
    assert last["untied_4mb"]["final_shared"] is None
    assert "output_layer.weight" in last["untied_4mb"]["final"]


def test_checkpoint_resume_is_bit_identical(results):
    from megatron_dga.training.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(os.path.join(results["ckpt"], "iter_0000003"))
    assert meta["ckpt_format"] == "torch_dist" and meta["layout"]["pp_size"] == 2
    assert any(name.endswith(".distcp") for name in meta["files"])
    ranks = results["ranks"]
    straight = ranks[1]["resume"]["straight"]["metrics"]
    resumed = ranks[1]["resume"]["resumed"]["metrics"]
    first = ranks[1]["resume"]["first"]["metrics"]
    assert [m["iteration"] for m in resumed] == list(range(1, 7))
    np.testing.assert_array_equal(_losses(resumed), _losses(straight))
    np.testing.assert_array_equal(_losses(first), _losses(straight)[:3])
    for rank in ranks:
        a, b = rank["resume"]["resumed"]["final"], rank["resume"]["straight"]["final"]
        assert sorted(a) == sorted(b)
        for pname in a:
            np.testing.assert_array_equal(a[pname], b[pname], err_msg=pname)


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2_sp"])
def test_pp2_with_dp2_or_tp2_matches_one_process(results, layout):
    ref, four = results["reference"]["dga"], results["four"]
    metrics = four[-1][layout]["metrics"]
    np.testing.assert_allclose(_losses(metrics), _losses(ref["metrics"]), rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in metrics], [m["grad_norm"] for m in ref["metrics"]], rtol=1e-5)
    for rank in four:
        np.testing.assert_allclose(
            rank[layout]["last"]["domain_weights"], ref["last"]["domain_weights"], rtol=1e-4, atol=1e-7
        )
    # Stages' parameters by global name; TP shards concatenated along their partition dim.
    shards = {}
    for rank in sorted(four, key=lambda r: r[layout]["tp_rank"]):
        for pname, value in (rank[layout]["final"] or {}).items():
            shards.setdefault(pname, []).append((value, rank[layout]["dims"][pname]))
    assert sorted(shards) == sorted(ref["final"])
    for pname, value in ref["final"].items():
        parts = shards[pname]
        dim = parts[0][1]
        final = parts[0][0] if dim is None else np.concatenate([v for v, _ in parts], axis=dim)
        # atol: Adam turns the key bias's (analytically zero) gradient noise into ~1e-6 steps.
        np.testing.assert_allclose(final, value, rtol=1e-4, atol=1e-5, err_msg=pname)
