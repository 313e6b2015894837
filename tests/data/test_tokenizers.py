"""Tokenizers: GPT-2 byte-level BPE against hand/brute-force results, SentencePiece training, errors."""

import json
import random

import pytest

from megatron_dga.data.tokenizers import GPT2BPETokenizer, build_tokenizer, bytes_to_unicode
from megatron_dga.prep.train_tokenizer import SentencePieceTrainConfig, train_sentencepiece
from megatron_dga.errors import ConfigError, DataError

from megatron_dga.cli import train_tokenizer


# --------------------------------------------------------------------------- GPT-2 BPE
MERGES = [("l", "l"), ("h", "e"), ("he", "ll"), ("\u0120", "h"), ("hell", "o"), ("o", "\u0120")]


@pytest.fixture
def gpt2_files(tmp_path):
    """A vocabulary of all 256 byte symbols + the merge results + <|endoftext|>."""
    symbols = [bytes_to_unicode()[b] for b in range(256)]
    symbols += [a + b for a, b in MERGES] + ["<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    vocab_path, merges_path = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return str(vocab_path), str(merges_path), vocab


def _reference_bpe(word, ranks):
    """Brute force: merge the single leftmost occurrence of the best-ranked pair, repeat."""
    symbols = list(word)
    while True:
        candidates = [(ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in ranks]
        if not candidates:
            return symbols
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]


def test_gpt2_bpe_hand_computed_ids(gpt2_files):
    vocab_file, merge_file, vocab = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    G = "\u0120"  # byte-level symbol of the space
    # "hello": l+l (rank 0), h+e (1), he+ll (2), hell+o (4) -> one token.
    assert tok.tokenize("hello") == [vocab["hello"]]
    # " hello": h+e (rank 1) wins over Ġ+h (rank 3), so Ġ stays alone.
    assert tok.tokenize(" hello") == [vocab[G], vocab["hello"]]
    # "lll": merges are applied left to right, non-overlapping.
    assert tok.tokenize("lll") == [vocab["ll"], vocab["l"]]
    # "hi there": pre-tokens "hi", " there"; only "he" merges.
    assert tok.tokenize("hi there") == [vocab[c] for c in "hi"] + [
        vocab[G],
        vocab["t"],
        vocab["he"],
        vocab["r"],
        vocab["e"],
    ]
    assert tok.eod == vocab["<|endoftext|>"]
    assert tok.vocab_size == len(vocab)
    assert tok.pad == -1  # GPT-2 has no pad token: megatron-core's sentinel


def test_gpt2_bpe_matches_brute_force(gpt2_files):
    vocab_file, merge_file, _ = gpt2_files
    tok = GPT2BPETokenizer(vocab_file, merge_file)
    ranks = {p: i for i, p in enumerate(MERGES)}
    rng = random.Random(0)
    for _ in range(300):
        word = "".join(rng.choice("helo\u0120") for _ in range(rng.randint(1, 12)))
        assert list(tok.bpe(word)) == _reference_bpe(word, ranks), word


def test_gpt2_bpe_round_trip_is_lossless(gpt2_files):
    vocab_file, merge_file, _ = gpt2_files
    tok = GPT2BPETokenizer(vocab_file, merge_file)
    text = "def f(x):\n\treturn x  ** 2  # ok\r\n\nnaïve café 日本語 🙂 x² _under_score 'll 's"
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges did fire


def test_gpt2_errors(tmp_path, gpt2_files):
    vocab_file, merge_file, vocab = gpt2_files
    with pytest.raises(ConfigError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file)
    with pytest.raises(DataError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "nope.json"), merge_file=merge_file)
    no_eod = tmp_path / "v2.json"
    no_eod.write_text(json.dumps({k: v for k, v in vocab.items() if k != "<|endoftext|>"}))
    with pytest.raises(DataError, match="endoftext"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(no_eod), merge_file=merge_file)


def test_gpt2_files_that_do_not_fit_fail_at_load_naming_the_file(tmp_path, gpt2_files):
    vocab_file, merge_file, vocab = gpt2_files

    def write(name, text=None, data=None):
        path = tmp_path / name
        path.write_bytes(data) if data is not None else path.write_text(text, encoding="utf-8")
        return str(path)

    neg, dup = (
        write("neg.json", json.dumps({**vocab, "zz": -3})),
        write("dup.json", json.dumps({**vocab, "zz": vocab["he"]})),
    )
    listed = write("list.json", "[1, 2]")
    binary = write("bin.txt", data=b"#version: 0.2\n\xff\xfe l\n")
    foreign = write("foreign.txt", "#version: 0.2\nl l\nx q\n")
    cases = [  # (vocab file, merges file, the file the error must name, message)
        (neg, merge_file, neg, r"token 'zz' has id -3; every id must be an int >= 0"),
        (dup, merge_file, dup, r"tokens 'he' and 'zz' share id"),
        (listed, merge_file, listed, r"holds a JSON list"),
        (vocab_file, binary, binary, r"is not UTF-8 text"),
        (vocab_file, foreign, foreign, r"line 3: merge 'x q' makes 'xq', which --vocab-file .* lacks: the two files"),
    ]
    for vocab_path, merges_path, named, message in cases:
        with pytest.raises(DataError, match=message) as e:
            build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_path, merge_file=merges_path)
        assert repr(named) in str(e.value)


# --------------------------------------------------------------------------- Null / errors
def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=10)
    assert tok.tokenize("3 1\n4  1 5") == [3, 1, 4, 1, 5]
    assert tok.detokenize([3, 1, 4]) == "3 1 4"
    assert tok.eod == 10 and tok.vocab_size == 11
    assert tok.pad not in (tok.eod,)
    with pytest.raises(DataError, match="--vocab-size"):
        tok.tokenize("3 10")
    with pytest.raises(ConfigError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="--tokenizer-type 'Bogus'.*SentencePieceTokenizer"):
        build_tokenizer("Bogus")
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(DataError, match="--tokenizer-model.*no such file"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    for name, data in [("garbage.model", b"not a model"), ("empty.model", b"")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=f"--tokenizer-model '.*{name}' is not a valid SentencePiece model"):
            build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / name))


def test_huggingface_without_package_says_how_to_install(tmp_path, monkeypatch):
    import sys

    for package in ("tokenizers", "transformers"):  # hidden: both are installed with the pinned set
        monkeypatch.setitem(sys.modules, package, None)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="pip install tokenizers"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))


# --------------------------------------------------------------------------- SentencePiece
CODE = '''class Stack:
    """A LIFO stack."""

    def __init__(self):
        self._items = []

    def push(self, item):
        # append at the end
        self._items.append(item)

    def pop(self):
\t\treturn self._items.pop()
'''


def _corpus(n=120):
    rng = random.Random(1)
    words = "the stack push pop item list append return value class def self init queue".split()
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        docs.append(f"Document {i}: {body}\n\n{CODE if i % 3 == 0 else body.upper()}")
    return docs


def test_sentencepiece_train_round_trip_and_special_ids(tmp_path):
    model = train_sentencepiece(_corpus(), SentencePieceTrainConfig(str(tmp_path / "sp"), vocab_size=400))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert (tok.eod, tok.pad, tok.bos) == (2, 3, 1)
    assert tok.vocab_size <= 400
    for text in (CODE, "  leading spaces\n\n\ttab and ünïcödé ✓\n"):
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text  # whitespace and newlines survive
    fp = tok.fingerprint()
    assert fp["vocab_size"] == tok.vocab_size and fp["eod"] == 2 and len(fp["tokenizer_sha256"]) == 64


def test_train_tokenizer_tool_is_deterministic(tmp_path):
    tool = train_tokenizer
    data = tmp_path / "data"
    data.mkdir()
    docs = _corpus(200)
    for name, part in (("a", docs[:100]), ("b", docs[100:])):
        with open(data / f"{name}.jsonl", "w") as f:
            for d in part:
                f.write(json.dumps({"text": d, "other": d[:10]}) + "\n")
            f.write("{broken\n")
    common = ["--input", str(data), "--vocab-size", "400", "--sample-docs", "60"]
    models = []
    for run, seed in (("r1", 7), ("r2", 7), ("r3", 8)):
        assert tool.main(common + ["--model-prefix", str(tmp_path / run / "spm"), "--seed", str(seed)]) == 0
        models.append((tmp_path / run / "spm.model").read_bytes())
    assert models[0] == models[1]
    assert models[0] != models[2]  # another seed samples other documents
    # BPE works too, and a missing key is a clear error.
    assert tool.main(common + ["--model-prefix", str(tmp_path / "bpe" / "spm"), "--model-type", "bpe"]) == 0
    assert tool.main(common + ["--model-prefix", str(tmp_path / "x" / "spm"), "--json-keys", "nope"]) == 2


def test_train_config_validation():
    with pytest.raises(ConfigError, match="--vocab-size"):
        SentencePieceTrainConfig("x", vocab_size=100)
    with pytest.raises(ConfigError, match="--model-type"):
        SentencePieceTrainConfig("x", model_type="word")
