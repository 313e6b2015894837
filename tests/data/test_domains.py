"""Per-domain megatron-core datasets, shard validation and the DataLoader glue."""

import json
import os
import struct

import numpy as np
import pytest
import torch

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import Split

from megatron_dga.data.domains import (
    DomainDatasetConfig,
    build_domain_datasets,
    domain_name,
    inspect_shard,
    parse_data_path,
    read_sidecar_vocab_size,
)
from megatron_dga.data.mixture import MixtureDataset, StepLoader
from megatron_dga.data.sampler import DynamicMixtureSampler, MixtureSamplerConfig
from megatron_dga.errors import DataError

VOCAB = 500
SEQ = 16


class Tok:
    """The minimum a tokenizer needs to offer the datasets."""

    eod = 0
    vocab_size = VOCAB


def write_shard(directory, name, num_docs=20, vocab=VOCAB, dtype=None, seed=0, max_len=60):
    prefix = os.path.join(str(directory), f"{name}_text_document")
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype or DType.optimal_dtype(vocab))
    for _ in range(num_docs):
        ids = rng.integers(1, vocab, size=int(rng.integers(5, max_len)))
        ids[-1] = 0
        builder.add_document(torch.from_numpy(ids), [ids.size])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return [
        write_shard(d, name, num_docs=n, seed=i) for i, (name, n) in enumerate([("web", 30), ("code", 20), ("law", 25)])
    ]


def test_parse_data_path_forms():
    names, prefixes, weights = parse_data_path("0.2 a/web_text_document 0.6 b/code_text_document")
    assert names == ["web", "code"] and prefixes == ["a/web_text_document", "b/code_text_document"]
    assert weights == pytest.approx([0.25, 0.75])
    names, _, weights = parse_data_path(["x/web_text_document", "y/law"])
    assert names == ["web", "law"] and weights is None
    assert domain_name("d/_text_document") == "_text_document"
    with pytest.raises(DataError, match="pairs"):
        parse_data_path("0.2 a_text_document 0.3")
    with pytest.raises(DataError, match="duplicate domain name 'web'"):
        parse_data_path("a/web_text_document b/web_text_document")
    with pytest.raises(DataError, match="all weights are zero"):
        parse_data_path("0 a 0 b")
    with pytest.raises(DataError, match="finite number >= 0"):
        parse_data_path("-1 a 2 b")


def test_domains_match_megatron_gpt_dataset(shards):
    cfg = DomainDatasetConfig(sequence_length=SEQ, seed=5)
    domains = build_domain_datasets(shards, Tok(), cfg)
    assert domains.names == ["web", "code", "law"]
    for prefix, ds, n_tok, n_samp in zip(shards, domains.datasets, domains.num_tokens, domains.num_samples):
        indexed = IndexedDataset(prefix)
        assert n_tok == int(indexed.sequence_lengths.sum())
        # megatron's own one-epoch count: (tokens - 1) // seq_length samples
        assert n_samp == (n_tok - 1) // SEQ
        ref_cfg = GPTDatasetConfig(
            random_seed=5,
            sequence_length=SEQ,
            tokenizer=domains.datasets[0].config.tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        ref = GPTDataset(
            indexed, prefix, np.arange(len(indexed.document_indices) - 1, dtype=np.int32), None, Split.train, ref_cfg
        )
        assert len(ref) == len(ds)
        tokens = np.concatenate([indexed[i] for i in range(len(indexed))])
        for i in range(len(ds)):
            got, want = ds[i], ref[i]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                torch.testing.assert_close(got[key], want[key])
            # and the sample really is a window of the raw token stream (labels = tokens shifted)
            assert torch.equal(got["tokens"][1:], got["labels"][:-1])
        assert set(ds[0]["tokens"].tolist()) <= set(tokens.tolist())


def corrupt_copy(tmp_path, prefix, name):
    dst = os.path.join(str(tmp_path), f"{name}_text_document")
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as f, open(dst + ext, "wb") as g:
            g.write(f.read())
    return dst


def test_shard_validation_errors(tmp_path, shards):
    good = shards[0]
    p = corrupt_copy(tmp_path, good, "nobin")
    os.remove(p + ".bin")
    with pytest.raises(DataError, match=r"nobin_text_document\.bin is missing"):
        inspect_shard(p)
    p = corrupt_copy(tmp_path, good, "magic")
    with open(p + ".idx", "r+b") as f:
        f.write(b"XXXXXXX")
    with pytest.raises(DataError, match=r"magic_text_document\.idx is not a megatron MMIDIDX"):
        inspect_shard(p)
    p = corrupt_copy(tmp_path, good, "version")
    with open(p + ".idx", "r+b") as f:
        f.seek(9)
        f.write(struct.pack("<Q", 7))
    with pytest.raises(DataError, match="unsupported index version 7"):
        inspect_shard(p)
    p = corrupt_copy(tmp_path, good, "trunc")
    size = os.path.getsize(p + ".idx")
    with open(p + ".idx", "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(DataError, match=r"trunc_text_document\.idx is truncated"):
        inspect_shard(p)
    p = corrupt_copy(tmp_path, good, "shortbin")
    with open(p + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(p + ".bin") - 4)
    with pytest.raises(DataError, match=r"shortbin_text_document\.bin is truncated"):
        inspect_shard(p)


def _garble(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


# .idx body layout after the 34-byte header: int32 lengths[n] | int64 pointers[n] | int64 doc_idx[n_docs + 1]
GARBLES = {
    "pointer": (lambda n: 34 + 4 * n + 8 * 3, "<q", lambda v: v + 2, r"sequence 3 starts at byte \d+, expected \d+"),
    "length": (lambda n: 34 + 4 * 2, "<i", lambda v: v + 1, r"sequence 3 starts at byte \d+, expected \d+"),
    "negative-length": (lambda n: 34 + 4 * 4, "<i", lambda v: -5, r"sequence 4 has negative length -5"),
    "first-pointer": (lambda n: 34 + 4 * n, "<q", lambda v: 8, r"first sequence starts at byte 8, expected 0"),
    "document-order": (
        lambda n: 34 + 12 * n + 8 * 2,
        "<q",
        lambda v: v + 2,
        r"document 3 starts at sequence 3, before document 2 \(sequence 4\)",
    ),
    "last-document": (lambda n: 34 + 12 * n + 8 * n, "<q", lambda v: v + 7, r"run from 0 to 37, expected 0 to the 30"),
}


@pytest.mark.parametrize("case", sorted(GARBLES))
def test_garbled_index_body_fails_at_startup_naming_the_file(tmp_path, shards, case):
    offset, fmt, change, message = GARBLES[case]
    p = corrupt_copy(tmp_path, shards[0], case)
    n = inspect_shard(p).num_sequences  # 30 one-sequence documents; the intact copy passes
    with open(p + ".idx", "rb") as f:
        f.seek(offset(n))
        (value,) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
    _garble(p + ".idx", offset(n), fmt, change(value))
    before = {ext: open(p + ext, "rb").read() for ext in (".idx", ".bin")}
    with pytest.raises(DataError, match=message) as e:
        build_domain_datasets([p], Tok(), DomainDatasetConfig(sequence_length=SEQ))
    assert f"{p}.idx" in str(e.value) and "re-run preprocessing" in str(e.value)
    assert {ext: open(p + ext, "rb").read() for ext in (".idx", ".bin")} == before  # validation only reads


def _write_docs(directory, name, docs):
    prefix = os.path.join(str(directory), f"{name}_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.from_numpy(np.asarray(doc, dtype=np.int64)), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


class SmallTok:
    eod, vocab_size = 0, 100


def test_token_ids_beyond_the_vocab_fail_at_startup_without_a_sidecar(tmp_path, shards):
    # shards[0] holds ids up to 499 and has no sidecar: the bounded start-up sample finds them.
    with pytest.raises(
        DataError,
        match=r"web_text_document\.bin contains token id \d+, outside the tokenizer's "
        r"vocabulary \[0, 100\) \(no sidecar .*web_text_document\.json.*scanning a "
        r"sample of.*--vocab-size",
    ):
        build_domain_datasets([shards[0]], SmallTok(), DomainDatasetConfig(sequence_length=SEQ))
    with pytest.raises(DataError, match="scanning all of"):
        build_domain_datasets([shards[0]], SmallTok(), DomainDatasetConfig(sequence_length=SEQ, check_token_ids=True))
    # A sidecar recording the tokenizer's vocab_size vouches for the shard: no scan at start-up.
    vouched = corrupt_copy(tmp_path, shards[0], "vouched")
    with open(vouched + ".json", "w") as f:
        json.dump({"vocab_size": 100}, f)
    build_domain_datasets([vouched], SmallTok(), DomainDatasetConfig(sequence_length=SEQ))


def test_token_id_missed_by_the_startup_sample_fails_in_its_batch(tmp_path):
    # One id 450 in the middle of document 4: outside the head, the tail and the document starts
    # a 64-byte sample reads, so start-up passes and the collated batch names the sample.
    docs = [np.arange(1, 21) + d for d in range(8)]
    docs[4][7] = 450
    prefix = _write_docs(tmp_path, "rare", docs)
    small = DomainDatasetConfig(sequence_length=SEQ, token_id_sample_bytes=64)
    with pytest.raises(DataError, match="token id 450"):
        build_domain_datasets([prefix], SmallTok(), DomainDatasetConfig(sequence_length=SEQ, check_token_ids=True))
    domains = build_domain_datasets([prefix], SmallTok(), small)
    ds = MixtureDataset(domains.datasets, vocab_size=100, source_names=["domain 'rare'"])
    keys = np.array([[0, i] for i in range(len(ds))])
    with pytest.raises(
        DataError,
        match=r"domain 'rare' \(.*rare_text_document\.bin\), sample (\d+): (tokens|labels) "
        r"hold id 450, outside the vocabulary \[0, 100\)",
    ) as e:
        ds.load(keys)
    sample = int(str(e.value).split("sample ")[1].split(":")[0])
    assert 450 in domains.datasets[0][sample]["labels"].tolist()
    # The training loader checks each micro-batch in the main process (workers would wrap the error).
    sampler = DynamicMixtureSampler(domains.num_samples, MixtureSamplerConfig(global_batch_size=4, micro_batch_size=2))
    loader = StepLoader(ds, sampler)
    with pytest.raises(DataError, match="hold id 450"):
        for _ in range(len(ds)):
            list(loader.next_step())


def test_sidecar_validation(tmp_path):
    prefix = str(tmp_path / "web_text_document")
    assert read_sidecar_vocab_size(prefix) is None
    (tmp_path / "web.json").write_text('{"text": "a raw Megatron-LM input"}\n{"text": "jsonl"}\n')
    assert read_sidecar_vocab_size(prefix) is None  # <x>.json is often the jsonl corpus: not ours
    for text, message in [
        ("[1, 2]", "holds a JSON list"),
        ('{"vocab_size": true}', "positive int, got True"),
        ("\udcff{", "not valid JSON"),
    ]:
        with open(prefix + ".json", "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        with pytest.raises(DataError, match=message) as e:
            read_sidecar_vocab_size(prefix)
        assert f"{prefix}.json" in str(e.value)


def test_domain_level_errors(tmp_path, shards):
    cfg = DomainDatasetConfig(sequence_length=SEQ)
    empty = write_shard(tmp_path, "empty", num_docs=0)
    with pytest.raises(DataError, match="'empty'.*0 documents"):
        build_domain_datasets([shards[0], empty], Tok(), cfg)
    tiny = write_shard(tmp_path, "tiny", num_docs=1, max_len=6)
    with pytest.raises(DataError, match="'tiny'.*fewer than one sample"):
        build_domain_datasets([shards[0], tiny], Tok(), cfg)
    wide = write_shard(tmp_path, "wide", dtype=np.int32)
    with pytest.raises(DataError, match="different token dtypes.*web: uint16.*wide: int32"):
        build_domain_datasets([shards[0], wide], Tok(), cfg)
    side = write_shard(tmp_path, "side")
    with open(side + ".json", "w") as f:
        json.dump({"vocab_size": VOCAB + 1}, f)
    with pytest.raises(DataError, match="sidecar records vocab_size 501"):
        build_domain_datasets([side], Tok(), cfg)


def test_mixture_dataset_returns_megatron_samples(shards):
    domains = build_domain_datasets(shards[:2], Tok(), DomainDatasetConfig(sequence_length=SEQ))
    ds = MixtureDataset(domains.datasets, held_out_datasets=[domains.datasets[0]])
    item = ds[(1, 3)]
    assert item["domain_id"].item() == 1
    torch.testing.assert_close(item["tokens"], domains.datasets[1][3]["tokens"])
    assert ds[(2, 0)]["domain_id"].item() == 2
    batch = ds.load(np.array([[0, 1], [1, 2]]))
    assert batch["tokens"].shape == (2, SEQ) and batch["domain_id"].tolist() == [0, 1]
    with pytest.raises(IndexError):
        ds[(0, len(domains.datasets[0]))]


@pytest.mark.parametrize("num_workers", [2, 0], ids=["workers", "in_process"])
def test_step_loader_sees_weight_change(shards, num_workers):
    """Each step loads its own global batch, with DataLoader workers and in this process alike."""
    domains = build_domain_datasets(shards, Tok(), DomainDatasetConfig(sequence_length=SEQ))
    ds = MixtureDataset(domains.datasets)
    cfg = MixtureSamplerConfig(global_batch_size=8, micro_batch_size=2, seed=3)
    sampler = DynamicMixtureSampler(domains.num_samples, cfg, weights=[1, 0, 0])
    loader = StepLoader(ds, sampler, dp_rank=1, dp_size=2, num_workers=num_workers)
    schedule = [0, 0, 2, 2, 2, 1, 1]
    for step, wanted in enumerate(schedule):
        if step == 0 or wanted != schedule[step - 1]:  # a weight change makes the read-ahead batch stale
            sampler.set_weights(np.eye(3)[wanted])
        sampler.set_weights(np.eye(3)[wanted])
        mbs = list(loader.next_step())
        assert len(mbs) == 2 and all(mb["tokens"].shape == (2, SEQ) for mb in mbs)
        ids = torch.cat([mb["domain_id"] for mb in mbs]).tolist()
        assert ids == [wanted] * 4, (step, ids)
        # the loaded micro-batches are this rank's half of the global batch, in order
        mine = loader.last_global_batch[4:]
        for row, got in zip(mine, torch.cat([mb["tokens"] for mb in mbs])):
            torch.testing.assert_close(got, domains.datasets[row[0]][row[1]]["tokens"])


def test_document_split_gives_disjoint_train_and_valid_parts(shards):
    prefix = shards[0]
    tok = Tok()
    cfg = DomainDatasetConfig(sequence_length=8, seed=3)
    train = build_domain_datasets([prefix], tok, cfg, documents=(0.0, 0.75)).datasets[0]
    valid = build_domain_datasets([prefix], tok, cfg, documents=(0.75, 1.0)).datasets[0]
    indexed = IndexedDataset(prefix)
    n_docs = len(indexed.document_indices) - 1
    cut = round(0.75 * n_docs)
    # Every sample is drawn from the documents of its part only (megatron's document index).
    assert set(np.unique(train.document_index)) == set(range(cut))
    assert set(np.unique(valid.document_index)) == set(range(cut, n_docs))
    with pytest.raises(DataError, match="--split"):
        build_domain_datasets([prefix], tok, DomainDatasetConfig(sequence_length=500), documents=(0.99, 1.0))
