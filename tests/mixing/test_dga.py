"""DGA: exact distributed alignments, the fd estimator, and the weights' behaviour on planted data.

Resume with DGA (bit-identical weights and losses after --load) is covered by
tests/training/test_trainer.py::test_resume_is_bit_identical_with_dp2.
"""

import dataclasses
import logging
import os

import numpy as np
import pytest
import torch

from tests.helpers.dist_utils import run_distributed
from tests.helpers.gradient_oracle import Float64GPT, gathered
from tests.helpers.synthetic import TINY_GPT_ARGS, data_flags, run_argv, write_domains

MODEL = TINY_GPT_ARGS


def _argv(shards, log_dir, extra=()):
    return run_argv(
        log_dir, ["--mixing", "dga", *extra], data=data_flags(shards), model=MODEL, iters=1000, log_interval=1000
    )


def _trainer(argv):
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer

    cfg = parse_args(argv)
    return Trainer(cfg, platform.initialize(cfg.parallel))


def _train(trainer, steps, apply_weights=True):
    """The trainer's loop without logging: step, then the mixing hook."""
    for _ in range(steps):
        trainer.train_step()
        trainer.iteration += 1
        new = trainer.mixing.after_step(trainer.view)
        if new is not None and apply_weights:
            trainer.data.set_weights(new)


def _strategy(trainer, **overrides):
    from megatron_dga.mixing.base import build_mixing

    strategy = build_mixing(dataclasses.replace(trainer.cfg.mixing, **overrides), trainer.data.domain_info)
    strategy.initial_weights()
    return strategy


# ----------------------------------------------------------------------------- (a) DP=2 / TP=2 / fp16 vs float64


def _layout_run(shards, log_dir, tp, rank, extra=()):
    """Two steps, then exact (plain and Adam) and fd alignments on one probe state, a DGA update,
    and everything a one-process float64 reference needs to recompute them."""
    from megatron_dga.errors import NumericalError
    from megatron_dga.mixing.base import check_identical_across_ranks

    trainer = _trainer(
        _argv(
            shards,
            log_dir,
            [
                "--tensor-model-parallel-size",
                str(tp),
                "--dga-interval",
                "1",
                "--dga-domain-batch-size",
                "4",
                "--dga-specific-batch-size",
                "4",
                *extra,
            ],
        )
    )
    _train(trainer, 2, apply_weights=False)
    state = trainer.data.sampler.state_dict()
    results = {}
    estimators = (("exact", {}), ("adam", {"dga_preconditioner": "adam"}), ("fd", {"dga_estimator": "fd"}))
    for name, overrides in estimators[:2] if trainer.cfg.model.fp16 else estimators:  # fd: fp32 only
        trainer.data.sampler.load_state_dict(state)  # the same probe samples for every estimator
        measured = _strategy(trainer, **overrides).measure_alignments(trainer.view)
        results[name] = measured.alignments
        if name == "exact":
            results["specific_grad_norm"] = measured.specific_grad_norm
    # One DGA update; the weights must be bit-identical on every rank.
    trainer.data.sampler.load_state_dict(state)
    new = trainer.mixing.after_step(trainer.view)
    # The cross-rank check must catch a one-ulp difference on one rank, on every rank.
    try:
        check_identical_across_ranks(trainer.view, np.nextafter(new, 1.0) if rank == 1 else new)
        caught = ""
    except NumericalError as exc:
        caught = str(exc)
    named = list(trainer.model.named_parameters())
    moments = trainer.optimizer.adam_second_moments(trainer.params)
    v = dict(zip(map(id, trainer.params), moments["exp_avg_sq"]))
    out = {
        "alignments": results,
        "weights_bytes": new.tobytes(),
        "caught": caught,
        "tp_duplicates": [n for n, p in named if not getattr(p, "tensor_model_parallel", False)],
        "params": {n: gathered(p, p, tp) for n, p in named},
        "exp_avg_sq": {n: gathered(p, v[id(p)], tp) for n, p in named},
        "bias_correction2": moments["bias_correction2"],
        "eps": trainer.cfg.optimizer.adam_eps,
        "model": trainer.cfg.model,
    }
    # The full probe batches (all DP shares), from the same probe state.
    sampler = trainer.data.sampler
    sampler.load_state_dict(state)
    fetch = lambda rows: {key: t.numpy() for key, t in trainer.data.fetch(rows).items()}
    out["specific"] = fetch(sampler.probe_batch(trainer.data.specific_id, 4))
    out["domains"] = [fetch(sampler.probe_batch(i, 4)) for i in range(len(shards["domains"]))]
    return out


def _reference(run):
    """<g_i, g_spe> and <g_i, P g_spe> in float64, from the gathered weights and the full probe batches."""
    gpt = Float64GPT(run["model"], run["params"])
    names = gpt.names
    g_spe = gpt.grad(run["specific"])
    domain_grads = [gpt.grad(b) for b in run["domains"]]
    adam = {
        n: 1.0 / (torch.from_numpy(run["exp_avg_sq"][n] / run["bias_correction2"]).sqrt() + run["eps"]) for n in names
    }

    def dots(which, precond=None):
        return np.array(
            [
                sum(float((g[n] * g_spe[n] * (1.0 if precond is None else precond[n])).sum()) for n in which)
                for g in domain_grads
            ]
        )

    return {
        "exact": dots(names),
        "adam": dots(names, adam),
        "per_param": {n: dots([n]) for n in names},
        "specific_grad_norm": float(np.sqrt(gpt.dot(g_spe, g_spe))),
    }


def _alignment_layouts(rank, world_size, shards, tmp):
    from megatron_dga import platform

    # fp16: a static loss scale of 2^12, so every probe gradient is 4096x too large until unscaled.
    layouts = (("dp2", 1, ()), ("tp2", 2, ()), ("fp16", 1, ("--fp16", "--loss-scale", "4096")))
    runs = {layout: _layout_run(shards, os.path.join(tmp, layout), tp, rank, extra) for layout, tp, extra in layouts}
    platform.initialize(platform.ParallelConfig(tensor_model_parallel_size=1))  # a full model on each rank
    out = {}
    for layout, run in runs.items():
        out[layout] = {key: run[key] for key in ("alignments", "weights_bytes", "caught", "tp_duplicates")}
        if rank == 0:
            out[layout]["reference"] = _reference(run)
    platform.shutdown()
    return out


@pytest.fixture(scope="module")
def shards(four_domains):
    """This module's data (tests/mixing/conftest.py)."""
    return four_domains


@pytest.mark.slow
def test_distributed_alignments_equal_float64_reference(shards, tmp_path):
    ranks = run_distributed(_alignment_layouts, world_size=2, args=(shards, str(tmp_path)))
    for layout in ("dp2", "tp2", "fp16"):
        ref = ranks[0][layout]["reference"]
        scale = np.abs(ref["exact"]).max()
        # fp32 gradients against float64 ones differ by ~1e-6 relative: tolerance 1e-4 of max|a|.
        # fp16 forward/backward (10-bit mantissa) on the same fp16 weights: 1e-2 (measured 1.3e-3;
        # gradients left scaled by the loss scale would be 4096x, or 4096^2x for a dot product).
        tol = 1e-2 if layout == "fp16" else 1e-4
        for rank in ranks:
            got = rank[layout]["alignments"]
            np.testing.assert_allclose(got["exact"], ref["exact"], rtol=0, atol=tol * scale, err_msg=layout)
            np.testing.assert_allclose(
                got["adam"], ref["adam"], rtol=0, atol=tol * np.abs(ref["adam"]).max(), err_msg=layout
            )
            assert got["specific_grad_norm"] == pytest.approx(ref["specific_grad_norm"], rel=tol), layout
            if layout != "fp16":
                np.testing.assert_allclose(got["fd"], ref["exact"], rtol=0, atol=1e-2 * scale, err_msg=layout)
            # Every rank ends with the same weights, to the bit; a one-ulp difference is caught everywhere.
            assert rank[layout]["weights_bytes"] == ranks[0][layout]["weights_bytes"]
            assert "differ between ranks" in rank[layout]["caught"]
        # The test can fail: counting the tied embedding twice, the TP-replicated parameters twice
        # (once per TP rank) or getting the DP shares wrong moves a far outside the tolerance.
        emb = ref["per_param"]["embedding.word_embeddings.weight"]
        dup = sum(ref["per_param"][n] for n in ranks[1]["tp2"]["tp_duplicates"])
        for wrong in (ref["exact"] + emb, ref["exact"] + dup, 2 * ref["exact"]):
            assert np.abs(wrong - ref["exact"]).max() > 20 * 1e-4 * scale


# ----------------------------------------------------------------------------- (g) alignment noise (--dga-noise)

NOISE_GROUPS, NOISE_BATCH = 4, 8


NOISE_LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}
"""On 2 ranks; under pipeline stages each stage's group dots are summed over the model-parallel group."""


def _noise_layouts(rank, world_size, shards, tmp):
    """Per layout: --dga-noise measure's statistics from one probe state, the weights of one
    --dga-noise shrink update from the same state, and what a float64 reference needs."""
    from megatron_dga import platform
    from tests.helpers.layouts import named

    runs = {}
    for layout, parallel in NOISE_LAYOUTS.items():
        extra = [
            *parallel,
            *("--dga-interval", "1", "--dga-domain-batch-size", str(NOISE_BATCH), "--dga-specific-batch-size", "4"),
            *("--dga-noise", "measure", "--dga-noise-groups", str(NOISE_GROUPS)),
        ]
        trainer = _trainer(_argv(shards, os.path.join(tmp, layout), extra))
        _train(trainer, 2, apply_weights=False)
        sampler = trainer.data.sampler
        state = sampler.state_dict()
        measured = trainer.mixing.measure_alignments(trainer.view)
        sampler.load_state_dict(state)
        shrink = _strategy(trainer, dga_noise="shrink")
        weights_before = shrink.weights.copy()
        new = shrink.after_step(trainer.view)
        logged = shrink.metrics()
        tp = trainer.ctx.tp_size
        run = {
            "alignments": measured.alignments,
            "stderr": measured.stderr,
            "agree": measured.sign_agreement,
            "shrink_weights": new,
            "weights_before": weights_before,
            "logged": {key: logged[key] for key in ("dga_alignment_stderr", "dga_sign_agreement", "alignments")},
            # this stage's parameters by global name, or all of them gathered over TP
            "params": named(trainer)
            if trainer.ctx.pp_size > 1
            else {n: gathered(p, p, tp) for n, p in trainer.model.named_parameters()},
            "model": trainer.cfg.model,
            "eta": trainer.cfg.mixing.dga_eta,
            "ema": trainer.cfg.mixing.dga_ema,
        }
        sampler.load_state_dict(state)
        fetch = lambda rows: {key: t.numpy() for key, t in trainer.data.fetch(rows).items()}
        run["specific"] = fetch(sampler.probe_batch(trainer.data.specific_id, 4))
        run["domains"] = [fetch(sampler.probe_batch(i, NOISE_BATCH)) for i in range(len(shards["domains"]))]
        runs[layout] = run
    from megatron_dga.errors import ConfigError

    try:  # DP=2 and 3 groups: a rank would hold half a group
        odd = ["--dga-noise", "measure", "--dga-noise-groups", "3", "--dga-domain-batch-size", "6"]
        _trainer(_argv(shards, os.path.join(tmp, "odd"), odd))
        odd_error = ""
    except ConfigError as exc:
        odd_error = str(exc)
    platform.shutdown()
    return {**runs, "odd_groups_error": odd_error}


def _noise_group_dots(rank, world_size, runs_by_layout):
    """Per layout, (k, G) float64: each group's <g_i^g, g_spe>, from the weights of every rank (stage)."""
    from megatron_dga import platform

    platform.initialize(platform.ParallelConfig())
    out = {}
    for layout, runs in runs_by_layout.items():
        params = {name: value for run in runs for name, value in run["params"].items()}
        gpt = Float64GPT(runs[0]["model"], params)
        g_spe = gpt.grad(runs[0]["specific"])
        size = NOISE_BATCH // NOISE_GROUPS  # global group g is rows [g size, (g+1) size)
        out[layout] = np.array(
            [
                [
                    gpt.dot(gpt.grad({k: v[g * size : (g + 1) * size] for k, v in batch.items()}), g_spe)
                    for g in range(NOISE_GROUPS)
                ]
                for batch in runs[0]["domains"]
            ]
        )
    platform.shutdown()
    return out


def test_noise_statistics_equal_brute_force_over_the_groups(shards, tmp_path):
    from megatron_dga import ops
    from megatron_dga.mixing.alignment import shrink_by_noise

    ranks = run_distributed(_noise_layouts, world_size=2, args=(shards, str(tmp_path)))
    assert "--dga-noise-groups 3 must be a multiple of the data-parallel size 2" in ranks[0]["odd_groups_error"]
    by_layout = {layout: [r[layout] for r in ranks] for layout in NOISE_LAYOUTS}
    group_dots = run_distributed(_noise_group_dots, world_size=1, args=(by_layout,))[0]
    for layout in NOISE_LAYOUTS:
        d = group_dots[layout]  # (k, G) float64: each group's <g_i^g, g_spe>
        G = d.shape[1]
        a = d.mean(axis=1)  # equal groups
        se = np.sqrt(((d - a[:, None]) ** 2).sum(axis=1) / (G * (G - 1)))
        agree = np.array([np.mean(np.sign(row) == np.sign(m)) for row, m in zip(d, a)])
        scale = np.abs(a).max()
        for rank in ranks:
            run = rank[layout]
            np.testing.assert_allclose(run["alignments"], a, rtol=0, atol=1e-4 * scale, err_msg=layout)
            np.testing.assert_allclose(run["stderr"], se, rtol=1e-3, atol=1e-5 * scale, err_msg=layout)
            np.testing.assert_array_equal(run["agree"], agree, err_msg=layout)
            assert run["logged"]["dga_alignment_stderr"] == pytest.approx(list(se), rel=1e-3, abs=1e-5 * scale)
            # shrink: the update on a_i^3 / (a_i^2 + se_i^2), the same on every rank.
            expected = ops.simplex_update(
                torch.as_tensor(run["weights_before"]),
                torch.as_tensor(shrink_by_noise(a, se)),
                eta=run["eta"],
                beta=run["ema"],
                floor=0.0,
            ).numpy()
            np.testing.assert_allclose(run["shrink_weights"], expected, rtol=1e-4, err_msg=layout)
            assert run["shrink_weights"].tobytes() == ranks[0][layout]["shrink_weights"].tobytes()
        # The test can fail: the variance's denominator G^2 instead of G (G - 1) is 13 % off; the groups
        # really disagree (se > 0), so shrinking moves the update.
        population = np.sqrt(((d - a[:, None]) ** 2).sum(axis=1) / G**2)
        assert np.abs(population - se).min() > 1e-2 * se.min() > 0
        plain = ops.simplex_update(
            torch.as_tensor(run["weights_before"]), torch.as_tensor(a), eta=run["eta"], beta=run["ema"], floor=0.0
        ).numpy()
        assert np.abs(plain - run["shrink_weights"]).max() > 1e-3


def test_shrink_by_noise_keeps_signal_and_damps_noise():
    from megatron_dga.mixing.alignment import shrink_by_noise

    a = np.array([2.0, -2.0, 0.1, 0.0, 1.0])
    se = np.array([0.0, 0.2, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(shrink_by_noise(a, se), [2.0, -2.0 * 4 / 4.04, 0.1 * 0.01 / 1.01, 0.0, 0.5])


# ----------------------------------------------------------------------------- (d) fd vs exact, (f) NaN/Inf


def _fd_and_nan(rank, world_size, shards, log_dir):
    from megatron_dga.mixing.fd import fd_alignments

    extra = [
        "--dga-interval",
        "1000",
        "--dga-domain-batch-size",
        "8",
        "--dga-specific-batch-size",
        "8",
        "--micro-batch-size",
        "4",
    ]
    out = {"exact": [], "fd": [], "untouched": []}
    trainer = _trainer(_argv(shards, log_dir, extra))
    exact, fd = trainer.mixing, _strategy(trainer, dga_estimator="fd")
    for _ in range(3):
        _train(trainer, 10)
        state, weights = trainer.data.sampler.state_dict(), trainer.data.sampler.weights
        out["exact"].append(exact.measure_alignments(trainer.view).alignments)
        trainer.data.sampler.load_state_dict(state)
        params = [p.detach().clone() for p in trainer.params]
        rng = torch.get_rng_state()
        out["fd"].append(fd.measure_alignments(trainer.view).alignments)
        after = trainer.data.sampler.state_dict()
        out["untouched"].append(
            all(torch.equal(a, b) for a, b in zip(params, trainer.params))  # restored to the bit
            and torch.equal(rng, torch.get_rng_state())
            and all(not g.any() for g in trainer.view.grads())
            and all(after[key] == state[key] for key in ("batches_drawn", "consumed", "carry"))
            and np.array_equal(trainer.data.sampler.weights, weights)
        )
    # fp32 cancellation sets the lower end of the step range, the O(h^2) term the upper end.
    state = trainer.data.sampler.state_dict()
    ref = exact.measure_alignments(trainer.view).alignments
    k = len(ref)
    out["sweep"] = {}
    for rel in (1e-8, 1e-4, 1e-1):
        trainer.data.sampler.load_state_dict(state)
        out["sweep"][rel] = (ref, fd_alignments(trainer.view, list(range(k)), 8, 8, relative_step=rel).alignments)
    out["nan"] = _nan_probes(trainer, shards)
    from megatron_dga import platform

    platform.shutdown()
    return out


def _nan_probes(trainer, shards):
    """Poison one probe (a domain gradient, the specific gradient, an fd loss); the update must be skipped."""
    from megatron_dga.mixing import mirror as mirror_module  # DGA's update step warns there

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    mirror_module.logger.addHandler(handler)
    real_backward, real_forward = trainer.view.backward, trainer.view.forward_token_losses
    calls = {"n": 0}

    def poisoned_backward(target, value):
        def backward(micro_batches, *, sync_grads):
            stats = real_backward(micro_batches, sync_grads=sync_grads)
            if sync_grads == (target == "specific"):
                calls["n"] += 1
                if target == "specific" or calls["n"] == 2:  # the second domain's gradient
                    trainer.view.grads()[3].view(-1)[0] = value
            return stats

        return backward

    def poisoned_forward(micro_batches):
        losses = real_forward(micro_batches)
        losses[-1][0, 0] = float("nan")
        return losses

    results = []
    for name, estimator, patch in (
        ("domain grad NaN", "exact", ("backward", poisoned_backward("domain", float("nan")))),
        ("domain grad Inf", "exact", ("backward", poisoned_backward("domain", float("inf")))),
        ("specific grad NaN", "exact", ("backward", poisoned_backward("specific", float("nan")))),
        ("fd specific grad Inf", "fd", ("backward", poisoned_backward("specific", float("inf")))),
        ("fd loss NaN", "fd", ("forward_token_losses", poisoned_forward)),
    ):
        strategy = _strategy(trainer, dga_estimator=estimator, dga_interval=1)
        before = strategy.weights.copy()
        records.clear()
        calls["n"] = 0
        setattr(trainer.view, *patch)
        skipped = strategy.after_step(trainer.view)
        kept = strategy.weights.copy()
        metrics = strategy.metrics()
        setattr(trainer.view, patch[0], real_backward if patch[0] == "backward" else real_forward)
        recovered = strategy.after_step(trainer.view)  # the next update, with clean probes, goes through
        results.append(
            {
                "case": name,
                "returned": skipped,
                "weights_before": before,
                "weights_kept": kept,
                "skipped_updates": metrics.get("dga_skipped_updates"),
                "warnings": [r.getMessage() for r in records if r.levelno == logging.WARNING],
                "recovered": recovered is not None and not np.array_equal(recovered, before),
            }
        )
    mirror_module.logger.removeHandler(handler)
    return results


@pytest.fixture(scope="module")
def fd_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fd")
    shards6 = write_domains(
        str(tmp / "shards"), k=6, docs_per_domain=48, doc_len=64, specific_mixture=[0.5, 0.3, 0.2, 0.0, 0.0, 0.0]
    )
    return run_distributed(_fd_and_nan, world_size=1, args=(shards6, str(tmp / "run")))[0]


def test_fd_estimator_agrees_with_exact(fd_run):
    x, y = np.concatenate(fd_run["exact"]), np.concatenate(fd_run["fd"])
    assert x.size == 18
    assert np.corrcoef(x, y)[0, 1] >= 0.99
    big = np.abs(x) > 0.05 * np.abs(x).max()
    assert np.array_equal(np.sign(x[big]), np.sign(y[big]))
    # The default step is in the accurate range; far too small or too large a step is not.
    ref, est = fd_run["sweep"][1e-4]
    assert np.abs(est - ref).max() < 1e-2 * np.abs(ref).max()
    for rel in (1e-8, 1e-1):
        ref, est = fd_run["sweep"][rel]
        assert np.abs(est - ref).max() > 5e-2 * np.abs(ref).max(), rel


def test_fd_probes_leave_training_state_bit_identical(fd_run):
    # Parameters restored to the bit, RNG unchanged, grad buffers cleared, training stream untouched.
    assert fd_run["untouched"] == [True, True, True]


def test_nonfinite_probe_skips_update_and_keeps_weights(fd_run):
    cases = fd_run["nan"]
    assert [c["case"] for c in cases] == [
        "domain grad NaN",
        "domain grad Inf",
        "specific grad NaN",
        "fd specific grad Inf",
        "fd loss NaN",
    ]
    for c in cases:
        assert c["returned"] is None, c["case"]
        np.testing.assert_array_equal(c["weights_kept"], c["weights_before"])
        assert c["skipped_updates"] == 1, c["case"]
        assert any("skipped, weights kept" in w and "not finite" in w for w in c["warnings"]), c
        assert c["recovered"], c["case"]


def _probes_do_not_change_training(rank, world_size, shards, log_dir):
    """Losses of 4 steps with exact and fd probes between the steps (weights not applied) vs none."""
    losses = []
    for probe in (False, True):
        trainer = _trainer(
            _argv(shards, os.path.join(log_dir, str(probe)), ["--dga-interval", "1", "--hidden-dropout", "0.1"])
        )
        fd = _strategy(trainer, dga_estimator="fd")
        run = []
        for _ in range(4):
            run.append(trainer.train_step()[0])
            trainer.iteration += 1
            if probe:
                trainer.mixing.measure_alignments(trainer.view)
                fd.measure_alignments(trainer.view)
        losses.append(run)
    from megatron_dga import platform

    platform.shutdown()
    return losses


def test_probes_leave_training_steps_bit_identical(shards, tmp_path):
    # With dropout on, so the RNG stream matters too.
    plain, probed = run_distributed(_probes_do_not_change_training, world_size=1, args=(shards, str(tmp_path)))[0]
    assert plain == probed
    assert len(set(plain)) == 4


# ----------------------------------------------------------------------------- (b) Theorem 1, (c) token limits


def _planted_runs(rank, world_size, tmp, seeds, mixture, steps, extra, caps):
    """Per seed, per cap setting: the trajectory of DGA weights on planted domains."""
    out = []
    for seed in seeds:
        shards = write_domains(
            os.path.join(tmp, f"s{seed}"),
            k=len(mixture),
            docs_per_domain=48,
            doc_len=64,
            seed=seed,
            specific_mixture=mixture,
            specific_docs=128,
        )
        runs = {}
        for cap in caps:
            # A per-domain cap on domain 0 only (0 = unlimited for the others).
            caps_args = ["--domain-token-limit", str(cap)] + ["0"] * (len(mixture) - 1) if cap else []
            trainer = _trainer(
                _argv(shards, os.path.join(tmp, f"run{seed}_{cap}"), ["--seed", str(seed), *extra, *caps_args])
            )
            trajectory = []
            for _ in range(steps):
                _train(trainer, 1)
                if trainer.mixing.updates and trainer.iteration % trainer.cfg.mixing.dga_interval == 0:
                    trajectory.append(trainer.mixing.weights.copy())
            runs[cap] = np.array(trajectory)
        out.append(runs)
    from megatron_dga import platform

    platform.shutdown()
    return out


@pytest.mark.slow
def test_theorem1_weights_concentrate_on_planted_mixture(tmp_path):
    # The specific set is drawn from 0.6 * chain(1) + 0.4 * chain(3). Measured over seeds 0-2:
    # after 60 steps (30 updates) the mass on {1, 3} is >= 0.9998 (0.99999 with --dga-eta 10),
    # from 0.5 at the start and 0.78-0.85 after a quarter of the updates. The threshold 0.95 leaves
    # the mass elsewhere 250x room (0.05 vs 0.0002), so it holds across BLAS/thread differences.
    # How the mass splits between 1 and 3 varies with the seed (0.57-0.93 on domain 1): the
    # specific set is 128 documents, and Theorem 1's fixed point is not reached in 30 updates.
    extra = [
        "--dga-interval",
        "2",
        "--dga-domain-batch-size",
        "4",
        "--dga-specific-batch-size",
        "8",
        "--dga-ema",
        "0.5",
        "--dga-eta",
        "3",
        "--micro-batch-size",
        "4",
    ]
    runs = run_distributed(
        _planted_runs, world_size=1, args=(str(tmp_path), (0, 1, 2), [0.0, 0.6, 0.0, 0.4], 60, extra, (None,))
    )[0]
    for seed, run in enumerate(runs):
        w = run[None]
        mass = w[:, 1] + w[:, 3]
        assert mass[-1] >= 0.95, (seed, w[-1])
        assert min(w[-1, 1], w[-1, 3]) > max(w[-1, 0], w[-1, 2]), (seed, w[-1])
        assert mass[len(mass) // 2 :].mean() > mass[: len(mass) // 4].mean()  # moves there, does not start there


@pytest.mark.slow
def test_token_limited_domain_loses_weight(tmp_path):
    # Domain 0 is the most aligned (70% of the specific set is its chain). Capped at 64 tokens
    # (2 sequences, repeated from the first steps on), it is memorised, its probe gradient shrinks,
    # and DGA moves weight to domain 1. Measured over seeds 0-2 (150 steps, 50 updates): mean
    # weight of domain 0 uncapped 0.66-0.77, capped 0.27-0.46 (gap 0.25-0.45, asserted > 0.15);
    # the gap in the first third of the updates (0.08-0.27) grows to 0.34-0.53 afterwards. The
    # weight oscillates (memorised, down-weighted, partly forgotten, up again), so the test
    # compares means, not endpoints. Seeds 0 and 2 run here: the tightest margins of the three.
    extra = [
        "--dga-interval",
        "3",
        "--dga-domain-batch-size",
        "16",
        "--dga-specific-batch-size",
        "64",
        "--dga-ema",
        "0.3",
        "--dga-eta",
        "3",
        "--micro-batch-size",
        "8",
        "--lr-decay-style",
        "constant",
    ]
    runs = run_distributed(
        _planted_runs, world_size=1, args=(str(tmp_path), (0, 2), [0.7, 0.3, 0.0], 150, extra, (None, 64))
    )[0]
    for seed, run in zip((0, 2), runs):
        free, capped = run[None][:, 0], run[64][:, 0]
        assert free.mean() > 0.5, seed  # uncapped, the most aligned domain takes most of the mass
        assert capped.mean() < free.mean() - 0.15, (seed, capped.mean(), free.mean())
        third = len(free) // 3
        early_gap = free[:third].mean() - capped[:third].mean()
        late_gap = free[third:].mean() - capped[third:].mean()
        assert late_gap > early_gap, (seed, early_gap, late_gap)


# ----------------------------------------------------------------------------- logging, end to end


def _pretrain(rank, world_size, argv):
    from megatron_dga.pretrain_gpt import main

    return main(argv)


def test_fd_run_logs_weights_and_alignments(shards, tmp_path):
    argv = _argv(
        shards,
        tmp_path / "log",
        [
            "--dga-estimator",
            "fd",
            "--dga-interval",
            "2",
            "--train-iters",
            "4",
            "--log-interval",
            "1",
            "--tensorboard-dir",
            str(tmp_path / "tb"),
        ],
    )
    assert run_distributed(_pretrain, world_size=1, args=(argv,))[0] == 0
    from megatron_dga.training.metrics import read_metrics

    records = read_metrics(tmp_path / "log" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    k = len(shards["domains"])
    for r in records:
        updated = r["iteration"] % 2 == 0
        assert ("alignments" in r) == updated and ("dga_fd_step" in r) == updated
        if updated:
            assert len(r["alignments"]) == k and np.all(np.isfinite(r["alignments"]))
            assert r["specific_grad_norm"] > 0 and r["dga_fd_step"] > 0
    # The log line of an update iteration follows the update, so it shows the new weights.
    assert records[0]["domain_weights"] == [1 / k] * k
    assert records[1]["domain_weights"] != records[0]["domain_weights"]
    assert records[2]["domain_weights"] == records[1]["domain_weights"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for name in ("dom0", f"dom{k - 1}"):
        assert f"mixing/weight/{name}" in tags
        assert any("alignment" in tag and tag.endswith("/" + name) for tag in tags), tags
