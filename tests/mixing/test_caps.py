"""Token budgets on the simplex (mixing/caps.py): the KL projection onto the capped simplex against a
general-purpose constrained solver (over the domains, and over basis distributions with caps on the fine
domains), the caps against their definition."""

import os

import numpy as np
import pytest
import torch
import scipy.sparse as sp
from scipy.optimize import minimize, minimize_scalar

from megatron_dga.mixing.caps import CAP_TOL, PENALTY, epoch_caps, project_capped_simplex


def kl_projection_oracle(w: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """argmin_a sum a log(a / w) s.t. sum a = 1, 0 <= a <= caps, over the support of w (SLSQP, float64)."""
    s = w > 0
    ws, cs = w[s], np.minimum(caps[s], 1.0)

    def kl(a):
        a = np.maximum(a, 1e-300)
        return float(np.sum(a * np.log(a / ws)))

    def grad(a):
        return np.log(np.maximum(a, 1e-300) / ws) + 1.0

    start = np.minimum(cs, ws)
    start = start + (1 - start.sum()) * (cs - start) / max((cs - start).sum(), 1e-300)
    res = minimize(
        kl,
        start,
        jac=grad,
        method="SLSQP",
        bounds=[(0.0, c) for c in cs],
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones_like(a)}],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert res.success, res.message
    out = np.zeros_like(w)
    out[s] = res.x
    return out


@pytest.mark.parametrize("seed", range(12))
def test_the_projection_is_the_kl_projection_and_respects_the_caps(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 12))
    w = rng.dirichlet(np.full(k, 0.7))
    if seed % 3 == 0:
        w[rng.integers(k)] = 0.0  # a domain mirror descent has already dropped
        w /= w.sum()
    caps = rng.uniform(0.02, 0.6, size=k)
    caps *= max(1.0, 1.05 / caps[w > 0].sum())  # feasible on the support
    got = project_capped_simplex(w, caps)
    assert got.feasible
    assert np.all(got.weights <= caps + 1e-12) and np.all(got.weights >= 0)
    assert got.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(got.weights[w == 0] == 0)
    np.testing.assert_allclose(got.weights, kl_projection_oracle(w, caps), atol=2e-6)
    assert got.binding == int(np.sum(np.isclose(got.weights, caps, rtol=0, atol=1e-12) & (got.weights > 0)))


def test_weights_under_their_caps_are_unchanged_and_infeasible_caps_scale_together():
    w = np.array([0.5, 0.3, 0.2])
    same = project_capped_simplex(w, np.array([0.6, 0.4, 0.3]))
    np.testing.assert_array_equal(same.weights, w)
    assert (same.binding, same.feasible) == (0, True)
    # one cap binds: the others keep their ratio 3:2
    one = project_capped_simplex(w, np.array([0.4, 1.0, 1.0]))
    np.testing.assert_allclose(one.weights, [0.4, 0.36, 0.24], rtol=1e-12)
    assert one.binding == 1
    # the caps sum to 0.8: every domain over budget by the same factor
    short = project_capped_simplex(w, np.array([0.4, 0.2, 0.2]))
    np.testing.assert_allclose(short.weights, [0.5, 0.25, 0.25], rtol=1e-12)
    assert not short.feasible


def test_caps_are_the_epochs_left_over_the_samples_to_come():
    distinct = np.array([100, 100, 50, 0])
    consumed = np.array([0, 250, 60, 0])
    caps = epoch_caps(distinct, consumed, remaining=400, max_epochs=2.0)
    # R n_i - c_i = 200, -50 -> 0, 40, 0 samples left within 2 epochs; over 400 samples to come
    np.testing.assert_allclose(caps, [0.5, 0.0, 0.1, 0.0])
    assert np.all(np.isinf(epoch_caps(distinct, consumed, remaining=0, max_epochs=2.0)))


# --------------------------------------------------------------------------- over a basis
def basis_kl_projection_oracle(hat: np.ndarray, matrix: np.ndarray, caps: np.ndarray, start: np.ndarray) -> np.ndarray:
    """argmin_g sum g log(g / hat) s.t. sum g = 1, g >= 0, g^T P <= caps (SLSQP, float64, from a feasible start)."""

    def kl(g):
        g = np.maximum(g, 1e-300)
        return float(np.sum(g * np.log(g / hat)))

    res = minimize(
        kl,
        start,
        jac=lambda g: np.log(np.maximum(g, 1e-300) / hat) + 1.0,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * hat.size,
        constraints=[
            {"type": "eq", "fun": lambda g: g.sum() - 1.0, "jac": lambda g: np.ones_like(g)},
            {"type": "ineq", "fun": lambda g: caps - matrix.T @ g, "jac": lambda g: -matrix.T},
        ],
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    assert res.success, res.message
    return res.x


def _penalised(g, hat, matrix, caps):
    """The objective the basis projection minimises (mixing/caps.py)."""
    s = g > 0
    excess = float(np.maximum(matrix.T @ g - caps, 0).sum())
    return float(np.sum(g[s] * np.log(g[s] / hat[s]))) + PENALTY * caps.size * excess


@pytest.mark.parametrize("seed", range(10))
def test_over_a_basis_the_projection_is_the_kl_projection_onto_the_fine_domain_caps(seed):
    """Caps that some weights meet (those of a random gamma', loosened by up to 20 %): the projection meets
    every fine domain's cap and is the KL projection onto them (SLSQP); a sparse basis gives the same."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 6)), int(rng.integers(3, 10))
    matrix = rng.dirichlet(np.full(k, 0.5), size=n)
    hat = rng.dirichlet(np.ones(n))
    feasible = rng.dirichlet(np.ones(n))
    caps = matrix.T @ feasible * rng.uniform(1.0, 1.2, size=k)
    got = project_capped_simplex(hat, caps, basis=matrix)
    alpha = matrix.T @ got.weights
    assert got.feasible
    assert np.all(alpha <= caps * (1 + CAP_TOL)) and np.all(got.weights >= 0)
    assert got.weights.sum() == pytest.approx(1.0, abs=1e-12)
    if np.all(matrix.T @ hat <= caps):
        np.testing.assert_array_equal(got.weights, hat)
        return
    np.testing.assert_allclose(got.weights, basis_kl_projection_oracle(hat, matrix, caps, feasible), atol=2e-6)
    assert got.binding == int(np.sum(alpha >= caps * (1 - CAP_TOL)))
    assert got.binding > 0
    sparse = project_capped_simplex(hat, caps, basis=sp.csr_matrix(matrix))
    np.testing.assert_allclose(sparse.weights, got.weights, rtol=1e-9, atol=1e-12)


def test_the_identity_basis_gives_the_projection_over_the_domains():
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = rng.dirichlet(np.full(6, 0.7))
        caps = rng.uniform(0.05, 0.5, size=6)
        caps *= max(1.0, 1.1 / caps.sum())
        np.testing.assert_allclose(
            project_capped_simplex(w, caps, basis=np.eye(6)).weights, project_capped_simplex(w, caps).weights, atol=1e-8
        )


@pytest.mark.parametrize("seed", range(6))
def test_caps_no_weights_meet_trade_the_least_repetition_against_kl(seed):
    """Two bases, so the penalised objective is a function of one number: a brute-force scalar minimisation
    of it agrees with the projection, which says the caps are not met."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 9))
    matrix = rng.dirichlet(np.full(k, 0.5), size=2)
    hat = rng.dirichlet(np.ones(2))
    caps = matrix.T @ hat * rng.uniform(0.5, 1.0, size=k)  # every fine domain over its cap at hat
    caps[0] = 0.0  # one fine domain has used its R epochs: both bases draw it
    got = project_capped_simplex(hat, caps, basis=matrix)
    best = minimize_scalar(
        lambda x: _penalised(np.array([x, 1 - x]), hat, matrix, caps),
        bounds=(0, 1),
        method="bounded",
        options={"xatol": 1e-14},
    )
    assert not got.feasible
    assert _penalised(got.weights, hat, matrix, caps) <= best.fun + 1e-9
    assert got.weights[0] == pytest.approx(best.x, abs=1e-6)


# --------------------------------------------------------------------------- in training
LIMIT_TOKENS, MAX_EPOCHS, STEPS = 1024, 3.0, 40
"""32 distinct samples per domain; 40 steps of 8 = 320 samples, 2.5 epochs of each domain if uniform."""


def _planted_shards(tmp):
    from tests.helpers.synthetic import write_domains

    return write_domains(
        os.path.join(tmp, "data"),
        k=4,
        docs_per_domain=48,
        doc_len=64,
        seed=3,
        specific_mixture=[0.8, 0.2, 0.0, 0.0],
        specific_docs=64,
    )


def _capped_runs(rank, world_size, tmp, shards, runs, model):
    """Each ``{name: extra flags}`` run to STEPS with DGA updates every 2 steps: after each update, the weights,
    the caps computed from the trainer's own state, and the update's metrics; at the end the epochs drawn."""
    from megatron_dga import platform
    from megatron_dga.mixing.caps import epoch_caps
    from tests.helpers.layouts import trainer_from, train_steps
    from tests.helpers.synthetic import NULL_TOKENIZER_ARGS

    torch.set_num_threads(1)
    out = {}
    for name, extra in runs.items():
        argv = [
            "--data-path",
            *shards["domains"],
            "--specific-data-path",
            shards["specific"],
            *NULL_TOKENIZER_ARGS,
            *model,
            "--micro-batch-size",
            "4",
            "--global-batch-size",
            "8",
            "--train-iters",
            str(STEPS),
            "--lr",
            "3e-3",
            "--eval-interval",
            "0",
            "--log-dir",
            os.path.join(tmp, name),
            "--mixing",
            "dga",
            "--dga-interval",
            "2",
            "--dga-eta",
            "30",
            "--dga-ema",
            "0.5",
            "--dga-domain-batch-size",
            "4",
            "--dga-specific-batch-size",
            "8",
            "--domain-token-limit",
            str(LIMIT_TOKENS),
            *extra,
        ]
        trainer = trainer_from(argv)
        updates = []
        while trainer.iteration < STEPS:
            train_steps(trainer, 1)
            if trainer.iteration % 2 == 0:
                budget = trainer.view.domain_budget()
                caps = epoch_caps(budget["distinct"], budget["used"], budget["remaining"], MAX_EPOCHS)
                updates.append((trainer.mixing.weights.copy(), caps, trainer.mixing.metrics()))
        budget = trainer.view.domain_budget()
        out[name] = {"updates": updates, "epochs": budget["used"] / budget["distinct"]}
    platform.shutdown()
    return out


def test_capped_dga_never_plans_past_the_budget_and_the_uncapped_one_does(tmp_path):
    from tests.helpers.dist_utils import run_distributed

    from tests.helpers.synthetic import TINY_GPT_ARGS

    flags = {"capped": ["--dga-max-epochs", str(MAX_EPOCHS)], "uncapped": []}
    args = (str(tmp_path), _planted_shards(str(tmp_path)), flags, TINY_GPT_ARGS)
    runs = run_distributed(_capped_runs, world_size=1, args=args)[0]
    capped = runs["capped"]
    for weights, caps, metrics in capped["updates"]:
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(weights <= caps + 1e-12), (weights, caps)
        assert metrics["dga_caps_feasible"] == 1 and metrics["dga_caps_binding"] == int(
            np.sum(np.isclose(weights, caps, rtol=0, atol=1e-12) & (weights > 0))
        )
    assert any(m["dga_caps_binding"] > 0 for _, _, m in capped["updates"])
    # Drawn at most R epochs of every domain (up to one training batch of sampling granularity: 8 of 32
    # samples), while DGA without caps draws its favourite domain far past them.
    assert capped["epochs"].max() <= MAX_EPOCHS + 8 / 32, capped["epochs"]
    assert runs["uncapped"]["epochs"].max() > MAX_EPOCHS + 1.0, runs["uncapped"]["epochs"]


BASIS = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
"""Three basis distributions over the four domains: two lean on one domain each, one is uniform."""


def test_over_a_basis_the_caps_hold_on_the_domains_the_bases_draw(tmp_path):
    """With --dga-basis DGA moves the weights gamma of the three bases; the caps hold on gamma^T P, the
    weights the sampler draws the domains at, and no domain is drawn past R; without them it is."""
    from megatron_dga.mixing.weights_io import save_basis
    from tests.helpers.dist_utils import run_distributed
    from tests.helpers.synthetic import TINY_GPT_ARGS

    basis = str(tmp_path / "basis.npz")
    save_basis(basis, BASIS, ["lean0", "lean1", "flat"], [f"dom{i}" for i in range(4)])
    flags = {
        "capped": ["--dga-basis", basis, "--dga-max-epochs", str(MAX_EPOCHS)],
        "uncapped": ["--dga-basis", basis],
    }
    args = (str(tmp_path), _planted_shards(str(tmp_path)), flags, TINY_GPT_ARGS)
    runs = run_distributed(_capped_runs, world_size=1, args=args)[0]
    capped = runs["capped"]["updates"]
    for gamma, caps, metrics in capped:
        alpha = gamma @ BASIS
        assert gamma.shape == (3,) and gamma.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(alpha <= caps * (1 + CAP_TOL)), (alpha, caps)
        assert metrics["dga_caps_feasible"] == 1
        assert metrics["dga_caps_binding"] == int(np.sum(alpha >= caps * (1 - CAP_TOL)))
    assert any(m["dga_caps_binding"] > 0 for _, _, m in capped)
    assert runs["capped"]["epochs"].max() <= MAX_EPOCHS + 8 / 32, runs["capped"]["epochs"]
    assert runs["uncapped"]["epochs"].max() > MAX_EPOCHS + 1.0, runs["uncapped"]["epochs"]


def test_the_caps_hold_under_pipelining_the_distributed_optimizer_and_overlap(tmp_path):
    """PP=2 x DP=2 with --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather, over a
    basis: the caps come from the replicated sampler, so every rank projects onto the same caps and
    its barrier solve gives the same weights (the strategy's own cross-rank check would fail the run
    otherwise), and no domain is drawn past R."""
    from megatron_dga.mixing.weights_io import save_basis
    from tests.helpers.dist_utils import run_distributed
    from tests.helpers.synthetic import PIPELINE_GPT_ARGS

    basis = str(tmp_path / "basis.npz")
    save_basis(basis, BASIS, ["lean0", "lean1", "flat"], [f"dom{i}" for i in range(4)])
    layout = [
        "--pipeline-model-parallel-size",
        "2",
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--dga-basis",
        basis,
        "--dga-max-epochs",
        str(MAX_EPOCHS),
    ]
    args = (str(tmp_path), _planted_shards(str(tmp_path)), {"capped": layout}, PIPELINE_GPT_ARGS)
    ranks = [out["capped"] for out in run_distributed(_capped_runs, world_size=4, args=args)]
    for rank in ranks[1:]:
        np.testing.assert_array_equal(rank["epochs"], ranks[0]["epochs"])
        for (w, caps, _), (w0, caps0, _) in zip(rank["updates"], ranks[0]["updates"]):
            np.testing.assert_array_equal(w, w0)
            np.testing.assert_array_equal(caps, caps0)
    updates = ranks[0]["updates"]
    assert len(updates) == STEPS // 2
    for gamma, caps, metrics in updates:
        assert np.all(gamma @ BASIS <= caps * (1 + CAP_TOL)) and metrics["dga_caps_feasible"] == 1
    assert any(m["dga_caps_binding"] > 0 for _, _, m in updates)
    assert ranks[0]["epochs"].max() <= MAX_EPOCHS + 8 / 32, ranks[0]["epochs"]
