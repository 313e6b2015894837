"""The online mixers beside DGA: ODM (mixing/odm.py) and PiKE (mixing/pike.py).

Each against an oracle written here (EXP3 in float64 numpy on losses recomputed by a forward pass of
the same batches; PiKE's statistics from float64 gradients of the same probe halves), several ranks
against one process, resumed and re-laid-out runs against an uninterrupted one, and their flags.
"""

import math
import os

import numpy as np
import pytest
import torch

from tests.helpers.dist_utils import run_distributed, run_trainers
from tests.helpers.gradient_oracle import Float64GPT, gathered
from tests.helpers.synthetic import data_flags, run_argv


def _argv(shards, log_dir, iters, extra=()):
    return run_argv(log_dir, extra, data=data_flags(shards, specific=False), iters=iters)


def _trainer(argv):
    torch.set_num_threads(1)
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer

    cfg = parse_args(argv)
    return Trainer(cfg, platform.initialize(cfg.parallel))


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"strategy": "uniform", "odm_interval": 3}, "--odm-interval 3 given without --mixing odm"),
        ({"strategy": "dga", "pike_penalty": 2.0}, "--pike-penalty 2.0 given without --mixing pike"),
        ({"strategy": "odm", "dga_eta": 3.0}, "--dga-eta 3.0 given without --mixing dga"),
        ({"strategy": "odm", "odm_reward_ema": 1.0}, "--odm-reward-ema must be in [0, 1)"),
        ({"strategy": "pike", "pike_domain_batch_size": 1}, "--pike-domain-batch-size must be >= 2"),
        ({"strategy": "pike", "pike_ema": 0.0}, "--pike-ema must be in (0, 1]"),
    ],
)
def test_each_mixers_flags_act_with_it_only(fields, message):
    from megatron_dga.errors import ConfigError
    from megatron_dga.mixing.config import MixingConfig

    with pytest.raises(ConfigError) as info:
        MixingConfig(**fields)
    assert message in str(info.value)


@pytest.mark.parametrize("mixing", ["odm", "pike"])
def test_data_path_weights_are_refused_by_mixers_that_start_uniform(mixing):
    from megatron_dga.errors import ConfigError
    from megatron_dga.mixing.config import MixingConfig

    cfg = MixingConfig(strategy=mixing)
    with pytest.raises(ConfigError, match=rf"--mixing {mixing} would ignore \(it starts uniform\)"):
        cfg.resolve_data_path_weights([0.5, 0.5])


def test_odm_refuses_a_state_that_is_not_its_own():
    from megatron_dga.errors import CheckpointError
    from megatron_dga.mixing.base import DomainInfo, build_mixing
    from megatron_dga.mixing.config import MixingConfig

    domains = DomainInfo(["a", "b", "c"], np.ones(3), np.ones(3))
    odm = build_mixing(MixingConfig(strategy="odm"), domains)
    good = {"weights": [1 / 3] * 3, "rewards": [0.0, 1.0, 2.0], "updates": 2, "pending": None}
    odm.check_state(good, "checkpoint c", "fix it")
    odm.load_state_dict(good)
    assert odm.state_dict() == good
    for bad, named in (
        ({"rewards": [0.0, 1.0]}, "ODM rewards is"),
        ({"rewards": [0.0, float("nan"), 1.0]}, "ODM rewards holds"),
        ({"updates": -1}, "ODM updates is -1"),
        ({"pending": [[1.0, 2.0]]}, "ODM pending sums"),
        ({"weights": [0.5, 0.6, 0.0]}, "mixing weights sums to 1.1"),
    ):
        with pytest.raises(CheckpointError, match=rf"^checkpoint c: {named}.*fix it"):
            odm.check_state({**good, **bad}, "checkpoint c", "fix it")


# ----------------------------------------------------------------------------- ODM against EXP3 in float64


def _exp3_reference(losses_per_update, k, alpha):
    """Albalak et al.'s Algorithm 1, written out: the weights after each update."""
    rewards, weights, out = np.zeros(k), np.full(k, 1.0 / k), []
    for t, (loss_sum, tokens) in enumerate(losses_per_update, start=1):
        for i in range(k):
            if tokens[i] > 0:
                rewards[i] = alpha * rewards[i] + (1 - alpha) * (loss_sum[i] / tokens[i]) / weights[i]
        eps = min(1 / k, math.sqrt(math.log(k) / (k * t)))
        eps_prev = min(1 / k, math.sqrt(math.log(k) / (k * (t - 1)))) if t > 1 else 1 / k
        z = np.exp(eps_prev * rewards - (eps_prev * rewards).max())
        weights = (1 - k * eps) * z / z.sum() + eps
        out.append(weights.copy())
    return out


def _odm_run(rank, world_size, argv, steps):
    from megatron_dga.training.step import forward_backward

    trainer = _trainer(argv)
    k = trainer.data.domain_info.k
    draw = trainer.data.next_train_micro_batches
    recomputed = []

    def draw_and_recompute():
        # The same micro-batches, forward only on the weights the step starts from: the oracle's losses.
        micro_batches = draw()
        stats = forward_backward(trainer.ddp_chunks, micro_batches, trainer.ctx.device, forward_only=True)
        sums = np.zeros((2, k))
        for d, s in stats.per_domain_loss_sum.items():
            sums[0, d], sums[1, d] = s, stats.per_domain_tokens[d]
        recomputed.append(sums)
        return micro_batches

    trainer.data.next_train_micro_batches = draw_and_recompute
    step_sums, weights = [], []
    for _ in range(steps):
        trainer.train_step()
        trainer.iteration += 1
        step_sums.append(trainer.view.step_domain_losses().numpy().copy())  # the step's; reading it moves nothing
        new = trainer.mixing.after_step(trainer.view)
        if new is not None:
            trainer.data.set_weights(new)
            weights.append(new)
    return {"recomputed": recomputed, "step_sums": step_sums, "weights": weights, "k": k}


def test_odm_weights_follow_exp3_on_the_steps_own_losses(shards, tmp_path):
    interval, steps, alpha = 2, 16, 0.5
    argv = _argv(
        shards, tmp_path, steps, ["--mixing", "odm", "--odm-interval", str(interval), "--odm-reward-ema", str(alpha)]
    )
    run = run_distributed(_odm_run, world_size=1, args=(argv, steps))[0]
    # The step's device sums are the host path's per-domain sums of the same batches.
    np.testing.assert_allclose(np.array(run["step_sums"]), np.array(run["recomputed"]), rtol=1e-6)
    assert all(s[1].sum() == 8 * 32 for s in run["step_sums"])  # every token of the global batch, once
    windows = [sum(run["recomputed"][i : i + interval]) for i in range(0, steps, interval)]
    expected = _exp3_reference(windows, run["k"], alpha)
    np.testing.assert_allclose(np.array(run["weights"]), np.array(expected), rtol=1e-6, atol=0)
    # The bandit explores uniformly while K eps_t = 1 (t <= ln 3 * 3), then exploits: the test can fail.
    np.testing.assert_array_equal(run["weights"][0], np.full(3, 1 / 3))
    assert np.abs(run["weights"][-1] - 1 / 3).max() > 1e-3


# ----------------------------------------------------------------------------- PiKE against float64 gradients


PROBE = 6
"""PiKE's probe: 3 sequences per rank at DP=2 (halves of 1 and 2), 6 at TP=2 (3 and 3)."""


def _pike_layout(shards, log_dir, tp, rank):
    from megatron_dga.mixing.pike import gradient_statistics

    trainer = _trainer(
        _argv(
            shards,
            log_dir,
            100,
            [
                "--mixing",
                "pike",
                "--pike-interval",
                "1",
                "--pike-domain-batch-size",
                str(PROBE),
                "--tensor-model-parallel-size",
                str(tp),
            ],
        )
    )
    for _ in range(2):
        trainer.train_step()
        trainer.iteration += 1
    sampler = trainer.data.sampler
    state = sampler.state_dict()
    stats = gradient_statistics(trainer.view, [0, 1, 2], PROBE)
    sampler.load_state_dict(state)
    new = trainer.mixing.after_step(trainer.view)  # one update from the same probes: identical everywhere
    named = list(trainer.model.named_parameters())
    out = {
        "stats": stats,
        "weights_bytes": new.tobytes(),
        "model": trainer.cfg.model,
        "params": {n: gathered(p, p, tp) for n, p in named},
        "dp": trainer.ctx.dp_size,
    }
    sampler.load_state_dict(state)
    fetch = lambda rows: {key: t.numpy() for key, t in trainer.data.fetch(rows).items()}
    out["domains"] = [fetch(sampler.probe_batch(i, PROBE)) for i in range(3)]
    return out


def _pike_reference(run):
    """|g_i|^2 and tr(Sigma_i) as each data-parallel rank splits its share, averaged by share."""
    gpt = Float64GPT(run["model"], run["params"])
    grad_sq, noise = [], []
    for batch in run["domains"]:
        rows = np.arange(len(batch["tokens"]))
        g2 = tr = 0.0
        for share in np.array_split(rows, run["dp"]):  # data.sampler.rank_micro_batches
            a, b = share[: len(share) // 2], share[len(share) // 2 :]
            ga, gb = (gpt.grad({key: v[idx] for key, v in batch.items()}) for idx in (a, b))
            cross = gpt.dot(ga, gb)
            weight = len(share) / len(rows)
            g2 += weight * cross
            tr += weight * (gpt.dot(ga, ga) + gpt.dot(gb, gb) - 2 * cross) / (1 / len(a) + 1 / len(b))
        grad_sq.append(g2)
        noise.append(tr)
    return np.array(grad_sq), np.array(noise)


def _pike_layouts(rank, world_size, shards, tmp):
    from megatron_dga import platform

    runs = {name: _pike_layout(shards, os.path.join(tmp, name), tp, rank) for name, tp in (("dp2", 1), ("tp2", 2))}
    platform.initialize(platform.ParallelConfig(tensor_model_parallel_size=1))
    out = {}
    for name, run in runs.items():
        out[name] = {"stats": run["stats"], "weights_bytes": run["weights_bytes"]}
        if rank == 0:
            out[name]["reference"] = _pike_reference(run)
    platform.shutdown()
    return out


def test_pike_statistics_equal_float64_reference_on_two_layouts(shards, tmp_path):
    ranks = run_distributed(_pike_layouts, world_size=2, args=(shards, str(tmp_path)))
    for layout in ("dp2", "tp2"):
        grad_sq, noise = ranks[0][layout]["reference"]
        for rank in ranks:
            got = rank[layout]["stats"]
            # fp32 gradients against float64 ones: 1e-4 of the largest value (the tied embedding or a
            # TP-duplicated norm counted twice would be off by far more).
            np.testing.assert_allclose(got[0], grad_sq, rtol=0, atol=1e-4 * np.abs(grad_sq).max(), err_msg=layout)
            np.testing.assert_allclose(got[1], noise, rtol=0, atol=1e-4 * noise.max(), err_msg=layout)
            np.testing.assert_array_equal(got[3], [PROBE * (2 if layout == "tp2" else 1)] * 3)
            assert rank[layout]["weights_bytes"] == ranks[0][layout]["weights_bytes"]
        assert noise.min() > 0 and not np.allclose(noise, noise[0])


def test_pike_needs_two_probe_sequences_per_rank():
    from megatron_dga.errors import ConfigError
    from megatron_dga.mixing.base import DomainInfo, build_mixing
    from megatron_dga.mixing.config import MixingConfig

    pike = build_mixing(
        MixingConfig(strategy="pike", pike_domain_batch_size=6), DomainInfo(["a", "b"], np.ones(2), np.ones(2))
    )

    class FourRanks:
        def data_parallel(self):
            return 0, 4

    with pytest.raises(
        ConfigError,
        match="--pike-domain-batch-size 6 gives some of the 4 data-parallel ranks fewer "
        "than 2 probe sequences to split in halves; use at least 8",
    ):
        pike.setup(FourRanks())


# ----------------------------------------------------------------------------- resume, layout change


@pytest.mark.parametrize(
    "mixer",
    [
        ["--mixing", "odm", "--odm-interval", "2"],
        ["--mixing", "pike", "--pike-interval", "2", "--pike-domain-batch-size", "4"],
    ],
    ids=["odm", "pike"],
)
def test_resume_is_bit_identical_and_another_layout_continues_the_run(shards, tmp_path, mixer):
    ckpt = str(tmp_path / "ckpt")
    runs = run_trainers(
        {
            "straight": _argv(shards, tmp_path / "a", 12, mixer),
            # Saved at 5: mid-interval, ODM's loss sums of step 5 are pending in its state.
            "first": _argv(shards, tmp_path / "b", 12, [*mixer, "--exit-interval", "5", "--save", ckpt]),
            "resumed": _argv(shards, tmp_path / "b", 12, [*mixer, "--load", ckpt]),
            "tp2": _argv(shards, tmp_path / "c", 12, [*mixer, "--load", ckpt, "--tensor-model-parallel-size", "2"]),
        },
        world_size=2,
    )
    straight, resumed, tp2 = (runs[name]["metrics"] for name in ("straight", "resumed", "tp2"))
    assert [m["iteration"] for m in resumed] == list(range(1, 13))
    assert [m["lm_loss"] for m in resumed] == [m["lm_loss"] for m in straight]
    assert [m["domain_weights"] for m in resumed] == [m["domain_weights"] for m in straight]
    # The mixture moved after the save (else the comparison proves nothing).
    assert np.abs(np.array(straight[-1]["domain_weights"]) - np.array(straight[4]["domain_weights"])).max() > 1e-4
    # At TP=2 (DP=1) the run continues from the checkpoint's model, data stream and mixing state.
    assert [m["iteration"] for m in tp2] == list(range(6, 13))
    if mixer[1] == "odm":  # the same losses and weights, to fp32 rounding
        np.testing.assert_allclose([m["lm_loss"] for m in tp2], [m["lm_loss"] for m in straight[5:]], rtol=1e-5)
        np.testing.assert_allclose(
            [m["domain_weights"] for m in tp2], [m["domain_weights"] for m in straight[5:]], rtol=1e-4
        )
    else:  # PiKE's halves are per data-parallel rank: at DP=1 its estimates differ from DP=2's, as designed
        assert tp2[0]["lm_loss"] == pytest.approx(straight[5]["lm_loss"], rel=1e-5)
        assert tp2[0]["pike_update"] == straight[5]["pike_update"] == 3


# ----------------------------------------------------------------------------- over a domain map


def _fine_map(shards, path, num_domains):
    """A flat map over the three shards (48 documents each): document d of shard s in fine domain 2s + d % 2."""
    from megatron_dga.data.domain_map import DomainMap, shard_identity, write_domain_map

    ids = np.concatenate([2 * s + np.arange(48) % 2 for s in range(3)]).astype(np.int32)
    write_domain_map(path, DomainMap(ids, [shard_identity(p) for p in shards["domains"]], [num_domains]))
    return path


def test_odm_runs_over_the_fine_domains_of_a_domain_map(shards, tmp_path):
    from tests.helpers.dist_utils import run_pretrain

    argv = _argv(
        shards, tmp_path, 6, ["--mixing", "odm", "--domain-map", _fine_map(shards, str(tmp_path / "m.npz"), 6)]
    )
    rcs, metrics = run_pretrain(argv, 1)
    assert rcs == [0]
    rewards = np.array(metrics[-1]["odm_rewards"])
    assert len(metrics[-1]["domain_weights"]) == rewards.size == 6 and (rewards > 0).all()  # every arm drawn


def test_pike_over_more_fine_domains_than_it_can_probe_is_refused(shards, tmp_path):
    from megatron_dga.errors import ConfigError
    from megatron_dga.mixing.config import MixingConfig, check_job

    path = _fine_map(shards, str(tmp_path / "m.npz"), 300)
    with pytest.raises(ConfigError, match=r"--mixing pike over the 300 fine domains .* use --mixing odm"):
        check_job(
            MixingConfig(strategy="pike"),
            data_path_weights=None,
            domain_map=path,
            use_distributed_optimizer=False,
            precision=None,
            transformer_engine=False,
        )


# ----------------------------------------------------------------------------- ODM in the production combinations


def test_odm_under_interleaved_pipeline_distributed_optimizer_overlap_and_sequence_parallel(shards, tmp_path):
    """ODM's rewards come from the loss function, which runs on the last pipeline stage only (and on every
    tensor-parallel rank), never for the interleaved schedule's padding micro-batches. At TP=2 with sequence
    parallelism (the same initial weights as one process) the rewards and weights equal the one-process
    run's; at PP=2 with virtual stages, the distributed optimizer and overlapped grad reduction and
    parameter gather (other initial weights: one seed per stage, as Megatron) the first update's rewards
    are the step's own per-domain losses: their sample-weighted mean is the logged loss."""
    alpha = 0.5
    base = ["--mixing", "odm", "--odm-reward-ema", str(alpha), "--num-layers", "4"]
    vpp = [
        "--pipeline-model-parallel-size",
        "2",
        "--num-layers-per-virtual-pipeline-stage",
        "1",
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--ddp-bucket-size",
        "5000",
    ]
    single = run_trainers({"one": _argv(shards, tmp_path / "one", 30, base)}, world_size=1)["one"]["metrics"]
    runs = run_trainers(
        {
            "tp2_sp": _argv(
                shards, tmp_path / "tp", 30, base + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
            ),
            "vpp2": _argv(shards, tmp_path / "vpp", 30, base + vpp),
        },
        world_size=2,
    )
    # The bandit moved off uniform (by ~7e-4: these domains' losses differ little): weights to 1e-6 absolute.
    assert np.abs(np.array(single[-1]["domain_weights"]) - 1 / 3).max() > 3e-4
    tp = runs["tp2_sp"]["metrics"]
    np.testing.assert_allclose([m["odm_rewards"] for m in tp], [m["odm_rewards"] for m in single], rtol=1e-4)
    np.testing.assert_allclose(
        [m["domain_weights"] for m in tp], [m["domain_weights"] for m in single], rtol=0, atol=1e-6
    )
    for got in (single, tp, runs["vpp2"]["metrics"]):
        first = got[0]  # update 1 drew with pi = 1/3: R_i = (1 - alpha) L_i * 3
        losses = np.array(first["odm_rewards"]) / (3 * (1 - alpha))
        samples = np.array(first["domain_samples"], dtype=float)
        assert samples.sum() == 8 and [m["odm_update"] for m in got] == list(range(1, 31))
        assert float(samples @ losses / samples.sum()) == pytest.approx(first["lm_loss"], rel=1e-6)
