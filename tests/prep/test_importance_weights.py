"""tools/importance_weights.py: CRISP-style histograms of planted mixtures, smoothing, basis rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_dga.mixing.weights_io import load_basis, load_weights, read_weights
from megatron_dga.cli import cluster_domains, importance_weights
from tests.helpers.corpus import flat_vocab, planted_corpus, planted_doc, write_jsonl

NUM_DOMAINS = 4
# A wrong assignment of one document out of 50 moves the histogram by 0.02: tolerate at most that.
TOL = 0.02


def mixture_docs(counts: list[int], seed: int) -> list[str]:
    """Fresh documents: counts[d] from planted domain d (same generator as the generic corpus)."""
    rng = np.random.default_rng(seed)
    return [planted_doc(rng, [flat_vocab(d)]) for d, c in enumerate(counts) for _ in range(c)]


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """A 4-domain clustering of a planted corpus + the planted-domain -> cluster-name map."""
    root = tmp_path_factory.mktemp("generic")
    texts, planted = planted_corpus(NUM_DOMAINS, 30, seed=11)
    write_jsonl(root / "generic.jsonl", texts)
    out = root / "clusters"
    rc = cluster_domains.main(
        [
            "--input",
            str(root / "generic.jsonl"),
            "--output",
            str(out),
            "--num-clusters",
            str(NUM_DOMAINS),
            "--embedding-dim",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    # Known assignment: which cluster holds each planted domain (a bijection on separable data).
    name_of = {}
    for name in manifest["domains"]:
        ids = {json.loads(line)["id"] for line in (out / f"{name}.jsonl").read_text().splitlines()}
        doms = {int(planted[int(i.split("-")[1])]) for i in ids}
        assert len(doms) == 1, f"cluster {name} mixes planted domains {doms}"
        name_of[doms.pop()] = name
    assert len(name_of) == NUM_DOMAINS
    return out, manifest["domains"], name_of


def expected_hist(counts: list[int], names: list[str], name_of: dict[int, str]) -> np.ndarray:
    h = np.zeros(len(names))
    for d, c in enumerate(counts):
        h[names.index(name_of[d])] += c
    return h


def test_importance_histogram_matches_planted_mixture(clusters, tmp_path):
    out, names, name_of = clusters
    counts = [30, 15, 5, 0]
    write_jsonl(tmp_path / "spec.jsonl", mixture_docs(counts, seed=21))
    rc = importance_weights.main(
        [
            "--clusters",
            str(out),
            "--specific",
            str(tmp_path / "spec.jsonl"),
            "--output",
            str(tmp_path / "w.json"),
            "--no-progress",
        ]
    )
    assert rc == 0
    wf = read_weights(tmp_path / "w.json")
    assert wf.domains == names  # manifest order
    expect = expected_hist(counts, names, name_of)
    np.testing.assert_allclose(wf.weights, expect / expect.sum(), atol=TOL)
    assert wf.meta["num_docs"] == 50 and sum(wf.meta["counts"]) == 50
    assert wf.meta["smoothing"]["eps"] == 0.0
    # The trainer matches by name: reversed order gives the reversed vector.
    np.testing.assert_array_equal(load_weights(tmp_path / "w.json", names[::-1]), wf.weights[::-1])


@pytest.mark.parametrize("mode, eps", [("uniform", 0.1), ("laplace", 2.0)])
def test_smoothing_applied_to_counts(clusters, tmp_path, mode, eps):
    out, names, name_of = clusters
    counts = [0, 8, 2, 0]
    write_jsonl(tmp_path / "spec.jsonl", mixture_docs(counts, seed=22))
    rc = importance_weights.main(
        [
            "--clusters",
            str(out),
            "--specific",
            str(tmp_path / "spec.jsonl"),
            "--output",
            str(tmp_path / "w.json"),
            "--smoothing",
            str(eps),
            "--smoothing-mode",
            mode,
            "--no-progress",
        ]
    )
    assert rc == 0
    wf = read_weights(tmp_path / "w.json")
    c = np.array(wf.meta["counts"], dtype=np.float64)
    np.testing.assert_array_equal(c, expected_hist(counts, names, name_of))
    k, n = len(c), c.sum()
    by_hand = [((1 - eps) * cj / n + eps / k) if mode == "uniform" else ((cj + eps) / (n + k * eps)) for cj in c]
    np.testing.assert_allclose(wf.weights, by_hand, rtol=1e-12)
    assert wf.meta["smoothing"]["mode"] == mode


def test_basis_rows_are_per_set_histograms(clusters, tmp_path):
    out, names, name_of = clusters
    tool = importance_weights
    sets = {"setA": [10, 10, 0, 0], "law": [0, 0, 5, 15]}
    write_jsonl(tmp_path / "setA.jsonl", mixture_docs(sets["setA"], seed=31))
    write_jsonl(tmp_path / "other.jsonl", mixture_docs(sets["law"], seed=32))
    rc = tool.main(
        [
            "--clusters",
            str(out),
            "--basis-sets",
            str(tmp_path / "setA.jsonl"),
            f"law={tmp_path / 'other.jsonl'}",
            "--basis-output",
            str(tmp_path / "basis.npz"),
            "--basis-smoothing",
            "0.05",
            "--no-progress",
        ]
    )
    assert rc == 0
    basis = load_basis(tmp_path / "basis.npz", expected_domains=names)
    assert basis.basis_names == ["setA", "law"] and basis.matrix.shape == (2, NUM_DOMAINS)
    for row, (name, counts) in zip(basis.matrix, sets.items()):
        exp = expected_hist(counts, names, name_of)
        np.testing.assert_allclose(row, 0.95 * exp / exp.sum() + 0.05 / NUM_DOMAINS, atol=TOL)
        # Same numbers as the weights file of that set alone.
        src = tmp_path / ("setA.jsonl" if name == "setA" else "other.jsonl")
        assert (
            tool.main(
                [
                    "--clusters",
                    str(out),
                    "--specific",
                    str(src),
                    "--output",
                    str(tmp_path / f"{name}.json"),
                    "--smoothing",
                    "0.05",
                    "--no-progress",
                ]
            )
            == 0
        )
        np.testing.assert_allclose(row, load_weights(tmp_path / f"{name}.json", names), rtol=1e-12)


def test_labelled_domains_mode(tmp_path):
    domain_dir = tmp_path / "labelled"
    domain_dir.mkdir()
    rng = np.random.default_rng(41)
    stems = ["web", "code", "law", "arxiv"]  # planted domain d is stored as stems[d]
    for d, stem in enumerate(stems):
        write_jsonl(domain_dir / f"{stem}.jsonl", [planted_doc(rng, [flat_vocab(d)]) for _ in range(20)])
    counts = [4, 0, 10, 6]
    write_jsonl(tmp_path / "spec.jsonl", mixture_docs(counts, seed=42))
    rc = importance_weights.main(
        [
            "--labelled-domains",
            str(domain_dir),
            "--specific",
            str(tmp_path / "spec.jsonl"),
            "--output",
            str(tmp_path / "w.json"),
            "--embedding-dim",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 0
    wf = read_weights(tmp_path / "w.json")
    assert wf.domains == sorted(stems)
    expect = np.array([counts[stems.index(name)] for name in wf.domains], dtype=np.float64)
    np.testing.assert_allclose(wf.weights, expect / expect.sum(), atol=TOL)


def test_importance_tool_errors(clusters, tmp_path, capsys):
    out, _, _ = clusters
    tool = importance_weights
    (tmp_path / "blank.jsonl").write_text("\n")
    assert (
        tool.main(
            [
                "--clusters",
                str(out),
                "--specific",
                str(tmp_path / "blank.jsonl"),
                "--output",
                str(tmp_path / "w.json"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--specific" in capsys.readouterr().err and not (tmp_path / "w.json").exists()
    assert (
        tool.main(
            [
                "--clusters",
                str(tmp_path),
                "--specific",
                str(tmp_path / "blank.jsonl"),
                "--output",
                str(tmp_path / "w.json"),
            ]
        )
        == 2
    )
    assert "no manifest.json" in capsys.readouterr().err
    assert (
        tool.main(
            [
                "--clusters",
                str(out),
                "--specific",
                str(tmp_path / "blank.jsonl"),
                "--output",
                str(tmp_path / "w.json"),
                "--smoothing",
                "1.5",
            ]
        )
        == 2
    )
    assert "must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--clusters", str(out), "--basis-sets", str(tmp_path / "blank.jsonl")])  # no --basis-output
