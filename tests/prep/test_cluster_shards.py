"""Fine-domain maps over Megatron shards: tools/cluster_domains.py --input-shards --output-map, and
tools/importance_weights.py --domain-map, on shards with planted topics.

Planted structure: 4 topics x 2 sub-topics x 2 sub-sub-topics = 16 leaf groups, each a disjoint
token-id range (topic pool, then a pool per sub-topic, then per sub-sub-topic), plus filler ids
shared by all and the eod every document ends with.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from megatron_dga.data.domain_map import DomainMap, check_map_matches_shards, read_domain_map, write_domain_map
from megatron_dga.data.mock import write_shard
from megatron_dga.errors import DataError
from megatron_dga.mixing.weights_io import load_basis, read_weights, save_basis
from megatron_dga.prep.clustering import CentroidTree, CentroidTreeConfig, build_centroid_tree
from megatron_dga.prep.embeddings import TokenDocuments, TokenTfidfConfig, TokenTfidfEmbedder, load_embedder
from megatron_dga.prep.shard_corpus import ShardCorpus
from megatron_dga.cli import cluster_domains, importance_weights
from tests.helpers.corpus import write_jsonl

VOCAB = 1000
EOD = 0
LEAVES = 16  # 4 x 2 x 2


def leaf_docs(rng: np.random.Generator, leaves: np.ndarray) -> np.ndarray:
    """(n, 66) token ids: documents of the given planted leaves (leaf = 4 * topic + 2 * sub + subsub)."""
    t, s, u = leaves // 4, (leaves // 2) % 2, leaves % 2
    base = (100 + 200 * t)[:, None]
    topic = base + rng.integers(0, 50, (leaves.size, 35))
    sub = base + 50 + 75 * s[:, None] + rng.integers(0, 25, (leaves.size, 12))
    subsub = base + 75 + 75 * s[:, None] + 25 * u[:, None] + rng.integers(0, 25, (leaves.size, 8))
    filler = rng.integers(1, 100, (leaves.size, 10))
    docs = rng.permuted(np.concatenate([topic, sub, subsub, filler], axis=1), axis=1)
    return np.concatenate([docs, np.full((leaves.size, 1), EOD)], axis=1)


def write_planted(directory, name: str, leaves: np.ndarray, seed: int, **kw) -> str:
    docs = leaf_docs(np.random.default_rng(seed), leaves)
    return write_shard(os.path.join(directory, f"{name}_text_document"), list(docs), VOCAB, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three shards of 800 documents with planted leaves; (prefixes, leaves of all documents in order)."""
    root = tmp_path_factory.mktemp("shards")
    leaves = np.random.default_rng(0).integers(0, LEAVES, 2400)
    prefixes = [write_planted(root, f"part{i}", leaves[800 * i : 800 * (i + 1)], seed=i) for i in range(3)]
    return prefixes, leaves


def cluster(prefixes, out, levels, *extra) -> int:
    return cluster_domains.main(
        [
            "--input-shards",
            *prefixes,
            "--output-map",
            str(out),
            "--num-clusters",
            *map(str, levels),
            "--embedding-dim",
            "16",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def hier_map(corpus, tmp_path_factory):
    prefixes, _ = corpus
    out = tmp_path_factory.mktemp("map") / "fine.npz"
    assert cluster(prefixes, out, [4, 2, 2]) == 0
    return out


# --------------------------------------------------------------------------- building blocks
def test_token_tfidf_matches_dense_oracle_and_roundtrips(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 40, rng.integers(0, 30)) for _ in range(60)]  # one or more empty documents
    docs[3] = np.zeros(0, np.int64)
    packed = TokenDocuments.from_arrays(docs)
    emb = TokenTfidfEmbedder(TokenTfidfConfig(dim=6, min_df=2, max_df=0.9, seed=0)).fit(packed)
    # Oracle: dense float64 counts, df filters, sublinear tf, smoothed idf, L2 rows, projection, L2 rows.
    counts = np.zeros((60, 40))
    for i, d in enumerate(docs):
        np.add.at(counts[i], d, 1.0)
    df = (counts > 0).sum(0)
    keep = np.flatnonzero((df >= 2) & (df <= 0.9 * 60))
    np.testing.assert_array_equal(emb.token_ids, keep)
    tf = np.where(counts[:, keep] > 0, 1.0 + np.log(np.maximum(counts[:, keep], 1.0)), 0.0)
    x = tf * (np.log(61.0 / (1.0 + df[keep])) + 1.0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    proj = x @ emb.components.T.astype(np.float64)
    norms = np.linalg.norm(proj, axis=1, keepdims=True)
    expect = np.divide(proj, norms, out=np.zeros_like(proj), where=norms > 0)
    got = emb.embed(packed, show_progress=False)
    np.testing.assert_allclose(got, expect, atol=1e-5)
    assert not got[3].any()  # an empty document embeds to zero
    emb.save(str(tmp_path))
    again = load_embedder(str(tmp_path))
    assert isinstance(again, TokenTfidfEmbedder)
    np.testing.assert_array_equal(again.embed(packed, show_progress=False), got)
    # Ids beyond the fitted ones (never seen) contribute nothing.
    more = TokenDocuments.from_arrays([np.append(d, [500, 999]) for d in docs])
    np.testing.assert_allclose(emb.embed(more, show_progress=False), got, atol=1e-6)
    # A damaged payload: one error naming the file and the fix, for both TF-IDF embedders.
    from megatron_dga.prep.embeddings import TfidfSvdConfig, TfidfSvdEmbedder

    TfidfSvdEmbedder(TfidfSvdConfig(dim=2, min_df=1, seed=0)).fit(
        ["alpha beta gamma", "beta gamma delta", "gamma delta eps"]
    ).save(str(tmp_path / "w"))
    for directory, payload in ((tmp_path, "embedder_token_tfidf.npz"), (tmp_path / "w", "embedder_tfidf.npz")):
        (directory / payload).write_bytes((directory / payload).read_bytes()[:100])
        with pytest.raises(
            DataError, match=rf"cannot load .*TF-IDF embedder payload '.*{payload}'.*re-run tools/cluster_domains"
        ):
            load_embedder(str(directory))


def test_shard_corpus_reads_documents_like_megatron(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, _ = corpus
    c = ShardCorpus(prefixes)
    ref = [IndexedDataset(p) for p in prefixes]

    def oracle(g):
        s = int(np.searchsorted(c.document_offsets, g, side="right")) - 1
        return ref[s].get(int(g - c.document_offsets[s]))

    ids = np.array([2399, 0, 801, 799, 800, 1234, 0])
    got = c.gather(ids)
    for i, g in enumerate(ids):
        np.testing.assert_array_equal(got.tokens[got.offsets[i] : got.offsets[i + 1]], oracle(g))
    seen = 0
    for start, chunk in c.iter_chunks(max_docs=300, max_tokens=10_000):
        assert start == seen and len(chunk) <= 300 and chunk.tokens.size <= 10_000
        np.testing.assert_array_equal(chunk.tokens[chunk.offsets[-2] :], oracle(start + len(chunk) - 1))
        seen += len(chunk)
    assert seen == c.num_documents == 2400


def test_centroid_tree_assign_matches_brute_force_and_sklearn_backend():
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((6, 8))
    labels = rng.integers(0, 6, 900)
    x = (centers[labels] + 0.05 * rng.standard_normal((900, 8))).astype(np.float32)
    x[:40] = x[40]  # duplicates: some nodes have fewer distinct points than children -> empty children
    tree, ids = build_centroid_tree(x, CentroidTreeConfig((6, 3), seed=3, backend="sklearn"), show_progress=False)
    assert adjusted_rand_score(labels[40:], ids[40:] // 3) > 0.95
    np.testing.assert_array_equal(tree.assign(x), ids)
    for xi, got in zip(x[::37].astype(np.float64), ids[::37]):
        node = 0
        for level, k in enumerate(tree.levels):
            children = node * k + np.arange(k) if level else np.arange(k)
            d = ((tree.centroids[level][children] - xi) ** 2).sum(1)
            d[tree.counts[level][children] == 0] = np.inf
            node = children[np.argmin(d)]
        assert node == got


def test_sparse_basis_roundtrip(tmp_path):
    m = sp.csr_matrix(np.array([[0.0, 0.25, 0.0, 0.75], [1.0, 0.0, 0.0, 0.0]]))
    names = ["d0", "d1", "d2", "d3"]
    save_basis(tmp_path / "b.npz", m, ["x", "y"], names)
    b = load_basis(tmp_path / "b.npz", expected_domains=names[::-1])
    assert sp.issparse(b.matrix) and b.domain_names == names[::-1]
    np.testing.assert_array_equal(b.matrix.toarray(), m.toarray()[:, ::-1])
    with pytest.raises(DataError, match="row 1 sums to 0.5"):
        save_basis(tmp_path / "bad.npz", sp.csr_matrix(np.array([[1.0, 0, 0, 0], [0.5, 0, 0, 0]])), ["x", "y"], names)


# --------------------------------------------------------------------------- maps
def test_hierarchical_map_fits_shards_and_recovers_planted_topics(corpus, hier_map):
    prefixes, leaves = corpus
    dmap = read_domain_map(str(hier_map))
    assert dmap.levels == [4, 2, 2] and dmap.num_documents == 2400
    assert [s.name for s in dmap.shards] == ["part0_text_document", "part1_text_document", "part2_text_document"]
    assert check_map_matches_shards(dmap, prefixes[::-1], str(hier_map)) == [2, 1, 0]
    assert adjusted_rand_score(leaves // 4, dmap.group_ids(0)) > 0.98
    assert adjusted_rand_score(leaves, dmap.domain_ids) > 0.95
    assert dmap.metadata["embedding"]["kind"] == "token-tfidf" and dmap.metadata["num_clusters"] == [4, 2, 2]
    # The clusters directory re-assigns the corpus's own documents to their map domains.
    cdir = hier_map.parent / dmap.clusters_dir
    tree, emb = CentroidTree.load(str(cdir)), load_embedder(str(cdir))
    docs = ShardCorpus(prefixes).gather(np.arange(2400))
    np.testing.assert_array_equal(tree.assign(emb.embed(docs, show_progress=False)), dmap.domain_ids)


def test_same_seed_same_map_flat_map_and_text_embedding(corpus, hier_map, tmp_path):
    prefixes, leaves = corpus
    assert cluster(prefixes, tmp_path / "again.npz", [4, 2, 2]) == 0
    np.testing.assert_array_equal(
        read_domain_map(str(tmp_path / "again.npz")).domain_ids, read_domain_map(str(hier_map)).domain_ids
    )
    assert cluster(prefixes, tmp_path / "flat.npz", [4], "--kmeans-backend", "sklearn") == 0
    flat = read_domain_map(str(tmp_path / "flat.npz"))
    assert flat.levels == [4] and flat.domain_name(3) == "c03"
    assert adjusted_rand_score(leaves // 4, flat.domain_ids) > 0.98
    # A text embedding sees the documents detokenised (NullTokenizer text: the ids joined by spaces).
    assert (
        cluster(
            prefixes,
            tmp_path / "words.npz",
            [4],
            "--embedding",
            "tfidf",
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            str(VOCAB - 1),
        )
        == 0
    )
    words = read_domain_map(str(tmp_path / "words.npz"))
    assert words.metadata["embedding"]["kind"] == "tfidf"
    assert adjusted_rand_score(leaves // 4, words.domain_ids) > 0.98


def test_importance_and_basis_over_a_map(corpus, hier_map, tmp_path):
    _, leaves = corpus
    dmap = read_domain_map(str(hier_map))
    top = dmap.group_ids(0)
    cluster_of = [int(np.bincount(top[leaves // 4 == t]).argmax()) for t in range(4)]  # topic -> top cluster
    fine_top = np.arange(16) // 4  # top-level group of each fine domain
    spec = write_planted(tmp_path, "spec", np.full(60, 9), seed=7)  # topic 2, sub 0, subsub 1
    aux1 = write_planted(tmp_path, "aux1", np.arange(40) % 4, seed=8)  # topic 0
    # Topic 3 as jsonl text: NullTokenizer text is the ids joined by spaces.
    write_jsonl(
        tmp_path / "aux3.jsonl",
        [" ".join(map(str, d[:-1])) for d in leaf_docs(np.random.default_rng(9), 12 + np.arange(30) % 4)],
    )
    tool = importance_weights
    rc = tool.main(
        [
            "--domain-map",
            str(hier_map),
            "--specific-shards",
            spec,
            "--output",
            str(tmp_path / "w.json"),
            "--basis-shards",
            f"zero={aux1}",
            "--basis-sets",
            str(tmp_path / "aux3.jsonl"),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            str(VOCAB - 1),
            "--basis-output",
            str(tmp_path / "b.npz"),
            "--basis-format",
            "sparse",
            "--no-progress",
        ]
    )
    assert rc == 0
    w = read_weights(tmp_path / "w.json")
    assert w.domains == [dmap.domain_name(j) for j in range(16)]
    assert w.weights[fine_top == cluster_of[2]].sum() == pytest.approx(1.0)
    assert w.weights.max() > 0.9  # one planted leaf -> (mostly) one fine domain
    b = load_basis(tmp_path / "b.npz", expected_domains=w.domains)
    assert b.basis_names == ["aux3", "zero"] and b.matrix.shape == (2, 16) and sp.issparse(b.matrix)
    rows = b.matrix.toarray()
    np.testing.assert_allclose(rows.sum(1), 1.0, atol=1e-12)
    assert rows[0, fine_top == cluster_of[3]].sum() == pytest.approx(1.0)
    assert rows[1, fine_top == cluster_of[0]].sum() == pytest.approx(1.0)


def test_empty_fine_domains_keep_zero_weight_under_smoothing(tmp_path):
    # 12 documents of 4 leaves (3 identical copies each): 2 x 4 leaves a node of 6 documents
    # (2 distinct) with at most 2 of its 4 children filled.
    docs = leaf_docs(np.random.default_rng(3), np.array([0, 5, 10, 15]))
    prefix = write_shard(str(tmp_path / "tiny_text_document"), list(np.repeat(docs, 3, axis=0)), VOCAB)
    assert cluster([prefix], tmp_path / "tiny.npz", [2, 4], "--tfidf-min-df", "1") == 0
    dmap = read_domain_map(str(tmp_path / "tiny.npz"))
    empty = dmap.domain_counts() == 0
    assert empty.sum() >= 4 and dmap.metadata["empty_domains"] == int(empty.sum())
    assert (
        importance_weights.main(
            [
                "--domain-map",
                str(tmp_path / "tiny.npz"),
                "--specific-shards",
                prefix,
                "--output",
                str(tmp_path / "w.json"),
                "--smoothing",
                "0.2",
                "--no-progress",
            ]
        )
        == 0
    )
    w = read_weights(tmp_path / "w.json").weights
    assert not w[empty].any() and (w[~empty] >= 0.2 / (~empty).sum() - 1e-12).all()


# --------------------------------------------------------------------------- errors
def test_cluster_shards_errors(corpus, tmp_path, capsys):
    prefixes, _ = corpus

    def fails(args, *needles):
        assert cluster(*args) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, err

    out = tmp_path / "m.npz"
    fails(([str(tmp_path / "nope_text_document")], out, [2]), "nope_text_document.idx is missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    broken = write_planted(bad, "broken", np.zeros(10, np.int64), seed=1)
    with open(broken + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(broken + ".idx") - 8)
    fails(([broken], out, [2]), "broken_text_document.idx is truncated")
    other = write_planted(bad, "other", np.zeros(10, np.int64), seed=2, tokenizer_type="GPT2BPETokenizer")
    fails(([prefixes[0], other], out, [2]), "different tokenizers", "tokenizer_type")
    fails((prefixes, out, [65536, 65536]), "4294967296 fine domains", "int32")
    small = write_planted(bad, "small", np.zeros(5, np.int64), seed=3)
    fails(([small], out, [8, 2]), "5 documents cannot fill the 8 clusters")
    (tmp_path / "afile").write_text("x")
    fails((prefixes, tmp_path / "afile" / "m.npz", [2]), "--output-map", "is a file")
    fails((prefixes, out, [2], "--embedding", "sentence-transformers"), "--tokenizer-type")
    assert not out.exists()


def test_importance_map_errors(corpus, hier_map, tmp_path, capsys):
    prefixes, _ = corpus
    tool = importance_weights
    dmap = read_domain_map(str(hier_map))
    labelled = DomainMap(
        domain_ids=dmap.domain_ids,
        shards=dmap.shards,
        levels=[16],
        names=[f"d{j}" for j in range(16)],
        clusters_dir=None,
    )
    write_domain_map(str(tmp_path / "labelled.npz"), labelled)
    assert (
        tool.main(
            [
                "--domain-map",
                str(tmp_path / "labelled.npz"),
                "--specific-shards",
                prefixes[0],
                "--output",
                str(tmp_path / "w.json"),
            ]
        )
        == 2
    )
    assert "labelled map" in capsys.readouterr().err
    write_jsonl(tmp_path / "s.jsonl", ["1 2 3"])
    assert (
        tool.main(
            [
                "--domain-map",
                str(hier_map),
                "--specific",
                str(tmp_path / "s.jsonl"),
                "--output",
                str(tmp_path / "w.json"),
            ]
        )
        == 2
    )
    assert "--tokenizer-type" in capsys.readouterr().err
    assert (
        tool.main(
            [
                "--domain-map",
                str(hier_map),
                "--specific",
                str(tmp_path / "s.jsonl"),
                "--output",
                str(tmp_path / "w.json"),
                "--tokenizer-type",
                "NullTokenizer",
                "--vocab-size",
                "50",
            ]
        )
        == 2
    )
    assert "vocab_size: 1000 vs 51" in capsys.readouterr().err
    assert not (tmp_path / "w.json").exists()
