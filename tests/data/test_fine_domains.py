"""Fine domains from a domain map (megatron_dga.data.fine_domains, --domain-map): samples against a
brute-force oracle and megatron's GPTDataset, the index cache, bad maps through the trainer, and
K = 262,144 fine domains trained with DGA over a basis, saved and resumed bit for bit."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

from megatron_dga.data.domain_map import DomainMap, read_domain_map, shard_identity, write_domain_map
from megatron_dga.data.domains import DomainDatasetConfig
from megatron_dga.data.fine_domains import build_fine_domains, document_keys, sample_from_tokens
from megatron_dga.data.mock import write_packed_shard
from tests.helpers.dist_utils import run_distributed, run_trainers
from tests.helpers.synthetic import EOD, VOCAB, run_argv, write_shard

BAND = 16
"""Tokens of a document of group g lie in [g * BAND, (g + 1) * BAND) (then eod): a sample shows its groups."""


class _Tokenizer:
    eod, vocab_size = EOD, VOCAB


def _corpus(directory, groups_per_shard, lengths_per_shard, seed=0, band=BAND):
    """Shards whose documents carry their group in their tokens; returns the prefixes and the docs."""
    rng = np.random.default_rng(seed)
    prefixes, docs = [], []
    for s, (groups, lengths) in enumerate(zip(groups_per_shard, lengths_per_shard)):
        shard_docs = [
            np.append(g * band + rng.integers(0, band, size=max(n - 1, 0)), EOD)[:n] for g, n in zip(groups, lengths)
        ]
        tokens = np.concatenate(shard_docs) if shard_docs else np.zeros(0, np.int64)
        prefixes.append(write_packed_shard(os.path.join(directory, f"part{s}_text_document"), tokens, lengths, VOCAB))
        docs.extend(shard_docs)
    return prefixes, docs


def _oracle(docs, group_ids, num_groups, seq, seed, documents):
    """Each group's samples by brute force: its documents in the seeded order, the range, concatenated, sliced."""
    keys = document_keys(seed, len(docs)) >> np.uint64(32)
    out = []
    for g in range(num_groups):
        members = sorted(np.flatnonzero(group_ids == g).tolist(), key=lambda d: (int(keys[d]), d))
        n = len(members)
        part = members[round(documents[0] * n) : round(documents[1] * n)]
        text = np.concatenate([docs[d] for d in part]) if part else np.zeros(0, np.int64)
        count = max(len(text) - 1, 0) // seq
        out.append([text[i * seq : i * seq + seq + 1] for i in range(count)])
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3 shards, 7 groups: one empty, one too short for a sample, documents of 0..40 tokens."""
    rng = np.random.default_rng(1)
    groups = [rng.choice([0, 1, 2, 3, 5, 6], size=n, p=[0.3, 0.25, 0.2, 0.15, 0.05, 0.05]) for n in (90, 60, 70)]
    groups[2][:3] = 4  # group 4: three documents in one shard
    lengths = [rng.integers(0, 41, size=len(g)) for g in groups]
    lengths[2][:3] = 2  # group 4 holds 6 tokens: no sample of 16 + 1
    prefixes, docs = _corpus(str(tmp_path_factory.mktemp("small")), groups, lengths)
    return prefixes, docs, np.concatenate(groups).astype(np.int32)


@pytest.mark.parametrize("documents", [(0.0, 1.0), (0.0, 0.7), (0.7, 1.0)])
def test_samples_match_the_brute_force_oracle(small, documents):
    prefixes, docs, group_ids = small
    seq, seed, k = 16, 7, 8  # group 7 has no document at all
    cfg = DomainDatasetConfig(sequence_length=seq, seed=seed, eod_mask_loss=True)
    fine = build_fine_domains(prefixes, group_ids, k, _Tokenizer(), cfg, documents=documents)
    expected = _oracle(docs, group_ids, k, seq, seed, documents)
    assert fine.num_samples.tolist() == [len(e) for e in expected]
    assert fine.num_samples[4] == 0 and fine.num_samples[7] == 0
    spanned_shards = set()
    for g in range(k):
        for s, window in enumerate(expected[g]):
            np.testing.assert_array_equal(fine.tokens(g, s), window)
            got, want = fine.get(g, s), sample_from_tokens(window, EOD, -1, cfg)
            assert got.keys() == want.keys()
            for name in want:
                assert bool((got[name] == want[name]).all()), (g, s, name)
            content = window[window != EOD]
            assert np.all(content // BAND == g), (g, s)  # only group g's documents
            spanned_shards.add(fine.source_path(g, s))
    assert len(spanned_shards) == 3  # groups mix the shards
    with pytest.raises(IndexError):
        fine.get(4, 0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"eod_mask_loss": True},
        {"reset_position_ids": True},
        {"reset_attention_mask": True, "create_attention_mask": True, "reset_position_ids": True},
        {"add_extra_token": False},
    ],
)
def test_sample_dict_is_what_gpt_dataset_returns(small, options):
    """GPTDataset.__getitem__ on the same token window (its window query replaced) gives the same dict,
    and a group holding all of a shard's documents has as many samples as that shard's GPTDataset."""
    import torch
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    from megatron_dga.data.domains import _TokenizerView

    options = dict(options)
    extra = options.pop("add_extra_token", True)
    prefixes, docs, _ = small
    seq = 16
    view = _TokenizerView(_Tokenizer())
    gpt_cfg = GPTDatasetConfig(
        random_seed=1,
        sequence_length=seq,
        tokenizer=view,
        split="1,0,0",
        reset_position_ids=options.get("reset_position_ids", False),
        reset_attention_mask=options.get("reset_attention_mask", False),
        eod_mask_loss=options.get("eod_mask_loss", False),
        create_attention_mask=options.get("create_attention_mask", False),
        add_extra_token_to_sequence=extra,
    )
    indexed = IndexedDataset(prefixes[0])
    gpt = GPTDataset(indexed, prefixes[0], np.arange(len(indexed), dtype=np.int32), None, Split.train, gpt_cfg)
    cfg = DomainDatasetConfig(sequence_length=seq, **options)
    one_group = np.zeros(len(indexed), dtype=np.int32)
    fine = build_fine_domains(prefixes[:1], one_group, 1, _Tokenizer(), cfg, add_extra_token=extra)
    assert fine.num_samples[0] == len(gpt)
    for s in (0, 3, len(gpt) - 1):
        window = fine.tokens(0, s)
        assert window.size == seq + extra
        gpt._query_document_sample_shuffle_indices = lambda idx, w=window: (w.copy(), np.zeros(1, np.int64))
        want = gpt[s]
        got = fine.get(0, s)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (options, name)


def test_index_is_identical_across_builds_and_from_the_cache(small, tmp_path, monkeypatch):
    from megatron_dga.data import fine_domains

    prefixes, _, group_ids = small
    cfg = DomainDatasetConfig(sequence_length=8, seed=3)
    arrays = lambda f: [getattr(f.index, n) for n in f.index.ARRAYS]
    first = build_fine_domains(prefixes, group_ids, 8, _Tokenizer(), cfg, documents=(0.0, 0.8))
    second = build_fine_domains(prefixes, group_ids, 8, _Tokenizer(), cfg, documents=(0.0, 0.8))
    for a, b in zip(arrays(first), arrays(second)):
        np.testing.assert_array_equal(a, b)
    cached_cfg = DomainDatasetConfig(sequence_length=8, seed=3, path_to_cache=str(tmp_path / "cache"))
    written = build_fine_domains(prefixes, group_ids, 8, _Tokenizer(), cached_cfg, documents=(0.0, 0.8))
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith("-FineDomains-index.npz")

    def no_build(*args, **kwargs):
        raise AssertionError("the cached index was rebuilt")

    monkeypatch.setattr(fine_domains, "build_fine_index", no_build)
    loaded = build_fine_domains(prefixes, group_ids, 8, _Tokenizer(), cached_cfg, documents=(0.0, 0.8))
    for a, b, c in zip(arrays(first), arrays(written), arrays(loaded)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert loaded.get(0, 1)["tokens"].tolist() == first.get(0, 1)["tokens"].tolist()
    # DataLoader workers started by spawn receive the object pickled (shards reopened by path).
    import pickle

    copy = pickle.loads(pickle.dumps(loaded.select(np.array([2, 0]))))
    assert copy.get(1, 1)["tokens"].tolist() == first.get(0, 1)["tokens"].tolist()
    monkeypatch.undo()
    # Another document range (the held-out part) or seed is another cache entry, never the same file.
    build_fine_domains(prefixes, group_ids, 8, _Tokenizer(), cached_cfg, documents=(0.8, 1.0))
    assert len(os.listdir(tmp_path / "cache")) == 2
    # A truncated cache file (a crash mid-copy, a full disk) is rebuilt, with a warning, not a traceback.
    cache = tmp_path / "cache" / files[0]
    cache.write_bytes(cache.read_bytes()[:64])
    rebuilt = build_fine_domains(prefixes, group_ids, 8, _Tokenizer(), cached_cfg, documents=(0.0, 0.8))
    for a, b in zip(arrays(first), arrays(rebuilt)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- through the trainer


def _write_map(path, prefixes, domain_ids, levels):
    write_domain_map(
        path, DomainMap(np.asarray(domain_ids, np.int32), [shard_identity(p) for p in prefixes], list(levels))
    )
    return path


def _argv(prefixes, map_path, run_dir, extra=(), iters=4):
    return run_argv(
        run_dir, extra, data=["--data-path", *prefixes, "--domain-map", map_path], global_batch=4, iters=iters
    )


def _main_errors(rank, world_size, argvs):
    """(exit code, stderr) of pretrain_gpt.main for each argv, in one process."""
    from megatron_dga.pretrain_gpt import main

    out = []
    for argv in argvs:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        out.append((rc, err.getvalue()))
    return out


def test_bad_maps_stop_the_trainer_naming_the_map(small, tmp_path):
    import dataclasses
    import json

    prefixes, _, group_ids = small
    good = _write_map(str(tmp_path / "good.npz"), prefixes, group_ids % 4, [2, 2])
    dmap = read_domain_map(good)
    # A map built for a version of part1 with one document more.
    stale = dataclasses.replace(dmap.shards[1], num_documents=dmap.shards[1].num_documents + 1)
    short = str(tmp_path / "stale.npz")
    write_domain_map(short, DomainMap(np.append(dmap.domain_ids, 0), [dmap.shards[0], stale, dmap.shards[2]], [2, 2]))
    # A map of the same names over other shards (same document counts, other lengths).
    other_dir = tmp_path / "other"
    rng = np.random.default_rng(5)
    foreign_prefixes, _ = _corpus(
        str(other_dir),
        [g.tolist() for g in np.split(group_ids % 4, [90, 150])],
        [rng.integers(1, 41, size=n) for n in (90, 60, 70)],
    )
    foreign = _write_map(str(tmp_path / "foreign.npz"), foreign_prefixes, group_ids % 4, [2, 2])
    out_of_range = str(tmp_path / "range.npz")
    with open(out_of_range, "wb") as fh:
        header = {
            "format": "megatron-dga/domain-map-v1",
            "levels": [2, 2],
            "names": None,
            "clusters_dir": None,
            "metadata": {},
            "shards": [
                {
                    "name": s.name,
                    "num_documents": s.num_documents,
                    "num_tokens": s.num_tokens,
                    "idx_sha256": s.idx_sha256,
                }
                for s in dmap.shards
            ],
        }
        np.savez(fh, header=np.array(json.dumps(header)), domain_ids=np.append(dmap.domain_ids[:-1], 9))
    cases = {
        short: "part1_text_document has 60 documents but the map was built for 61",
        foreign: "part0_text_document.idx is not the shard the map was built for",
        out_of_range: "has domain id 9, outside [0, 4)",
    }
    # The data pipeline the trainer builds refuses each, naming the map; the first also through the
    # trainer's entry point as users start it (exit code 2, one error line).
    from types import SimpleNamespace

    from megatron_dga.errors import DataError
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.data import DataPipeline

    for i, (path, fragment) in enumerate(cases.items()):
        with pytest.raises(DataError) as err:
            DataPipeline(parse_args(_argv(prefixes, path, tmp_path / f"run{i}")), SimpleNamespace(dp_rank=0, dp_size=1))
        assert path in str(err.value) and fragment in str(err.value), str(err.value)
    [(rc, err)] = run_distributed(_main_errors, world_size=1, args=([_argv(prefixes, short, tmp_path / "main")],))[0]
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert rc == 2 and len(lines) == 1 and short in lines[0] and cases[short] in lines[0], err[-2000:]


# ----------------------------------------------------------------------------- K = 262,144 end to end

LEVELS = (64, 64, 64)
K = 64**3


@pytest.fixture(scope="module")
def paper_scale(tmp_path_factory):
    """300,000 documents of 8-63 tokens in 3 shards, a random 64 x 64 x 64 map, a 4 x K basis, a specific set."""
    root = tmp_path_factory.mktemp("k262144")
    rng = np.random.default_rng(0)
    prefixes, all_lengths = [], []
    for s in range(3):
        lengths = rng.integers(8, 64, size=100_000)
        all_lengths.append(lengths)
        tokens = rng.integers(0, EOD, size=int(lengths.sum()), dtype=np.int64)
        tokens[np.cumsum(lengths) - 1] = EOD
        prefixes.append(write_packed_shard(str(root / f"web{s}_text_document"), tokens, lengths, VOCAB))
    domain_ids = rng.integers(0, K, size=300_000).astype(np.int32)
    map_path = _write_map(str(root / "map.npz"), prefixes, domain_ids, LEVELS)
    # Basis n: uniform over the fine domains of the top-level clusters c with c % 4 == n that hold a sample
    # of --seq-length 32 (a document of 33+ tokens or several short ones; what the importance tool would give).
    from megatron_dga.mixing.weights_io import save_basis

    tokens_per_domain = np.bincount(domain_ids, weights=np.concatenate(all_lengths), minlength=K)
    has_sample = tokens_per_domain >= 33
    top = np.arange(K) // (K // 64)
    matrix = np.zeros((4, K))
    for n in range(4):
        row = has_sample & (top % 4 == n)
        matrix[n, row] = 1.0 / row.sum()
    dmap = read_domain_map(map_path)
    save_basis(str(root / "basis.npz"), matrix, [f"b{n}" for n in range(4)], dmap.domain_names())
    specific = write_shard(
        str(root / "specific_text_document"), [np.append(rng.integers(0, EOD, size=40), EOD) for _ in range(16)]
    )
    return {"prefixes": prefixes, "map": map_path, "basis": str(root / "basis.npz"), "specific": specific}


@pytest.mark.slow
def test_262144_fine_domains_train_dga_over_a_basis_resume_bit_for_bit_and_with_workers(paper_scale, tmp_path):
    d = paper_scale
    dga = [
        "--mixing",
        "dga",
        "--dga-basis",
        d["basis"],
        "--dga-interval",
        "2",
        "--dga-domain-batch-size",
        "2",
        "--dga-specific-batch-size",
        "2",
        "--specific-data-path",
        d["specific"],
        "--data-cache-path",
        str(tmp_path / "cache"),
        "--eval-interval",
        "4",
        "--eval-iters",
        "1",
    ]
    ckpt = str(tmp_path / "ckpt")
    runs = run_trainers(
        {
            "straight": _argv(d["prefixes"], d["map"], tmp_path / "a", dga),
            "first": _argv(d["prefixes"], d["map"], tmp_path / "b", dga + ["--save", ckpt, "--exit-interval", "2"]),
            "resumed": _argv(d["prefixes"], d["map"], tmp_path / "b", dga + ["--load", ckpt]),
            # DataLoader workers receive the fine-domain datasets pickled; indices are still drawn in the main process.
            "workers": _argv(d["prefixes"], d["map"], tmp_path / "c", dga + ["--num-workers", "1"]),
        }
    )
    straight = runs["straight"]["metrics"]
    for a, b in zip(straight, runs["workers"]["metrics"], strict=True):
        assert a["lm_loss"] == b["lm_loss"] and a["basis_weights"] == b["basis_weights"], (a, b)
    resumed = [m for m in runs["resumed"]["metrics"] if m["iteration"] > 2]  # 1, 2: the first part's entries
    assert [m["iteration"] for m in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        assert a["lm_loss"] == b["lm_loss"] and a["basis_weights"] == b["basis_weights"]
        assert a["domain_weights"] == b["domain_weights"]  # the summaries: entropy, top domains, cluster mass
    for a, b in zip(runs["straight"]["params"][0], runs["resumed"]["params"][0]):
        np.testing.assert_array_equal(a, b)
    # The weights moved (DGA updated at 2 and 4), and 262,144-long lists were summarised, not written.
    last = straight[-1]["domain_weights"]
    assert last["summary"] and last["count"] == K and len(last["mass_by_cluster"]) == 64
    assert straight[-1]["basis_weights"] != [0.25] * 4
    assert abs(sum(last["mass_by_cluster"].values()) - 1.0) < 1e-9
    # Per-domain eval over the top-level clusters' held-out documents (64 <= --log-domains-limit: one each).
    assert len(straight[-1]["domain_eval_loss"]) == 64
    assert straight[-1]["domain_eval_loss"] == resumed[-1]["domain_eval_loss"]


def test_long_per_domain_lists_are_summarised_on_every_sink(tmp_path):
    """Past --log-domains-limit a list becomes one summary (numpy oracle) in metrics.jsonl and a few
    scalars for TensorBoard/W&B; shorter lists stay per domain."""
    from megatron_dga.training.metrics import MetricsLogger, read_metrics

    k = 12
    names = [f"c{i // 4:02d}_{i % 4:02d}" for i in range(k)]
    weights = np.random.default_rng(0).dirichlet(np.ones(k))
    weights[5] = 0.0
    weights /= weights.sum()
    epochs = np.linspace(0, 2, k)
    epochs[3] = np.nan  # an empty fine domain: 0 / 0 epochs
    line = io.StringIO()
    with MetricsLogger(
        tmp_path,
        is_writer=True,
        domain_names=names,
        list_limit=8,
        stream=line,
        domain_clusters=np.arange(k) // 4,
        cluster_names=["c00", "c01", "c02"],
        list_labels={"basis_weights": ["b0", "b1"]},
    ) as logger:
        logger.log(
            1,
            {
                "lm_loss": 2.0,
                "domain_weights": weights,
                "domain_epochs": epochs.tolist(),
                "basis_weights": [0.25, 0.75],
            },
        )
        tags = dict(logger.tags_for("domain_weights", read_metrics(tmp_path)[0]["domain_weights"]))
    record = read_metrics(tmp_path)[0]
    summary = record["domain_weights"]
    entropy = -sum(w * np.log(w) for w in weights if w > 0)
    assert summary["count"] == k and summary["nonzero"] == k - 1
    assert abs(summary["entropy"] - entropy) < 1e-12 and abs(summary["effective_domains"] - np.exp(entropy)) < 1e-9
    order = np.argsort(-weights)[:10]
    assert [n for n, _ in summary["top"]] == [names[i] for i in order]
    assert [v for _, v in summary["top"]] == weights[order].tolist()
    np.testing.assert_allclose(
        [summary["mass_by_cluster"][c] for c in ("c00", "c01", "c02")], weights.reshape(3, 4).sum(axis=1), rtol=1e-12
    )
    assert record["domain_epochs"]["non_finite"] == 1 and record["domain_epochs"]["max"] == 2.0
    assert "mass_by_cluster" not in record["domain_epochs"]  # not a distribution
    assert record["basis_weights"] == [0.25, 0.75]  # short lists stay as they are
    assert set(tags) == {
        "mixing/weight_entropy",
        "mixing/weight_effective_domains",
        "mixing/weight_top1",
        "mixing/weight_nonzero",
    }
    assert tags["mixing/weight_top1"] == weights.max()
    assert len(line.getvalue().splitlines()) == 1


def test_flags_that_a_map_replaces_are_refused(small, tmp_path):
    import json

    from megatron_dga.errors import ConfigError
    from megatron_dga.training.arguments import parse_args

    prefixes, _, group_ids = small
    good = _write_map(str(tmp_path / "map.npz"), prefixes, group_ids % 4, [2, 2])
    big = _write_map(str(tmp_path / "big.npz"), prefixes, np.arange(len(group_ids)) % 300, [300])
    base = _argv(prefixes, good, tmp_path / "run")
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps({"train": prefixes, "valid": prefixes}))
    cases = {
        "--mock-data": (["--domain-map", good, "--mock-data", *base[base.index("--tokenizer-type") :]], "--mock-data"),
        "valid shards": (
            ["--per-split-data-args-path", str(split_file), *base[1 + len(prefixes) :]],
            'giving "valid" shards',
        ),
        "token limits": (base + ["--domain-token-limit", "64", "128"], "give one value"),
        "static": (base + ["--mixing", "static"], "--mixing importance --importance-weights FILE"),
        "missing map": (_argv(prefixes, str(tmp_path / "none.npz"), tmp_path / "run"), "no such file"),
        "weights": (
            ["--data-path", "0.5", prefixes[0], "0.3", prefixes[1], "0.2", prefixes[2]] + base[1 + len(prefixes) :],
            "the map defines the domains",
        ),
        "dga over 300": (
            _argv(prefixes, big, tmp_path / "d", ["--mixing", "dga", "--specific-data-path", prefixes[0]]),
            "--dga-basis basis.npz",
        ),
    }
    for name, (argv, fragment) in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_args(argv)
        assert "--domain-map" in str(err.value) and fragment in str(err.value), (name, str(err.value))
    cfg = parse_args(base + ["--domain-token-limit", "64"])  # one limit for every fine domain is fine
    assert cfg.data.domain_map == good and cfg.data.domain_token_limit == [64]


def test_pipeline_evaluates_top_clusters_or_fine_domains(small, tmp_path, caplog):
    """Hierarchical map: one eval source per top-level cluster, packed from its held-out documents only;
    flat map: per fine domain up to --log-domains-limit, none beyond (one INFO line)."""
    import logging
    from types import SimpleNamespace

    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.data import DataPipeline

    prefixes, _, group_ids = small
    ctx = SimpleNamespace(dp_rank=0, dp_size=1)
    fine = group_ids % 4  # fine domain of a document of group g (tokens in band g): g % 4; top cluster (g % 4) // 2
    hier = _write_map(str(tmp_path / "hier.npz"), prefixes, fine, [2, 2])
    data = DataPipeline(parse_args(_argv(prefixes, hier, tmp_path / "r", ["--split", "80,20"])), ctx)
    assert data.domain_names == ["c00_00", "c00_01", "c01_00", "c01_01"] and data.eval_names == ["c00", "c01"]
    assert data.eval_ids == [4, 5]
    for i in range(2):
        for mb in data.domain_eval_micro_batches(i, 2):
            tokens = mb["tokens"].numpy()
            bands = tokens[tokens != EOD] // BAND
            assert set(((bands % 4) // 2).tolist()) == {i}
    np.testing.assert_array_equal(data.domain_groups, [0, 0, 1, 1])
    flat = _write_map(str(tmp_path / "flat.npz"), prefixes, fine, [4])
    data = DataPipeline(parse_args(_argv(prefixes, flat, tmp_path / "r", ["--split", "70,30"])), ctx)
    assert data.eval_names == ["c00", "c01", "c02", "c03"] and data.domain_groups is None
    # The default --split 98,2 holds out too few documents of some: those are left out, not errors.
    data = DataPipeline(parse_args(_argv(prefixes, flat, tmp_path / "r")), ctx)
    assert data.eval_names == ["c01", "c03"] and data.eval_ids == [4, 5]
    # One token limit for every fine domain: 64 tokens = 2 samples of 32.
    data = DataPipeline(parse_args(_argv(prefixes, flat, tmp_path / "r", ["--domain-token-limit", "64"])), ctx)
    np.testing.assert_array_equal(data.domain_info.num_samples, np.minimum(data.sampler.domain_sizes, 2))
    # DGA without a basis would probe an empty fine domain at its first update: refused at start-up.
    from megatron_dga.errors import ConfigError

    gaps = _write_map(str(tmp_path / "gaps.npz"), prefixes, group_ids, [8])  # 4: 6 tokens; 7: no document
    with pytest.raises(ConfigError, match=r"2 of the 8 fine domains .*\(c04, c07\)"):
        DataPipeline(
            parse_args(_argv(prefixes, gaps, tmp_path / "r", ["--mixing", "dga", "--specific-data-path", prefixes[0]])),
            ctx,
        )
    with pytest.raises(
        ConfigError, match=r"--mixing pike probes every domain .* 2 of the 8 fine domains .*--mixing odm"
    ):
        DataPipeline(parse_args(_argv(prefixes, gaps, tmp_path / "r", ["--mixing", "pike"])), ctx)
    DataPipeline(parse_args(_argv(prefixes, gaps, tmp_path / "r", ["--mixing", "odm"])), ctx)  # no probes: fine
    many = _write_map(str(tmp_path / "many.npz"), prefixes, np.arange(len(group_ids)) % 100, [100])
    with caplog.at_level(logging.INFO, logger="megatron_dga.training.data"):
        data = DataPipeline(parse_args(_argv(prefixes, many, tmp_path / "r")), ctx)
    assert data.eval_names is None and data.eval_ids is None
    assert sum("per-domain eval skipped" in r.getMessage() for r in caplog.records) == 1
