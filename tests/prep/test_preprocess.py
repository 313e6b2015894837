"""tools/preprocess_data.py: shards read back with megatron-core's IndexedDataset."""

import gzip
import json
import os
import random

import numpy as np
import pytest

from megatron_dga.prep import preprocess as pp
from megatron_dga.prep.preprocess import PreprocessConfig, preprocess
from megatron_dga.data.tokenizers import TokenizerSpec, build_tokenizer
from megatron_dga.prep.train_tokenizer import SentencePieceTrainConfig, train_sentencepiece
from megatron_dga.errors import ConfigError, DataError

IndexedDataset = pytest.importorskip("megatron.core.datasets.indexed_dataset").IndexedDataset

from megatron_dga.cli import preprocess_data
from tests.helpers import REPO


def _texts(n, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + ("\n    indented();" if i % 4 == 0 else "")
        for i in range(n)
    ]


def _write_jsonl(path, records, raw_lines=()):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        for r in records:
            f.write((json.dumps(r) + "\n").encode())
        for raw in raw_lines:
            f.write(raw)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    return train_sentencepiece(_texts(300), SentencePieceTrainConfig(str(d / "sp"), vocab_size=400))


def _spm(model):
    return TokenizerSpec("SentencePieceTokenizer", tokenizer_model=model)


def _read(prefix):
    ds = IndexedDataset(prefix)
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))], ds


def test_round_trip_against_indexed_dataset(tmp_path, spm_model):
    texts = _texts(50, seed=1)
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    res = preprocess(
        PreprocessConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "out" / "web"), _spm(spm_model), append_eod=True)
    )
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    prefix = str(tmp_path / "out" / "web_text_document")
    assert [r.prefix for r in res] == [prefix]
    docs, ds = _read(prefix)
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts]
    assert ds.index.dtype == np.uint16  # DType.optimal_dtype(400)
    assert ds.document_indices.tolist() == list(range(51))
    side = json.loads(open(prefix + ".json").read())
    assert side["num_documents"] == 50 and side["num_tokens"] == sum(map(len, docs))
    assert side["vocab_size"] == tok.vocab_size and side["eod"] == tok.eod and side["append_eod"] is True
    assert side["tokenizer_sha256"] == tok.fingerprint()["tokenizer_sha256"]
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp-" in n]


def test_workers_preserve_order_and_bytes(tmp_path, spm_model):
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _texts(700, seed=2)])  # > 2 batches
    for w in (1, 2):
        preprocess(PreprocessConfig(str(tmp_path / "in.jsonl"), str(tmp_path / f"w{w}"), _spm(spm_model), workers=w))
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"w1_text_document{ext}").read_bytes()
        assert a == (tmp_path / f"w2_text_document{ext}").read_bytes()


def test_directory_gz_and_glob_inputs(tmp_path):
    src = tmp_path / "domains"
    src.mkdir()
    _write_jsonl(src / "code.jsonl", [{"text": "1 2 3"}, {"text": "4 5"}])
    _write_jsonl(src / "law.jsonl.gz", [{"text": "7"}, {"text": "8 9"}, {"text": "6"}])
    (src / "notes.txt").write_text("ignored")
    (src / "manifest.json").write_text("{}")  # e.g. tools/cluster_domains.py output: not a domain
    null = TokenizerSpec("NullTokenizer", vocab_size=10)
    res = preprocess(PreprocessConfig(str(src), str(tmp_path / "shards"), null, append_eod=True))
    assert sorted(os.path.basename(r.prefix) for r in res) == ["code_text_document", "law_text_document"]
    assert _read(str(tmp_path / "shards" / "code_text_document"))[0] == [[1, 2, 3, 10], [4, 5, 10]]
    assert _read(str(tmp_path / "shards" / "law_text_document"))[0] == [[7, 10], [8, 9, 10], [6, 10]]
    # A quoted glob concatenates the matches, in sorted order, into one shard.
    preprocess(PreprocessConfig(str(src / "*.jsonl*"), str(tmp_path / "all"), null))
    assert _read(str(tmp_path / "all_text_document"))[0] == [[1, 2, 3], [4, 5], [7], [8, 9], [6]]


def test_multiple_json_keys_give_aligned_shards(tmp_path):
    _write_jsonl(tmp_path / "in.jsonl", [{"a": "1 2", "b": "3"}, {"a": "4", "b": "5 6"}, {"a": "7"}])
    res = preprocess(
        PreprocessConfig(
            str(tmp_path / "in.jsonl"),
            str(tmp_path / "o"),
            TokenizerSpec("NullTokenizer", vocab_size=9),
            json_keys=["a", "b"],
        )
    )
    assert [os.path.basename(r.prefix) for r in res] == ["o_a_document", "o_b_document"]
    assert _read(str(tmp_path / "o_a_document"))[0] == [[1, 2], [4]]
    assert _read(str(tmp_path / "o_b_document"))[0] == [[3], [5, 6]]
    assert res[0].bad_lines == {"missing_key": 1}


def test_bad_lines_counted_per_reason(tmp_path):
    raw = [
        b"{not json\n",  # line 3
        b'{"text": "1 2", "x": "\xff\xfe"}\n',  # 4: invalid utf-8
        b'{"other": "1"}\n',  # 5
        b'{"text": 12}\n',  # 6
        b'{"text": "   "}\n',  # 7
        b"\n",  # 8
        b"[1, 2]\n",  # 9
        b'{"text": "5 5"}\n',  # 10: fine
        b'{"text": ""}\n',  # 11
    ]
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "1"}, {"text": "2 3"}], raw)
    res = preprocess(
        PreprocessConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "o"), TokenizerSpec("NullTokenizer", vocab_size=9))
    )
    r = res[0]
    assert _read(r.prefix)[0] == [[1], [2, 3], [5, 5]]
    assert r.bad_lines == {
        "invalid_json": 1,
        "invalid_utf8": 1,
        "missing_key": 1,
        "not_string": 1,
        "empty_text": 2,
        "blank_line": 1,
        "not_object": 1,
    }
    assert r.first_bad[:3] == [
        f"{tmp_path / 'in.jsonl'}:3 invalid_json",
        f"{tmp_path / 'in.jsonl'}:4 invalid_utf8",
        f"{tmp_path / 'in.jsonl'}:5 missing_key",
    ]
    assert json.loads(open(r.prefix + ".json").read())["bad_lines"]["empty_text"] == 2
    report = pp.format_report(res)
    assert "empty_text=2" in report and "in.jsonl:3" in report


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_mid_write_leaves_previous_outputs(tmp_path, monkeypatch, exc):
    null = TokenizerSpec("NullTokenizer", vocab_size=9)
    _write_jsonl(tmp_path / "old.jsonl", [{"text": "1 2"}])
    _write_jsonl(tmp_path / "new.jsonl", [{"text": str(i % 9)} for i in range(600)])
    preprocess(PreprocessConfig(str(tmp_path / "old.jsonl"), str(tmp_path / "out" / "d"), null))
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    assert sorted(before) == ["d_text_document.bin", "d_text_document.idx", "d_text_document.json"]

    calls = {"n": 0}
    real_add = pp._ShardWriter.add

    def failing_add(self, ids, nbytes):
        calls["n"] += 1
        if calls["n"] == 300:  # mid-file, after several flushes to the temp .bin
            raise exc("simulated failure")
        real_add(self, ids, nbytes)

    monkeypatch.setattr(pp._ShardWriter, "add", failing_add)
    with pytest.raises(exc):
        preprocess(PreprocessConfig(str(tmp_path / "new.jsonl"), str(tmp_path / "out" / "d"), null))
    after = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    assert after == before  # untouched, and no temp files left
    calls["n"] = 0
    with pytest.raises(exc):
        preprocess(PreprocessConfig(str(tmp_path / "new.jsonl"), str(tmp_path / "fresh" / "d"), null))
    assert os.listdir(tmp_path / "fresh") == []  # no .idx, no partial .bin


def test_clear_errors(tmp_path, spm_model, capsys):
    null = TokenizerSpec("NullTokenizer", vocab_size=9)
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "1"}])
    with pytest.raises(DataError, match="--input .*missing.jsonl"):
        preprocess(PreprocessConfig(str(tmp_path / "missing.jsonl"), str(tmp_path / "o"), null))
    with pytest.raises(DataError, match="--json-keys 'body'"):
        preprocess(PreprocessConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "o"), null, json_keys=["body"]))
    assert not os.path.exists(tmp_path / "o_body_document.idx")
    with pytest.raises(ConfigError, match="--json-keys"):
        PreprocessConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "o"), null, json_keys=[])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory without"):
        preprocess(PreprocessConfig(str(tmp_path / "empty"), str(tmp_path / "o"), null))
    tool = preprocess_data
    rc = tool.main(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(tmp_path / "no.model"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--tokenizer-model" in err and "Traceback" not in err
    rc = tool.main(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "ok"),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "9",
            "--append-eod",
            "--no-progress",
        ]
    )
    assert rc == 0 and _read(str(tmp_path / "ok_text_document"))[0] == [[1, 9]]


def test_gpt_dataset_reads_shard(tmp_path, spm_model):
    """megatron-core's GPTDataset accepts the tokenizer object and the shard."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    texts = _texts(40, seed=3)
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    preprocess(PreprocessConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "d"), _spm(spm_model), append_eod=True))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
    prefix = str(tmp_path / "d_text_document")
    cfg = GPTDatasetConfig(
        random_seed=1,
        sequence_length=16,
        blend=None,
        split="1,0,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=None,
        mmap_bin_files=False,
    )
    indexed = IndexedDataset(prefix)
    ds = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), 8, Split.train, cfg)
    # Rebuild sample 0 by hand from megatron's index arrays over the raw documents.
    pos, offset = ds.sample_index[ds.shuffle_index[0]]
    stream = np.concatenate([np.asarray(indexed[int(d)]) for d in ds.document_index])
    start = sum(len(indexed[int(d)]) for d in ds.document_index[:pos]) + offset
    expected = stream[start : start + 17]
    sample = ds[0]
    assert sample["tokens"].tolist() == expected[:-1].tolist()
    assert sample["labels"].tolist() == expected[1:].tolist()
    assert (stream == tok.eod).sum() == 40 * (len(ds.document_index) // 40)
    assert ds._pad_token_id == tok.pad == 3


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path):
    import subprocess

    null = TokenizerSpec("NullTokenizer", vocab_size=9)
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}])
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=60)  # a pid that no longer runs (a SIGKILLed preprocess leaves such files)
    stale = [
        f"d_text_document.bin.tmp-{dead.pid}",
        f"d_text_document.idx.tmp-{dead.pid}",
        f"web_text_document.json.tmp-{dead.pid}",
    ]
    kept = [f"d_text_document.bin.tmp-{os.getppid()}", f"notes.txt.tmp-{dead.pid}"]  # a live writer; not ours
    for name in stale + kept:
        (out / name).write_bytes(b"partial")
    preprocess(PreprocessConfig(str(tmp_path / "in.jsonl"), str(out / "d"), null))
    assert sorted(os.listdir(out)) == sorted(
        kept + ["d_text_document.bin", "d_text_document.idx", "d_text_document.json"]
    )


def test_unwritable_output_simulated_by_a_file_is_one_line_and_touches_nothing(tmp_path, capsys):
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}])
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    rc = preprocess_data.main(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(blocker / "d"),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "9",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err == (
        f"error: --output-prefix {blocker}: cannot write {blocker}: {blocker} is a file, not a directory; "
        f"point --output-prefix elsewhere\n"
    )
    assert blocker.read_text() == "keep"


def test_full_disk_mid_write_simulated_is_one_line_and_keeps_previous_shard(tmp_path, monkeypatch, capsys):
    import errno

    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "9", "--no-progress"]
    _write_jsonl(tmp_path / "old.jsonl", [{"text": "1 2"}])
    _write_jsonl(tmp_path / "new.jsonl", [{"text": str(i % 9)} for i in range(600)])
    tool = preprocess_data
    assert (
        tool.main(["--input", str(tmp_path / "old.jsonl"), "--output-prefix", str(tmp_path / "out" / "d"), *null]) == 0
    )
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    real_add = pp._ShardWriter.add

    def full_disk(self, ids, nbytes):
        if self.num_documents == 300:
            raise OSError(errno.ENOSPC, "No space left on device", self.bin_tmp)
        real_add(self, ids, nbytes)

    monkeypatch.setattr(pp._ShardWriter, "add", full_disk)
    capsys.readouterr()
    rc = tool.main(["--input", str(tmp_path / "new.jsonl"), "--output-prefix", str(tmp_path / "out" / "d"), *null])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert (
        f"error: no space left on device writing {tmp_path / 'out' / 'd'}_text_document.bin.tmp-{os.getpid()}; "
        "free space or point --output-prefix elsewhere"
    ) in err, err
    assert {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")} == before


def test_bad_null_tokenizer_token_is_a_counted_bad_line_with_its_location(tmp_path):
    # Also the noise check of the tools: a fresh process, megatron-core imported, nothing but our lines.
    import subprocess
    import sys

    _write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}, {"text": "3 x 4"}, {"text": "5"}])
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "d"),
            "--tokenizer-type",
            "NullTokenizer",
            "--vocab-size",
            "9",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        f"{tmp_path / 'in.jsonl'}:2 untokenizable (NullTokenizer expects whitespace-separated integers, got '3 x 4'.)"
    ) in proc.stdout, proc.stdout
    assert "untokenizable=1" in proc.stdout
    assert _read(str(tmp_path / "d_text_document"))[0] == [[1, 2], [5]]
    for noise in ("Transformer Engine", "Megatron-FSDP", "Detected Megatron Core", "Traceback", "warn"):
        assert noise not in proc.stderr, proc.stderr


def test_copy_documents_keeps_the_first_documents_and_the_tokenizer_record(tmp_path, spm_model):
    texts = _texts(20, seed=5)
    _write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    (src,) = preprocess(
        PreprocessConfig(
            input=str(tmp_path / "t.jsonl"),
            output_prefix=str(tmp_path / "t"),
            tokenizer=_spm(spm_model),
            append_eod=True,
        )
    )
    docs, _ = _read(src.prefix)
    out = str(tmp_path / "small" / "t_text_document")
    result = pp.copy_documents(src.prefix, out, 7)
    copied, ds = _read(out)
    assert copied == docs[:7] and result.num_documents == 7 and result.num_tokens == sum(map(len, docs[:7]))
    assert ds.index.dtype == IndexedDataset(src.prefix).index.dtype
    with open(src.prefix + ".json") as fh:
        before = json.load(fh)
    with open(out + ".json") as fh:
        after = json.load(fh)
    assert {k: after[k] for k in ("tokenizer_sha256", "vocab_size", "eod")} == {
        k: before[k] for k in ("tokenizer_sha256", "vocab_size", "eod")
    }
    assert after["num_documents"] == 7 and after["subset_of"]["documents"] == [0, 7]
    assert pp.copy_documents(src.prefix, out, 100).num_documents == 20  # more than there are: all of them
    assert _read(out)[0] == docs
    assert not [f for f in os.listdir(tmp_path / "small") if ".tmp-" in f]


def test_progress_lines_without_a_terminal_and_none_with_no_progress(tmp_path, caplog):
    _write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(str(j % 9) for j in range(i % 7 + 1))} for i in range(600)])
    lines = {}
    for progress in (None, False):  # stderr is not a terminal under pytest: log lines, not a bar
        caplog.clear()
        with caplog.at_level("INFO", logger="megatron_dga.progress"):
            preprocess(
                PreprocessConfig(
                    input=str(tmp_path / "t.jsonl"),
                    output_prefix=str(tmp_path / "o"),
                    tokenizer=TokenizerSpec("NullTokenizer", vocab_size=10),
                    log_interval=200,
                    progress=progress,
                )
            )
        lines[progress] = [r.getMessage() for r in caplog.records if r.name == "megatron_dga.progress"]
    # 600 lines read in batches of 256: a line once 200, 400 and 600 documents are passed.
    assert [m.split(",")[0] for m in lines[None]] == ["o: 256 documents", "o: 512 documents", "o: 600 documents"]
    assert "MB (100.0%)" in lines[None][-1] and "documents/s" in lines[None][-1]
    assert lines[False] == []
