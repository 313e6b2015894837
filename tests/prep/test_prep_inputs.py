"""One rule for which files an --input names, shared by every tool (megatron_dga.prep.inputs)."""

import gzip
import os

import pytest

from megatron_dga.errors import DataError
from megatron_dga.prep import inputs, preprocess


def _corpus(tmp_path):
    (tmp_path / "web.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    with gzip.open(tmp_path / "code.jsonl.gz", "wt") as f:
        f.write('{"text": "c"}\n')
    (tmp_path / "manifest.json").write_text('{"domains": 2}')
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path


def test_directory_takes_jsonl_and_jsonl_gz_but_not_a_manifest(tmp_path):
    d = _corpus(tmp_path)
    files = inputs.expand_jsonl_inputs([str(d)])
    assert [os.path.basename(f) for f in files] == ["code.jsonl.gz", "web.jsonl"]
    # preprocess_data's directory mode (one shard per file) sees the same files
    groups = preprocess.resolve_inputs(str(d), str(tmp_path / "out"))
    assert sorted(f for _, fs in groups for f in fs) == sorted(files)


def test_explicit_files_globs_order_and_duplicates(tmp_path):
    d = _corpus(tmp_path)
    files = inputs.expand_jsonl_inputs(
        [str(d / "web.jsonl"), str(d / "*.gz"), str(d / "manifest.json"), str(d / "web.jsonl")]
    )
    assert [os.path.basename(f) for f in files] == ["web.jsonl", "code.jsonl.gz", "manifest.json"]


def test_nothing_matching_names_the_flag_and_the_spec(tmp_path):
    with pytest.raises(DataError, match=r"--specific '.*nothing\*' matches no jsonl file"):
        inputs.expand_jsonl_inputs([str(tmp_path / "nothing*")], flag="--specific")
    with pytest.raises(DataError, match="matches no jsonl file"):
        inputs.expand_jsonl_inputs([str(tmp_path)])  # an empty directory


def test_reader_skips_blank_lines_and_reads_gzip(tmp_path):
    d = _corpus(tmp_path)
    files = inputs.expand_jsonl_inputs([str(d)])
    assert inputs.read_jsonl_texts(files) == ["c", "a", "b"]
    assert [n for _, n, _ in inputs.iter_jsonl([str(d / "web.jsonl")])] == [1, 3]
