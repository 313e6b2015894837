"""DynamicMixtureSampler: allocation bound, epochs, token limits, empty domains, checkpoints, DP, bases,
probes; and its C++ kernels (megatron_dga._C, the only implementation) against the numpy oracle in
tests/helpers/sampler_oracle.py, bit for bit."""

import json
import types

import numpy as np
import pytest
import scipy.sparse as sp

from megatron_dga import _C
from megatron_dga.data.sampler import DynamicMixtureSampler, MixtureSamplerConfig
from megatron_dga.errors import CheckpointError, ConfigError
from tests.helpers import sampler_oracle as oracle
from tests.helpers.sampler_oracle import harmonic


def make(sizes, gbs=32, mbs=4, seed=7, **kw):
    cfg_kw = {k: kw.pop(k) for k in ("sequence_length", "token_limits") if k in kw}
    cfg = MixtureSamplerConfig(global_batch_size=gbs, micro_batch_size=mbs, seed=seed, **cfg_kw)
    return DynamicMixtureSampler(sizes, cfg, **kw)


def make_pair(sizes, **kw):
    """(production sampler, the same sampler computing its indices with the numpy oracle)."""
    return make(sizes, **kw), oracle.use_oracle(make(sizes, **kw))


def brute_force_counts(deficit, total):
    """Megatron's rule one sample at a time: largest remaining deficit, lowest index on ties."""
    counts = np.zeros(deficit.size, dtype=np.int64)
    for _ in range(total):
        counts[np.argmax(deficit - counts)] += 1
    return counts


def test_allocation_equals_sequential_greedy():
    """Kernel and oracle against megatron's one-sample-at-a-time rule."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        k, total = int(rng.integers(1, 12)), int(rng.integers(1, 40))
        carry = rng.uniform(-1, 2, k)
        carry -= carry.mean()
        w = rng.dirichlet(np.full(k, 0.3)) if rng.random() < 0.7 else np.eye(k)[rng.integers(k)]
        d = carry + total * w
        want = brute_force_counts(d, total)
        np.testing.assert_array_equal(_C.sampler_allocate_counts(d, total), want)
        np.testing.assert_array_equal(oracle.sampler_allocate_counts(d, total), want)


def permute(x, n, key):
    """The kernel's keyed bijection of [0, n) at positions x, one key."""
    x = np.asarray(x, dtype=np.int64)
    return _C.sampler_permute(x, np.full(x.size, n, dtype=np.int64), np.full(x.size, key, dtype=np.uint64))


def test_keyed_permutation_is_a_bijection_and_depends_on_key():
    for n in [1, 2, 3, 7, 64, 65, 1000, 4099]:
        x = np.arange(n)
        p = permute(x, n, 11)
        np.testing.assert_array_equal(np.sort(p), x)
        np.testing.assert_array_equal(p, oracle.keyed_permutation(x, n, np.uint64(11)))
        if n >= 64:
            assert not np.array_equal(p, permute(x, n, 12))
            assert not np.array_equal(p, x)


@pytest.mark.parametrize("k,gbs,steps", [(5, 16, 400), (1000, 64, 300)])
def test_realised_counts_track_changing_weights_within_bound(k, gbs, steps):
    rng = np.random.default_rng(k)
    s = make(rng.integers(50, 500, k), gbs=gbs)
    target = np.zeros(k)  # float64 reference: sum_s B * w(s)
    counts = np.zeros(k, dtype=np.int64)
    hk = harmonic(k)
    j = np.arange(1, k + 1)
    top_bound = j * (hk - np.cumsum(1.0 / j))  # j * (H_k - H_j)
    worst = 0.0
    for _ in range(steps):
        w = rng.dirichlet(np.full(k, 0.2)) * (rng.random(k) < 0.7)  # sparse, changing every step
        if w.sum() == 0:
            w[rng.integers(k)] = 1.0
        s.set_weights(w)
        target += gbs * w / w.sum()
        batch = s.global_batch()
        counts += np.bincount(batch[:, 0], minlength=k)
        dev = target - counts
        assert dev.min() >= -1 - 1e-9
        assert dev.max() <= hk - 1 + 1e-9
        prefix = np.cumsum(np.sort(dev)[::-1])
        assert np.all(prefix <= top_bound + 1e-9)
        worst = max(worst, np.abs(dev).max())
    assert worst > 0.0


def test_bound_is_reached_by_adversarial_weights():
    # Cup-game lower-bound sequence with B = 1: the last domain ends H_k - 1 behind.
    k = 12
    s = make(np.full(k, 10), gbs=1, mbs=1)
    target = np.zeros(k)
    counts = np.zeros(k)
    for t in range(k - 1):
        w = np.zeros(k)
        w[t:] = 1.0
        s.set_weights(w)
        target += w / w.sum()
        counts[s.global_batch()[0, 0]] += 1
    # Domain t was served at step t; the rest of the mass piled on the last domain.
    assert target[-1] - counts[-1] == pytest.approx(harmonic(k) - 1, abs=1e-9)


def test_static_weights_give_exact_proportions_and_mixed_micro_batches():
    w = np.array([0.5, 0.25, 0.125, 0.125])
    s = make([100, 100, 100, 100], gbs=64, mbs=8, weights=w)
    for _ in range(5):
        batch = s.global_batch()
        np.testing.assert_array_equal(np.bincount(batch[:, 0], minlength=4), 64 * w)
        for mb in s.rank_micro_batches(batch, 0, 1):
            np.testing.assert_allclose(np.bincount(mb[:, 0], minlength=4), 8 * w, atol=1.0)
        assert not np.all(np.diff(batch[:, 0]) >= 0)  # not sorted by domain


def test_each_sample_once_per_epoch_then_reshuffled():
    sizes = [37, 50, 23]
    s = make(sizes, gbs=10, mbs=2, weights=np.array(sizes) / sum(sizes))
    drawn = [[] for _ in sizes]
    for _ in range(2 * sum(sizes) // 10 + 2):
        for d, i in s.global_batch():
            drawn[d].append(int(i))
    for d, n in enumerate(sizes):
        seq = np.array(drawn[d])
        assert seq.size >= 2 * n
        np.testing.assert_array_equal(np.sort(seq[:n]), np.arange(n))
        np.testing.assert_array_equal(np.sort(seq[n : 2 * n]), np.arange(n))
        assert not np.array_equal(seq[:n], seq[n : 2 * n])
    stats = s.consumption()
    np.testing.assert_array_equal(stats["samples"], [len(x) for x in drawn])
    np.testing.assert_allclose(stats["epochs"], np.array([len(x) for x in drawn]) / sizes)


def test_token_limited_domain_repeats_only_its_subset():
    sizes = [200, 60]
    s = make(sizes, gbs=16, mbs=4, sequence_length=8, token_limits=[10 * 8 + 5, None], weights=[0.5, 0.5])
    assert s.accessible_sizes.tolist() == [10, 60]
    seen = []
    for _ in range(20):
        b = s.global_batch()
        seen.extend(b[b[:, 0] == 0, 1].tolist())
    seen = np.array(seen)
    subset = np.unique(seen)
    assert subset.size == 10 and seen.size == 160
    for e in range(16):  # every epoch of the limited domain is a permutation of the same subset
        np.testing.assert_array_equal(np.sort(seen[10 * e : 10 * (e + 1)]), subset)
    ev = np.concatenate(s.eval_batches(0, 4, 5))[:, 1]
    assert np.intersect1d(ev, subset).size == 0  # eval samples are held out of the subset
    assert np.setdiff1d(np.unique(s.probe_batch(0, 30)[:, 1]), subset).size == 0
    stats = s.consumption()
    assert stats["tokens"][0] == 160 * 8 and stats["epochs"][0] == pytest.approx(16.0)
    with pytest.raises(ConfigError, match="token limit of domain 0"):
        make(sizes, sequence_length=8, token_limits=[4, None])


def drive(s, steps, rng_seed):
    """A deterministic mixture of calls: weight changes, batches, probes."""
    rng = np.random.default_rng(rng_seed)
    out = []
    for t in range(steps):
        if t % 3 == 0:
            s.set_weights(rng.dirichlet(np.ones(s.num_domains)))
        out.append(s.global_batch())
        out.append(s.probe_batch(int(rng.integers(s.num_domains)), 3))
    return out


def test_state_dict_resume_mid_epoch_is_identical():
    sizes = [41, 17, 90]
    full = make(sizes, gbs=12, mbs=2)
    ref = drive(full, 10, 1) + drive(full, 10, 2)
    a = make(sizes, gbs=12, mbs=2)
    first = drive(a, 10, 1)
    state = json.loads(json.dumps(a.state_dict()))  # JSON friendly, no permutations inside
    assert len(json.dumps(state)) < 2000
    assert 0 < a.consumption(reset=False)["epochs"].min() and np.any(a.consumption(reset=False)["epochs"] % 1 > 0)
    b = make(sizes, gbs=12, mbs=2)
    b.load_state_dict(state)
    rest = drive(b, 10, 2)
    for x, y in zip(ref, first + rest):
        np.testing.assert_array_equal(x, y)
    assert "weights" not in state  # their owner (the mixing strategy) saves and sets them; drive() sets them first
    # A v1 state (sizes as full lists, before the digests; the weights inside) resumes the same way.
    v1 = dict(
        state,
        format="megatron-dga/mixture-sampler-v1",
        domain_sizes=sizes,
        accessible_sizes=sizes,
        weights=[0.2, 0.3, 0.5],
        basis_weights=None,
    )
    c = make(sizes, gbs=12, mbs=2)
    c.load_state_dict(v1)
    for x, y in zip(rest, drive(c, 10, 2)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(CheckpointError, match="seed"):
        make(sizes, gbs=12, mbs=2, seed=8).load_state_dict(state)
    with pytest.raises(CheckpointError, match="domain_sizes"):
        make([41, 17, 91], gbs=12, mbs=2).load_state_dict(state)


def test_dp_ranks_agree_and_partition_the_global_batch():
    sizes = [30, 40, 50, 60]
    ranks = [make(sizes, gbs=24, mbs=3) for _ in range(4)]
    for step in range(5):
        batches = [r.global_batch() for r in ranks]
        for b in batches[1:]:
            np.testing.assert_array_equal(b, batches[0])
        for dp in (1, 2, 4):
            parts = [mb for r in range(dp) for mb in ranks[r].rank_micro_batches(batches[r], r, dp)]
            assert all(p.shape == (3, 2) for p in parts)
            assert len(parts) == 24 // 3
            np.testing.assert_array_equal(np.concatenate(parts), batches[0])
    with pytest.raises(ConfigError, match="not divisible"):
        ranks[0].rank_micro_batches(batches[0], 0, 5)
    with pytest.raises(ConfigError, match="not divisible"):
        MixtureSamplerConfig(global_batch_size=24, micro_batch_size=5, data_parallel_size=1)


@pytest.mark.parametrize("sparse", [False, True])
def test_two_level_sampling_realises_gamma_P(sparse):
    rng = np.random.default_rng(3)
    n_basis, k, gbs, steps = 4, 30, 32, 200
    P = rng.dirichlet(np.full(k, 0.3), size=n_basis) * (rng.random((n_basis, k)) < 0.5)
    P[:, 0] += 1e-3
    P /= P.sum(axis=1, keepdims=True)
    s = make(np.full(k, 100), gbs=gbs)
    s.set_basis(sp.csr_matrix(P) if sparse else P)
    target, counts = np.zeros(k), np.zeros(k)
    for t in range(steps):
        gamma = rng.dirichlet(np.ones(n_basis))
        s.set_basis_weights(gamma)
        alpha = gamma @ P  # float64 reference
        np.testing.assert_allclose(s.weights, alpha / alpha.sum(), rtol=1e-12, atol=1e-15)
        target += gbs * alpha
        counts += np.bincount(s.global_batch()[:, 0], minlength=k)
        assert np.all(target - counts >= -1 - 1e-9) and np.all(target - counts <= harmonic(k) - 1 + 1e-9)
    state = json.loads(json.dumps(s.state_dict()))
    s2 = make(np.full(k, 100), gbs=gbs)
    with pytest.raises(CheckpointError, match="basis"):
        s2.load_state_dict(state)
    s2.set_basis(P)
    s2.load_state_dict(state)
    s2.set_basis_weights(s.basis_weights)  # the weights come from their owner, not the state
    np.testing.assert_array_equal(s2.global_batch(), s.global_batch())
    # Basis probes: fine domains follow P_n within floor/ceil of size * P_n.
    for n in range(n_basis):
        pb = s.probe_batch_from_basis(n, 50)
        got = np.bincount(pb[:, 0], minlength=k)
        assert np.all(got >= np.floor(50 * P[n] - 1e-9)) and np.all(got <= np.ceil(50 * P[n] + 1e-9))
        assert np.all(got[P[n] == 0] == 0)


def test_basis_validation():
    s = make([10, 10, 10])
    with pytest.raises(ConfigError, match="set_basis"):
        s.set_basis_weights([1.0])
    with pytest.raises(ConfigError, match="sums to"):
        s.set_basis(np.array([[0.5, 0.2, 0.2]]))
    with pytest.raises(ConfigError, match="3 domains"):
        s.set_basis(np.array([[0.5, 0.5]]))
    s.set_basis(np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), basis_names=["web", "code"])
    with pytest.raises(ConfigError, match="'code'"):
        s.set_basis_weights([1.0, -0.1])


def test_probes_and_eval_do_not_perturb_training_stream():
    sizes = [25, 35]
    a, b = make(sizes, gbs=8, mbs=2, held_out_sizes=[9]), make(sizes, gbs=8, mbs=2, held_out_sizes=[9])
    for step in range(12):
        b.probe_batch(step % 3, 5)  # id 2 is the held-out (specific) source
        b.eval_batches(step % 2, 2, 4)
        np.testing.assert_array_equal(a.global_batch(), b.global_batch())
    assert b.state_dict()["probe_consumed"] != a.state_dict()["probe_consumed"]
    # probe cycles: one full cycle of the held-out source visits each sample once
    c = make(sizes, gbs=8, mbs=2, held_out_sizes=[9])
    cyc = np.concatenate([c.probe_batch(2, 3)[:, 1] for _ in range(3)])
    np.testing.assert_array_equal(np.sort(cyc), np.arange(9))
    # eval sets are fixed
    e1, e2 = c.eval_batches(1, 3, 4), c.eval_batches(1, 3, 4)
    for x, y in zip(e1, e2):
        np.testing.assert_array_equal(x, y)
    assert np.unique(np.concatenate(e1)[:, 1]).size == 12
    with pytest.raises(ConfigError, match="outside"):
        c.probe_batch(3, 2)


@pytest.mark.parametrize(
    "weights,match",
    [
        ([0.5, -0.1, 0.6], "'b'.*>= 0"),
        ([0, 0, 0], "all 3 entries are zero"),
        ([0.1, float("nan"), 1], "'b'.*finite"),
        ([1.0, 2.0], "2 entries, expected 3"),
    ],
)
def test_weight_validation_errors(weights, match):
    s = make([5, 5, 5], domain_names=["a", "b", "c"])
    before = s.weights
    with pytest.raises(ConfigError, match=match):
        s.set_weights(weights)
    np.testing.assert_array_equal(s.weights, before)


def test_consumption_deltas_and_global_batches_equivalence():
    sizes = [20, 30]
    a, b = make(sizes, gbs=10, mbs=5, sequence_length=4), make(sizes, gbs=10, mbs=5, sequence_length=4)
    a.set_weights([0.3, 0.7])
    b.set_weights([0.3, 0.7])
    many = b.global_batches(7)
    for t in range(7):
        np.testing.assert_array_equal(a.global_batch(), many[t])
    first = a.consumption()
    assert first["samples"].sum() == 70 and first["tokens"].sum() == 280
    a.global_batch()
    second = a.consumption()
    assert second["samples_delta"].sum() == 10 and second["samples"].sum() == 80


def test_keyed_permutation_images_are_close_to_uniform():
    # Over many keys, where position 1 lands must be ~uniform (a weak Feistel is visibly biased).
    keys = np.arange(1, 50_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    ones = np.ones(keys.size, dtype=np.int64)
    for n in (3, 10):
        freq = np.bincount(_C.sampler_permute(ones, n * ones, keys), minlength=n) / keys.size
        np.testing.assert_allclose(freq * n, 1.0, atol=0.05)


# ------------------------------------------------- empty domains
def test_empty_domains_are_never_drawn_and_the_bound_holds_over_the_others():
    # 60% of 500 domains empty; weights change every step and put most of their mass on empty
    # domains (dropped): no empty domain is ever drawn, and the README's bound holds over the
    # k' non-empty ones with H_k' (float64 reference of the renormalised weights).
    rng = np.random.default_rng(4)
    k, gbs, steps = 500, 64, 300
    sizes = rng.integers(5, 60, k) * (rng.random(k) >= 0.6)
    live = np.flatnonzero(sizes > 0)
    s = make(sizes, gbs=gbs)
    np.testing.assert_array_equal(s.empty_domains, np.flatnonzero(sizes == 0))
    hk = harmonic(live.size)
    j = np.arange(1, live.size + 1)
    top_bound = j * (hk - np.cumsum(1.0 / j))
    target, counts = np.zeros(k), np.zeros(k, dtype=np.int64)
    worst = 0.0
    for t in range(steps):
        w = rng.dirichlet(np.full(k, 0.2)) * (rng.random(k) < 0.7)
        w[live[rng.integers(live.size)]] += 0.01
        s.set_weights(w)
        kept = np.where(sizes > 0, w, 0.0)
        np.testing.assert_allclose(s.weights, kept / kept.sum(), rtol=1e-12, atol=1e-15)
        target += gbs * kept / kept.sum()
        batch = s.global_batch()
        assert sizes[batch[:, 0]].min() > 0 and np.all(batch[:, 1] < sizes[batch[:, 0]])
        counts += np.bincount(batch[:, 0], minlength=k)
        dev = (target - counts)[live]
        assert dev.min() >= -1 - 1e-9 and dev.max() <= hk - 1 + 1e-9
        assert np.all(np.cumsum(np.sort(dev)[::-1]) <= top_bound + 1e-9)
        worst = max(worst, np.abs(dev).max())
    assert worst > 0.0 and counts[sizes == 0].sum() == 0
    stats = s.consumption()
    np.testing.assert_array_equal(stats["samples"], counts)
    assert np.all(stats["epochs"][sizes == 0] == 0) and np.all(np.isfinite(stats["epochs"]))


@pytest.mark.parametrize("sparse", [False, True])
def test_empty_domains_weights_basis_probes_and_resume(sparse):
    sizes, names = [20, 0, 15, 0, 0, 30], list("abcdef")
    kw = dict(
        gbs=8,
        mbs=2,
        domain_names=names,
        sequence_length=4,
        token_limits=[None, 8, 40, None, None, None],
        held_out_sizes=[5],
    )
    s = make(sizes, **kw)
    assert s.accessible_sizes.tolist() == [20, 0, 10, 0, 0, 30]  # a token limit on an empty domain is harmless
    np.testing.assert_allclose(s.weights, [1 / 3, 0, 1 / 3, 0, 0, 1 / 3])  # default: uniform over non-empty
    with pytest.raises(ConfigError, match="'b' \\(id 1\\) is empty"):
        s.probe_batch(1, 2)
    with pytest.raises(ConfigError, match="'d' \\(id 3\\) is empty"):
        s.eval_batches(3, 1, 2)
    with pytest.raises(ConfigError, match="all their mass on empty domains \\('b', 'e'"):
        s.set_weights([0, 1, 0, 0, 2, 0])
    s.set_weights([1, 5, 1, 0, 0, 2])  # b's mass is dropped, the rest renormalised
    np.testing.assert_allclose(s.weights, [0.25, 0, 0.25, 0, 0, 0.5], rtol=1e-15)
    as_basis = sp.csr_matrix if sparse else np.asarray
    with pytest.raises(ConfigError, match="'junk' has all its mass on empty domains"):
        s.set_basis(as_basis(np.array([[0.2, 0.4, 0.4, 0, 0, 0], [0, 0.5, 0, 0.25, 0.25, 0]])), ["web", "junk"])
    P = np.array([[0.2, 0.4, 0.4, 0, 0, 0], [0, 0, 0, 0, 0.5, 0.5], [0.5, 0, 0, 0, 0, 0.5]])
    s.set_basis(as_basis(P), ["web", "code", "kept"])
    s.set_basis_weights([0.5, 0.25, 0.25])  # rows restricted to non-empty domains: [1/3, 2/3], [1], [1/2, 1/2]
    np.testing.assert_allclose(s.weights, [1 / 6 + 1 / 8, 0, 1 / 3, 0, 0, 1 / 4 + 1 / 8], rtol=1e-12)
    got = np.bincount(s.probe_batch_from_basis(0, 30)[:, 0], minlength=6)
    np.testing.assert_array_equal(got, [10, 0, 20, 0, 0, 0])
    for _ in range(40):  # several epochs of every non-empty domain
        b = s.global_batch()
        assert set(b[:, 0].tolist()) <= {0, 2, 5}
        s.probe_batch(int(b[0, 0]), 3)
    state = json.loads(json.dumps(s.state_dict()))
    assert set(state["consumed"]["index"]) <= {0, 2, 5} and all(state["carry"][i] == 0.0 for i in (1, 3, 4))
    r = make(sizes, **kw)
    r.set_basis(as_basis(P), ["web", "code", "kept"])
    r.load_state_dict(state)
    r.set_basis_weights(s.basis_weights)
    for _ in range(5):
        np.testing.assert_array_equal(r.global_batch(), s.global_batch())
        np.testing.assert_array_equal(r.probe_batch_from_basis(2, 7), s.probe_batch_from_basis(2, 7))
    assert r.state_dict() == s.state_dict()
    state["consumed"]["index"].append(3)
    state["consumed"]["value"].append(4)
    with pytest.raises(CheckpointError, match="non-zero consumed on empty domains"):
        make(sizes, **kw).load_state_dict(state)
    with pytest.raises(ConfigError, match="all 3 training domains are empty"):
        make([0, 0, 0])
    with pytest.raises(ConfigError, match="'x' has -1 samples"):
        make([3, -1], domain_names=["w", "x"])


def test_kernels_reject_a_size_of_zero_before_any_work():
    # The sampler never hands an empty domain to a kernel; if anything did, it gets an error, not a
    # division by zero, and the in/out arrays are untouched.
    zero_keys = np.zeros(2, dtype=np.uint64)
    sizes = np.array([5, 0], dtype=np.int64)
    with pytest.raises(ValueError, match="outside \\[1, 2\\*\\*31\\)"):
        _C.sampler_permute(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), zero_keys[:1])
    with pytest.raises(ValueError, match="outside \\[1, 2\\*\\*31\\)"):
        _C.sampler_stream_samples(np.array([1]), np.array([0]), sizes, sizes, np.zeros(2, bool), zero_keys, zero_keys)
    carry, consumed = np.zeros(2), np.zeros(2, dtype=np.int64)
    with pytest.raises(ValueError, match="outside \\[1, 2\\*\\*31\\)"):
        _C.sampler_global_batches(
            np.array([1.0, 0.0]),
            carry,
            consumed,
            sizes,
            sizes,
            np.zeros(2, bool),
            zero_keys,
            zero_keys,
            1,
            4,
            0,
            0.6,
            0.4,
        )
    assert not carry.any() and not consumed.any()


# ------------------------------------------------- the kernels (megatron_dga._C) vs the numpy oracle
def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa == sb
    assert a._carry.tobytes() == b._carry.tobytes()  # bit-identical floats, not just equal


def test_kernel_allocation_and_permutation_match_oracle():
    rng = np.random.default_rng(5)
    for trial in range(600):
        k, total = int(rng.integers(1, 40)), int(rng.integers(1, 300))
        if trial % 2:  # quarter steps: many equal fractional parts, so tie-breaking matters
            d = rng.integers(-4, 4 * (2 * total // k + 2), k) / 4
            d[0] += total - d.sum()
        else:
            carry = rng.uniform(-1, 2, k)
            carry -= carry.mean()
            w = rng.dirichlet(np.full(k, 0.3)) if trial % 3 else np.eye(k)[rng.integers(k)]
            d = carry + total * w
        got = _C.sampler_allocate_counts(d, total)
        np.testing.assert_array_equal(got, oracle.sampler_allocate_counts(d, total))
        if total <= 60:
            np.testing.assert_array_equal(got, brute_force_counts(d, total))
    for n in [1, 2, 3, 4, 5, 7, 8, 9, 64, 65, 1000, 4099, 65537, 123_456_789, 2**31 - 1]:
        x = rng.integers(0, n, 3000)
        keys = rng.integers(0, 2**63, 3000).astype(np.uint64) * np.uint64(3)  # full 64-bit range
        nn = np.full(x.size, n)
        np.testing.assert_array_equal(_C.sampler_permute(x, nn, keys), oracle.sampler_permute(x, nn, keys))


def drive_both(pair, steps, rng):
    """The same random calls on both samplers; asserts every result and the state agree."""
    sizes = np.concatenate([pair[0].domain_sizes, pair[0]._sizes[pair[0].num_domains :]])
    live, sources = np.flatnonzero(pair[0].domain_sizes > 0), np.flatnonzero(sizes > 0)
    for t in range(steps):
        if t % 4 == 0:
            w = rng.dirichlet(np.full(pair[0].num_domains, 0.5)) * (rng.random(pair[0].num_domains) < 0.7)
            w[live[int(rng.integers(live.size))]] += 0.1
            for s in pair:
                s.set_weights(w)
        num = int(rng.integers(1, 4))
        got = [s.global_batches(num) if t % 2 else s.global_batch()[None] for s in pair]
        np.testing.assert_array_equal(got[0], got[1])
        d, size = int(rng.choice(sources)), int(rng.integers(1, 40))
        np.testing.assert_array_equal(pair[0].probe_batch(d, size), pair[1].probe_batch(d, size))
        for x, y in zip(pair[0].eval_batches(d, 2, 7), pair[1].eval_batches(d, 2, 7)):
            np.testing.assert_array_equal(x, y)
        assert_same_state(*pair)


def test_kernels_are_bit_identical_to_oracle():
    sizes = [37, 50, 0, 23, 1000, 1, 0, 300, 2]
    kw = dict(
        gbs=48,
        mbs=4,
        sequence_length=4,
        token_limits=[None, 80, None, None, 400, None, 8, 4, None],
        held_out_sizes=[9, 70],
    )
    ext, ref = make_pair(sizes, **kw)
    assert ext._ext is _C and ref._ext is oracle
    rng = np.random.default_rng(11)
    drive_both((ext, ref), 150, rng)  # many epochs of the small and token-limited domains
    P = rng.dirichlet(np.ones(len(sizes)), size=3) * (rng.random((3, len(sizes))) < 0.6)
    P[:, 0] += 0.01
    P /= P.sum(axis=1, keepdims=True)
    for s in (ext, ref):
        s.set_basis(sp.csr_matrix(P))
    for t in range(20):
        gamma = rng.dirichlet(np.ones(3))
        for s in (ext, ref):
            s.set_basis_weights(gamma)
        np.testing.assert_array_equal(ext.global_batches(2), ref.global_batches(2))
        np.testing.assert_array_equal(ext.probe_batch_from_basis(t % 3, 33), ref.probe_batch_from_basis(t % 3, 33))
    assert_same_state(ext, ref)
    # Resume across implementations: a checkpoint of one continues identically in the other.
    state = json.loads(json.dumps(ext.state_dict()))
    ext2, ref2 = make_pair(sizes, **kw)
    for s in (ext2, ref2):
        s.set_basis(P)
        s.load_state_dict(state)
        s.set_basis_weights(gamma)
    for a, b in ((ext2, ref), (ref2, ext)):
        np.testing.assert_array_equal(a.global_batches(3), b.global_batches(3))
        np.testing.assert_array_equal(a.probe_batch(1, 5), b.probe_batch(1, 5))
        assert_same_state(a, b)


@pytest.mark.parametrize("empty_fraction", [0.0, 0.6])
def test_kernels_match_oracle_with_262144_domains(empty_fraction):
    # The paper's K = 262,144 fine domains; with 60% of them empty (leaves of a k-means tree
    # without documents), weights and basis rows partly on empty domains. The state stays small
    # (sparse counters, digests of the sizes) and resumes bit for bit.
    K = 262_144
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 300, K) * (rng.random(K) >= empty_fraction)
    ext, ref = make_pair(sizes, gbs=512, mbs=8)
    w = np.zeros(K)
    live = rng.choice(K, 2000, replace=False)
    w[live] = rng.dirichlet(np.full(live.size, 0.3))
    for s in (ext, ref):
        s.set_weights(w)
    for t in range(6):
        b = ext.global_batch()
        np.testing.assert_array_equal(b, ref.global_batch())
        assert sizes[b[:, 0]].min() > 0
    P = sp.random(8, K, density=1e-3, random_state=3, format="csr")
    P.data[:] = rng.random(P.nnz)
    P = sp.diags(1.0 / np.asarray(P.sum(axis=1)).ravel()) @ P
    gamma = rng.dirichlet(np.ones(8))
    for s in (ext, ref):
        s.set_basis(P)
        s.set_basis_weights(gamma)
    b = ext.global_batches(3)
    np.testing.assert_array_equal(b, ref.global_batches(3))
    pb = ext.probe_batch_from_basis(5, 64)
    np.testing.assert_array_equal(pb, ref.probe_batch_from_basis(5, 64))
    assert sizes[b[..., 0]].min() > 0 and sizes[pb[:, 0]].min() > 0
    assert_same_state(ext, ref)
    if empty_fraction == 0.0:
        return  # resume at this size: with empty domains below (the small cases cover both)
    state = json.loads(json.dumps(ext.state_dict()))
    # Besides the carry and the weights (k floats each; 0.0 on empty domains), a few kilobytes:
    # no per-domain sizes, counters only for the domains drawn.
    assert len(json.dumps({k: v for k, v in state.items() if k != "carry"})) < 50_000
    assert len(state["carry"]) == K
    again = make(sizes, gbs=512, mbs=8)
    again.set_basis(P)
    again.load_state_dict(state)
    again.set_basis_weights(gamma)
    np.testing.assert_array_equal(again.global_batches(2), ext.global_batches(2))
    assert_same_state(again, ext)


def test_the_extension_is_required_and_MEGATRON_DGA_OPS_does_not_apply(monkeypatch):
    from megatron_dga.ops import _backend

    monkeypatch.setenv("MEGATRON_DGA_OPS", "reference")  # the fused ops' switch; the sampler ignores it
    forced = make([30, 40])
    monkeypatch.delenv("MEGATRON_DGA_OPS")
    assert forced._ext is _C
    np.testing.assert_array_equal(forced.global_batches(3), make([30, 40]).global_batches(3))
    # A missing extension: one ConfigError naming the build command, when the sampler is built.
    monkeypatch.setattr(_backend, "_ext", None)
    monkeypatch.setattr(_backend, "_ext_tried", True)
    monkeypatch.setattr(_backend, "_ext_error", "ImportError: not built (test)")
    with pytest.raises(
        ConfigError,
        match="megatron_dga._C, which does not import \\(ImportError: not built \\(test\\)\\).*scripts/setup_env.sh",
    ):
        make([30, 40])
    # An extension built before the sampler kernels existed.
    monkeypatch.setattr(_backend, "_ext", types.SimpleNamespace())
    with pytest.raises(ConfigError, match="lacks sampler_global_batches.*rebuild it"):
        make([3])


@pytest.mark.parametrize("empty", [False, True], ids=["dense", "with_empty_domains"])
def test_lookahead_gives_the_same_batches_and_state_as_computing_on_demand(empty, monkeypatch):
    """prefetch() after every batch (the trainer's StepLoader does so) changes nothing but where the work runs:
    weight changes, basis weights, state round trips and multi-batch calls in between are all honoured."""
    from megatron_dga.data import sampler as sampler_module

    monkeypatch.setattr(sampler_module, "LOOKAHEAD_MIN_DOMAINS", 100)  # 300 domains (180 non-empty) look ahead
    k = 300
    rng = np.random.default_rng(5)
    sizes = rng.integers(5, 200, k)
    if empty:
        sizes[rng.choice(k, 120, replace=False)] = 0
    cfg = MixtureSamplerConfig(global_batch_size=64, micro_batch_size=8, seed=11)
    plain, ahead = DynamicMixtureSampler(sizes, cfg), DynamicMixtureSampler(sizes, cfg)
    basis = sp.random(4, k, density=0.3, random_state=1, format="csr") + sp.csr_matrix(np.full((4, k), 1e-3))
    basis = sp.csr_matrix(basis.multiply(1.0 / basis.sum(axis=1)))
    for s in (plain, ahead):
        s.set_basis(basis)
    saved = None
    for step in range(40):
        if step % 7 == 3:  # a mixing update between two steps: the prefetched batch is stale
            gamma = rng.dirichlet(np.ones(4))
            for s in (plain, ahead):
                s.set_basis_weights(gamma)
        if step == 20:
            saved = ahead.state_dict()
        if step == 25:  # a resume into the same object while a look-ahead is pending
            for s in (plain, ahead):
                s.load_state_dict(json.loads(json.dumps(saved)))
        if step == 30:  # several steps at once (no look-ahead for those)
            np.testing.assert_array_equal(ahead.global_batches(3), plain.global_batches(3))
        np.testing.assert_array_equal(ahead.global_batch(), plain.global_batch(), err_msg=f"step {step}")
        ahead.prefetch()
        assert ahead.state_dict() == plain.state_dict()  # a pending look-ahead changes no state
    # Most batches came from the look-ahead: it is used, not silently bypassed.
    assert ahead.lookahead_hits >= 30 and plain.lookahead_hits == 0
    np.testing.assert_array_equal(ahead.consumption()["samples"], plain.consumption()["samples"])


def test_no_lookahead_below_its_domain_count():
    """With few domains a global batch costs less than handing it to a thread: prefetch() does nothing."""
    from megatron_dga.data.sampler import LOOKAHEAD_MIN_DOMAINS

    s = DynamicMixtureSampler(np.full(8, 50), MixtureSamplerConfig(global_batch_size=16, micro_batch_size=4))
    for _ in range(5):
        s.global_batch()
        s.prefetch()
    assert s.lookahead_hits == 0 and s._worker is None and 8 < LOOKAHEAD_MIN_DOMAINS


def test_basis_labels_follow_the_posterior_and_repeat_on_resume():
    """Rows drawn under basis weights gamma, labelled n with P(n | j) = gamma_n P_nj / alpha_j: the pairs
    (n, j) follow gamma_n P_nj (within 5 standard errors over 200 batches), the labels are the same for a
    sampler that resumes from the state, and P(n | j) = 0 never labels a row n."""
    P = np.array([[0.7, 0.3, 0.0, 0.0], [0.0, 0.2, 0.5, 0.3], [0.25, 0.25, 0.25, 0.25]])
    gamma = np.array([0.5, 0.3, 0.2])
    cfg = MixtureSamplerConfig(global_batch_size=64, micro_batch_size=8, seed=5)
    s = DynamicMixtureSampler(np.full(4, 10_000), cfg)
    s.set_basis(P)
    s.set_basis_weights(gamma)
    joint = np.zeros((3, 4))
    for step in range(200):
        batch = s.global_batch()
        labels = s.basis_labels(batch)
        np.add.at(joint, (labels, batch[:, 0]), 1)
        if step == 99:
            state = s.state_dict()
    expected = gamma[:, None] * P * joint.sum()
    assert np.all(joint[expected == 0] == 0)
    se = np.sqrt(expected * (1 - expected / joint.sum()))
    assert np.all(np.abs(joint - expected) <= 5 * se + 1e-9), (joint, expected)
    # Not the prior: a row of domain 0 is labelled 0 or 2 by its posterior, never uniformly.
    assert joint[1, 0] == 0 and joint[0, 2] == 0
    again = DynamicMixtureSampler(np.full(4, 10_000), cfg)
    again.set_basis(P)
    again.set_basis_weights(gamma)
    again.load_state_dict(state)
    s.load_state_dict(state)
    for _ in range(3):
        a, b = s.global_batch(), again.global_batch()
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(s.basis_labels(a), again.basis_labels(b))
