"""The fine-domain map file (megatron_dga.data.domain_map): round trip, derived names and groups,
and every way a map can fail to fit its file or its shards, each a DataError naming the file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_dga.data.domain_map import (
    MAP_FORMAT,
    DomainMap,
    check_map_matches_shards,
    read_domain_map,
    shard_identity,
    write_domain_map,
)
from megatron_dga.errors import DataError
from tests.helpers.synthetic import write_shard


def _docs(n, seed, length=5):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(0, 100, size=length), 127) for _ in range(n)]


@pytest.fixture
def shards(tmp_path):
    """Two shards of 7 and 5 documents."""
    return [
        write_shard(str(tmp_path / "part0_text_document"), _docs(7, 0)),
        write_shard(str(tmp_path / "part1_text_document"), _docs(5, 1)),
    ]


def _map(prefixes, levels=(2, 3), seed=0, names=None):
    ids = [shard_identity(p) for p in prefixes]
    total = sum(s.num_documents for s in ids)
    k = int(np.prod(levels))
    domain_ids = np.random.default_rng(seed).integers(0, k, size=total).astype(np.int32)
    return DomainMap(
        domain_ids=domain_ids,
        shards=ids,
        levels=list(levels),
        names=names,
        clusters_dir="clusters",
        metadata={"tool": "test", "seed": seed},
    )


def _raw_map(path, header, domain_ids):
    """Write a map file without the writer's validation (to build broken ones)."""
    with open(path, "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header)), domain_ids=np.asarray(domain_ids))


def _header(dmap):
    return {
        "format": MAP_FORMAT,
        "levels": dmap.levels,
        "names": dmap.names,
        "clusters_dir": dmap.clusters_dir,
        "metadata": dmap.metadata,
        "shards": [
            {"name": s.name, "num_documents": s.num_documents, "num_tokens": s.num_tokens, "idx_sha256": s.idx_sha256}
            for s in dmap.shards
        ],
    }


def test_round_trip_names_groups_and_order(tmp_path, shards):
    dmap = _map(shards, levels=(2, 3))
    path = str(tmp_path / "map.npz")
    write_domain_map(path, dmap)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # atomic: no temp file left
    with np.load(path, allow_pickle=False) as npz:  # the documented plain-numpy format
        assert json.loads(str(npz["header"][()]))["format"] == MAP_FORMAT
        assert npz["domain_ids"].dtype == np.int32
    back = read_domain_map(path)
    np.testing.assert_array_equal(back.domain_ids, dmap.domain_ids)
    assert back.domain_ids.dtype == np.int32
    assert back.shards == dmap.shards and back.levels == [2, 3] and back.names is None
    assert back.clusters_dir == "clusters" and back.metadata == {"tool": "test", "seed": 0}
    assert back.num_domains == 6
    np.testing.assert_array_equal(back.document_offsets, [0, 7, 12])
    # Names as tools/cluster_domains.py names hierarchical clusters: row-major ids, zero-padded per level.
    assert [back.domain_name(j) for j in range(6)] == ["c00_00", "c00_01", "c00_02", "c01_00", "c01_01", "c01_02"]
    assert back.group_name(0, 1) == "c01"
    np.testing.assert_array_equal(back.group_ids(0), dmap.domain_ids // 3)
    np.testing.assert_array_equal(back.group_ids(1), dmap.domain_ids)
    np.testing.assert_array_equal(back.domain_counts(), [np.sum(dmap.domain_ids == j) for j in range(6)])
    # --data-path order may differ from the map's: the permutation puts it in map order.
    assert check_map_matches_shards(back, shards[::-1], path) == [1, 0]
    assert check_map_matches_shards(back, shards, path) == [0, 1]


def test_flat_and_labelled_names(tmp_path, shards):
    flat = _map(shards, levels=(150,))
    assert flat.domain_name(3) == "c003" and flat.domain_name(149) == "c149"
    labelled = _map(shards, levels=(3,), names=["web", "code", "math"])
    path = str(tmp_path / "labelled.npz")
    write_domain_map(path, labelled)
    assert read_domain_map(path).domain_name(1) == "code"


def _expect(path, fragment, call=None):
    with pytest.raises(DataError) as err:
        (call or (lambda: read_domain_map(path)))()
    message = str(err.value)
    assert path in message, message
    assert fragment in message, message
    return message


def test_wrong_document_count(tmp_path, shards):
    dmap = _map(shards)
    path = str(tmp_path / "short.npz")
    _raw_map(path, _header(dmap), dmap.domain_ids[:-1])
    _expect(path, "holds 11 documents but its shards hold 12")


def test_ids_out_of_range(tmp_path, shards):
    dmap = _map(shards)
    ids = dmap.domain_ids.copy()
    ids[4] = 6
    path = str(tmp_path / "range.npz")
    _raw_map(path, _header(dmap), ids)
    _expect(path, "document 4 has domain id 6, outside [0, 6)")
    ids[4] = -1
    _raw_map(path, _header(dmap), ids)
    _expect(path, "document 4 has domain id -1")
    with pytest.raises(DataError, match="outside"):  # the writer refuses it too
        write_domain_map(str(tmp_path / "w.npz"), DomainMap(ids, dmap.shards, dmap.levels))


def test_not_an_npz_and_wrong_format(tmp_path, shards):
    path = str(tmp_path / "text.npz")
    with open(path, "w") as fh:
        fh.write("c00 c01\n")
    _expect(path, "is not a domain map")
    npy = str(tmp_path / "array.npy")
    np.save(npy, np.zeros(3))
    _expect(npy, "is not a domain map")
    dmap = _map(shards)
    header = _header(dmap)
    header["format"] = "megatron-dga/domain-map-v0"
    wrong = str(tmp_path / "v0.npz")
    _raw_map(wrong, header, dmap.domain_ids)
    _expect(wrong, "format 'megatron-dga/domain-map-v0', expected 'megatron-dga/domain-map-v1'")
    lacking = str(tmp_path / "lacking.npz")
    with open(lacking, "wb") as fh:
        np.savez(fh, domain_ids=dmap.domain_ids)
    _expect(lacking, "['header'] are missing")
    _expect(str(tmp_path / "absent.npz"), "does not exist")


def test_invalid_levels_and_names(tmp_path, shards):
    dmap = _map(shards)
    path = str(tmp_path / "bad.npz")
    for levels in ([], [0, 3], "6"):
        header = _header(dmap)
        header["levels"] = levels
        _raw_map(path, header, dmap.domain_ids)
        _expect(path, "levels must be a non-empty list")
    header = _header(dmap)
    header["names"] = ["a", "b"]
    _raw_map(path, header, dmap.domain_ids)
    _expect(path, "2 names for 6 domains")


def test_foreign_shard_same_name(tmp_path, shards):
    """A shard rebuilt under the same name with the same document count but other documents is refused
    by its .idx sha (the .idx holds the document lengths; the .bin is not hashed)."""
    dmap = _map(shards)
    path = str(tmp_path / "map.npz")
    write_domain_map(path, dmap)
    other = tmp_path / "other"
    foreign = write_shard(str(other / "part1_text_document"), _docs(5, 99, length=6))
    msg = _expect(
        path,
        "part1_text_document.idx is not the shard the map was built for",
        lambda: check_map_matches_shards(read_domain_map(path), [shards[0], foreign], path),
    )
    assert "sha256" in msg and "--output-map" in msg


def test_shard_with_other_document_count(tmp_path, shards):
    dmap = _map(shards)
    path = str(tmp_path / "map.npz")
    write_domain_map(path, dmap)
    grown = write_shard(str(tmp_path / "other" / "part1_text_document"), _docs(6, 1))
    msg = _expect(
        path,
        "has 6 documents but the map was built for 5",
        lambda: check_map_matches_shards(read_domain_map(path), [shards[0], grown], path),
    )
    assert grown in msg and "tools/cluster_domains.py" in msg


def test_missing_and_extra_shards(tmp_path, shards):
    dmap = _map(shards)
    path = str(tmp_path / "map.npz")
    write_domain_map(path, dmap)
    back = read_domain_map(path)
    _expect(
        path,
        "the map's shard 'part1_text_document' is not in --data-path",
        lambda: check_map_matches_shards(back, [shards[0]], path),
    )
    extra = write_shard(str(tmp_path / "part2_text_document"), _docs(3, 2))
    _expect(
        path,
        f"--data-path shard {extra} is not in the map",
        lambda: check_map_matches_shards(back, shards + [extra], path),
    )
    _expect(
        path,
        "two shards named 'part0_text_document'",
        lambda: check_map_matches_shards(back, shards + [shards[0]], path),
    )
    os.remove(shards[1] + ".idx")
    with pytest.raises(DataError, match="part1_text_document.idx is missing"):
        check_map_matches_shards(back, shards, path)


def test_large_map_reads_fast(tmp_path, shards):
    """262,144 domains over a million documents: read and validated well under a second."""
    import time

    ident = shard_identity(shards[0])
    ident.num_documents = 1_000_000
    ids = np.random.default_rng(0).integers(0, 64**3, size=1_000_000).astype(np.int32)
    path = str(tmp_path / "big.npz")
    write_domain_map(path, DomainMap(ids, [ident], [64, 64, 64]))
    t0 = time.perf_counter()
    back = read_domain_map(path)
    counts = back.domain_counts()
    elapsed = time.perf_counter() - t0
    assert counts.sum() == 1_000_000 and back.domain_name(64**3 - 1) == "c63_63_63"
    assert elapsed < 1.0, elapsed
