"""The embedded default corpus: determinism, disjointness of the target splits, readable shards."""

import json
import os
import time

import numpy as np
import pytest

from megatron_dga.prep import default_corpus as dc
from megatron_dga.prep.default_corpus import CorpusConfig, prepare_default_data
from megatron_dga.data.tokenizers import build_tokenizer
from megatron_dga.errors import ConfigError, DataError

IndexedDataset = pytest.importorskip("megatron.core.datasets.indexed_dataset").IndexedDataset

SMALL = CorpusConfig(max_docs_per_domain=25, min_docs_per_domain=5, target_train_docs=30, target_eval_docs=15)
VOCAB = 400


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    roots = [str(tmp_path_factory.mktemp(f"build{i}")) for i in range(2)]
    return [prepare_default_data(r, vocab_size=VOCAB, seed=5, corpus_config=SMALL, log=lambda m: None) for r in roots]


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, root)] = full
    return out


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_two_builds_are_byte_identical(two_builds):
    a, b = two_builds
    fa, fb = _files(a.root), _files(b.root)
    assert sorted(fa) == sorted(fb)
    compared = 0
    for rel in fa:
        if rel.endswith("_document.json"):
            # Sidecars record absolute paths (which differ between the two roots); the rest must match.
            sa, sb = json.load(open(fa[rel])), json.load(open(fb[rel]))
            for s in (sa, sb):
                s.pop("sources"), s.pop("tokenizer_model")
            assert sa == sb, rel
        elif rel not in ("manifest.json", ".lock"):
            assert open(fa[rel], "rb").read() == open(fb[rel], "rb").read(), rel
            compared += 1
    assert compared >= 2 * len(a.domains) + 6  # jsonl + bin + idx per domain, targets, tokenizer


def test_domains_and_target_splits_are_disjoint(two_builds):
    data = two_builds[0]
    assert len(data.domains) >= 3 and data.target_name not in data.domains
    generic = {}
    for d in data.domains:
        recs = _jsonl(data.domain_jsonl[d])
        assert 5 <= len(recs) <= SMALL.max_docs_per_domain
        assert all(r["domain"] == d and SMALL.min_chars <= len(r["text"].strip()) <= SMALL.max_chars for r in recs)
        generic.update({dc._fingerprint(r["text"]): d for r in recs})
    train, ev = _jsonl(data.target_train_jsonl), _jsonl(data.target_eval_jsonl)
    assert (len(train), len(ev)) == (SMALL.target_train_docs, SMALL.target_eval_docs)
    ftrain = {dc._fingerprint(r["text"]) for r in train}
    feval = {dc._fingerprint(r["text"]) for r in ev}
    assert len(ftrain) == len(train) and len(feval) == len(ev)
    assert not ftrain & feval and not ftrain & set(generic) and not feval & set(generic)
    # The eval split holds out whole topics.
    assert not {r["source"] for r in train} & {r["source"] for r in ev}


def test_shards_match_jsonl_and_tokenizer(two_builds):
    data = two_builds[0]
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=data.tokenizer_model)
    assert tok.vocab_size == data.vocab_size <= VOCAB
    pairs = [(data.domain_jsonl[d], data.domain_prefixes[d]) for d in data.domains]
    pairs += [(data.target_train_jsonl, data.target_train_prefix), (data.target_eval_jsonl, data.target_eval_prefix)]
    for jsonl, prefix in pairs:
        recs = _jsonl(jsonl)
        ds = IndexedDataset(prefix)
        assert len(ds) == len(recs)
        for i in (0, len(recs) - 1):
            assert np.asarray(ds[i]).tolist() == tok.tokenize(recs[i]["text"]) + [tok.eod]
        side = json.load(open(prefix + ".json"))
        assert side["tokenizer_model"] == data.tokenizer_model and side["vocab_size"] == tok.vocab_size
        assert all(os.path.isfile(s) for s in side["sources"])


def test_second_call_is_fast_and_a_corrupt_file_triggers_a_rebuild(tmp_path, two_builds):
    data = two_builds[1]
    t0 = time.monotonic()
    again = prepare_default_data(data.root, vocab_size=VOCAB, seed=5, corpus_config=SMALL)
    assert time.monotonic() - t0 < 1.0
    assert again == data
    jsonl = data.domain_jsonl[data.domains[0]]
    original = open(jsonl, "rb").read()
    with open(jsonl, "ab") as f:
        f.write(b'{"text": "tampered"}\n')
    rebuilt = prepare_default_data(data.root, vocab_size=VOCAB, seed=5, corpus_config=SMALL, log=lambda m: None)
    assert rebuilt == data and open(jsonl, "rb").read() == original


def test_refuses_foreign_directory_and_bad_config(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="does not own"):
        prepare_default_data(str(tmp_path), vocab_size=VOCAB, corpus_config=SMALL)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="chunk_chars"):
        CorpusConfig(min_chars=500, chunk_chars=100)
    with pytest.raises(ConfigError, match="--vocab-size"):
        prepare_default_data(str(tmp_path / "new"), vocab_size=10, corpus_config=SMALL)


def test_chunk_text_bounds():
    cfg = CorpusConfig(min_chars=20, chunk_chars=60, max_chars=100)
    text = "\n\n".join(["short para"] * 3 + ["x" * 250, "word " * 30, "tiny"])
    chunks = dc.chunk_text(text, cfg)
    assert chunks and all(20 <= len(c) <= 100 for c in chunks)
    # Nothing but separators and the dropped sub-minimum pieces is lost.
    joined = "".join(chunks).replace("\n", "").replace(" ", "")
    assert joined.count("x") == 250
