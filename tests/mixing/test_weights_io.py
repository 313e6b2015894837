"""Weights file (JSON) and basis file (.npz): round trips and rejection of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_dga.errors import DataError
from megatron_dga.mixing.weights_io import (
    WEIGHTS_FORMAT,
    load_basis,
    load_weights,
    read_weights,
    save_basis,
    save_weights,
)


def write_raw(path, **doc):
    base = {"format": WEIGHTS_FORMAT, "domains": ["a", "b", "c"], "weights": [0.2, 0.3, 0.5], "meta": {}}
    base.update(doc)
    path.write_text(json.dumps(base))
    return path


# --------------------------------------------------------------------------- weights
def test_weights_roundtrip_and_reorder_by_name(tmp_path):
    p = tmp_path / "w.json"
    w = np.array([0.1, 0.2, 0.3, 0.4])
    save_weights(p, ["d0", "d1", "d2", "d3"], w, {"method": "importance", "counts": [1, 2, 3, 4]})
    doc = json.loads(p.read_text())
    assert doc["format"] == WEIGHTS_FORMAT and doc["domains"] == ["d0", "d1", "d2", "d3"]
    np.testing.assert_array_equal(load_weights(p), w)  # exact: JSON keeps float repr
    wf = read_weights(p)
    assert wf.meta == {"method": "importance", "counts": [1, 2, 3, 4]}
    got = load_weights(p, expected_domains=["d3", "d0", "d2", "d1"])
    np.testing.assert_array_equal(got, [0.4, 0.1, 0.3, 0.2])
    assert [f.name for f in tmp_path.iterdir()] == ["w.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"weights": [0.5, -0.1, 0.6]}, r"negative entries at positions \[1\]"),
        ({"weights": [0.2, 0.3, 0.4]}, r"sums to 0.9.*not 1"),
        ({"format": "megatron-dga/weights-v0"}, r"format tag is 'megatron-dga/weights-v0'"),
        ({"weights": [0.5, 0.5]}, r"2 weights for 3 domains"),
        ({"domains": ["a", "a", "c"]}, r"duplicate domains \['a'\]"),
        ({"domains": ["a", "", "c"]}, r"domains\[1\] is ''"),
        ({"weights": [0.5, "0.2", 0.3]}, r"weight '0.2' is not a number"),
        ({"weights": {"a": 1}}, r"'weights' is dict, expected a list"),
        ({"weights": [0.5, 10**400, 0.5]}, r"weight 1000+ is too large for a float"),
        ({"weights": [0.5, float("inf"), 0.5]}, r"non-finite entries at positions \[1\] \(e.g. inf\)"),
    ],
)
def test_load_weights_rejects_bad_files(tmp_path, doc, message):
    p = write_raw(tmp_path / "bad.json", **doc)
    with pytest.raises(DataError, match=message) as e:
        load_weights(p)
    assert str(p) in str(e.value)


def test_load_weights_rejects_nan_unparsable_and_missing(tmp_path):
    p = tmp_path / "nan.json"
    p.write_text(f'{{"format": "{WEIGHTS_FORMAT}", "domains": ["a", "b"], "weights": [NaN, 1.0]}}')
    with pytest.raises(DataError, match="non-finite"):
        load_weights(p)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_weights(tmp_path / "junk.json")
    with pytest.raises(DataError, match="not found"):
        load_weights(tmp_path / "missing.json")


def test_load_weights_name_mismatch_lists_missing_and_extra(tmp_path):
    p = write_raw(tmp_path / "w.json")
    with pytest.raises(DataError) as e:
        load_weights(p, expected_domains=["a", "b", "x", "y"])
    msg = str(e.value)
    assert "missing from file: 2 ['x', 'y']" in msg and "in file but not in training: 1 ['c']" in msg
    assert "BY NAME" in msg


def test_save_weights_validates_and_never_clobbers(tmp_path):
    p = tmp_path / "w.json"
    save_weights(p, ["a", "b"], [0.5, 0.5])
    before = p.read_text()
    with pytest.raises(DataError, match="negative"):
        save_weights(p, ["a", "b"], [1.5, -0.5])
    with pytest.raises(DataError, match="sums to"):
        save_weights(p, ["a", "b"], [0.5, 0.6])
    with pytest.raises(DataError, match="one weight per domain"):
        save_weights(p, ["a", "b"], [1.0])
    with pytest.raises(DataError, match="not JSON-serialisable"):
        save_weights(p, ["a", "b"], [0.5, 0.5], meta={"x": object()})
    assert p.read_text() == before and [f.name for f in tmp_path.iterdir()] == ["w.json"]
    with pytest.raises(DataError, match="does not exist"):
        save_weights(tmp_path / "nodir" / "w.json", ["a"], [1.0])


# --------------------------------------------------------------------------- basis
def test_basis_roundtrip_and_column_reorder(tmp_path):
    p = tmp_path / "basis.npz"
    m = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    save_basis(p, m, ["law", "mmlu"], ["c00", "c01", "c02"], meta={"smoothing": {"eps": 0.0}})
    with np.load(p, allow_pickle=False) as z:  # the documented keys, readable without pickle
        assert z["matrix"].dtype == np.float64 and z["matrix"].shape == (2, 3)
        assert z["basis_names"].tolist() == ["law", "mmlu"] and z["domain_names"].tolist() == ["c00", "c01", "c02"]
    b = load_basis(p)
    np.testing.assert_array_equal(b.matrix, m)
    assert b.basis_names == ["law", "mmlu"] and b.meta == {"smoothing": {"eps": 0.0}}
    r = load_basis(p, expected_domains=["c02", "c00", "c01"])
    np.testing.assert_array_equal(r.matrix, m[:, [2, 0, 1]])
    assert r.domain_names == ["c02", "c00", "c01"]
    with pytest.raises(DataError, match=r"missing from file: 1 \['c09'\].*not in training: 1 \['c02'\]"):
        load_basis(p, expected_domains=["c00", "c01", "c09"])


def test_basis_rejects_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"matrix row 1 sums to 0.9"):
        save_basis(tmp_path / "x.npz", np.array([[1.0, 0.0], [0.4, 0.5]]), ["a", "b"], ["d0", "d1"])
    with pytest.raises(DataError, match=r"shape \(2, 2\), expected \(N=2 basis_names, K=3"):
        save_basis(tmp_path / "x.npz", np.eye(2), ["a", "b"], ["d0", "d1", "d2"])
    assert not (tmp_path / "x.npz").exists()

    def raw(name, **arrays):
        path = tmp_path / name
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    names = dict(basis_names=np.array(["a", "b"]), domain_names=np.array(["d0", "d1"]))
    with pytest.raises(DataError, match="negative"):
        load_basis(raw("neg.npz", matrix=np.array([[1.5, -0.5], [0.5, 0.5]]), **names))
    with pytest.raises(DataError, match=r"lacks \['domain_names'\]"):
        load_basis(raw("nokey.npz", matrix=np.eye(2), basis_names=names["basis_names"]))
    with pytest.raises(DataError, match="cannot read as a basis"):
        load_basis(
            raw(
                "obj.npz",
                matrix=np.eye(2),
                basis_names=np.array(["a", "b"], dtype=object),
                domain_names=names["domain_names"],
            )
        )
    with pytest.raises(DataError, match=r"duplicate basis_names \['a'\]"):
        load_basis(
            raw("dup.npz", matrix=np.eye(2), basis_names=np.array(["a", "a"]), domain_names=names["domain_names"])
        )
    with pytest.raises(DataError, match=r"matrix row 1 has non-finite entries at positions \[0\]"):
        load_basis(raw("nan.npz", matrix=np.array([[1.0, 0.0], [np.nan, 1.0]]), **names))
    with pytest.raises(DataError, match=r"matrix has shape \(2, 2, 1\), expected \(N=2"):
        load_basis(raw("3d.npz", matrix=np.eye(2)[:, :, None], **names))
    with pytest.raises(DataError, match=r"'meta' entry holds a JSON list"):
        load_basis(raw("meta.npz", matrix=np.eye(2), meta=np.array("[1]"), **names))
    good = raw("good.npz", matrix=np.eye(2), **names)
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:200])  # a copy cut short mid-write
    with pytest.raises(DataError, match=r"cut\.npz: cannot read as a basis \.npz .*damaged: rebuild it"):
        load_basis(tmp_path / "cut.npz")
    load_basis(good)  # the intact file still loads
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read as a basis"):
        load_basis(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="not found"):
        load_basis(tmp_path / "missing.npz")
