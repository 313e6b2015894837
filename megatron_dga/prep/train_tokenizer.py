"""SentencePiece training: the library of tools/train_tokenizer.py (its command line:
megatron_dga/cli/train_tokenizer.py) and of the embedded default corpus."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import atomic_write_bytes
from megatron_dga.prep.inputs import iter_line_batches, parse_line
from megatron_dga.prep.progress import Progress


# --------------------------------------------------------------------------- SentencePiece training
@dataclass
class SentencePieceTrainConfig:
    """Settings of ``train_sentencepiece``."""

    model_prefix: str
    """Output path without extension; writes ``<model_prefix>.model`` and ``.vocab``."""
    vocab_size: int = 4096
    """Number of pieces, special and byte pieces included."""
    model_type: str = "unigram"
    """``unigram`` or ``bpe``."""
    max_sentence_length: int = 16384
    """Longest training sentence in bytes; longer documents are cut at a character boundary."""
    character_coverage: float = 0.9995
    """Fraction of characters covered by single-character pieces (the rest: byte fallback)."""
    num_threads: int = 1
    """Trainer threads. The learned model depends on it: keep it fixed for reproducibility."""
    input_sentence_size: int = 0
    """Sentences to train on: a uniform sample of this many (reservoir sampling with ``seed``, then
    shuffled), so training time and memory stay bounded whatever the corpus size; 0 trains on every
    sentence, in the given order. (SentencePiece's own sampler is not used: it ignores
    ``set_random_generator_seed`` in sentencepiece 0.2 and draws a new sample in every process.)"""
    seed: int = 1234
    """Seed of the sentence sample (with ``input_sentence_size``)."""
    minloglevel: int = 2
    """SentencePiece's own log level on stderr: 0 info (its progress: loading, seed pieces, each EM
    round), 1 warnings, 2 errors (library callers stay quiet)."""
    seed_pieces: int = 200_000
    """Unigram seed sentencepiece size (smaller is faster on small corpora)."""
    hard_vocab_limit: bool = False
    """If False, a corpus too small for ``vocab_size`` yields a smaller vocabulary, not an error."""
    extra: dict = field(default_factory=dict)
    """Further ``SentencePieceTrainer`` keyword arguments (override the defaults here)."""

    def __post_init__(self):
        if self.model_type not in ("unigram", "bpe"):
            raise ConfigError(f"--model-type {self.model_type!r}: choose 'unigram' or 'bpe'.")
        if int(self.vocab_size) < 300:
            raise ConfigError(
                f"--vocab-size {self.vocab_size} is too small: 256 byte-fallback pieces and "
                "the special pieces need room. Use >= 300."
            )
        if self.max_sentence_length < 16:
            raise ConfigError(f"--max-sentence-length {self.max_sentence_length} must be >= 16.")
        if not 0.5 < self.character_coverage <= 1.0:
            raise ConfigError(f"--character-coverage {self.character_coverage} must be in (0.5, 1].")
        if self.num_threads < 1:
            raise ConfigError(f"--num-threads {self.num_threads} must be >= 1.")
        if self.input_sentence_size < 0:
            raise ConfigError(
                f"--input-sentence-size {self.input_sentence_size} must be >= 0 (0 keeps every sentence)."
            )
        if self.minloglevel not in (0, 1, 2, 3):
            raise ConfigError(f"minloglevel {self.minloglevel} must be 0 (info), 1, 2 or 3 (fatal only).")


def _cut_utf8(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")


def sample_sentences(sentences: Iterable[str], size: int, seed: int) -> list:
    """A uniform sample of ``size`` items of a stream (all of them if fewer), shuffled.

    Reservoir sampling: one pass, memory for ``size`` items, a deterministic function of the
    stream and ``seed``.
    """
    rng = random.Random(seed)
    reservoir: list = []
    for seen, sentence in enumerate(sentences):
        if seen < size:
            reservoir.append(sentence)
        else:
            j = rng.randrange(seen + 1)
            if j < size:
                reservoir[j] = sentence
    rng.shuffle(reservoir)
    return reservoir


def train_sentencepiece(texts: Iterable[str], config: SentencePieceTrainConfig) -> str:
    """Train a SentencePiece model on ``texts`` (sentences: whole documents or lines, newlines kept).

    Special ids: unk=0, bos=1, eos=2 (used as ``eod``), pad=3. The model is lossless on
    code and prose: identity normalisation, whitespace runs kept, ``"\\n"`` is a piece,
    unseen characters fall back to bytes. The output is a deterministic function of the
    texts (their order included) and the config. ``texts`` is consumed once, as a stream:
    with ``config.input_sentence_size`` only a bounded sample is kept, so memory does not
    grow with the corpus.

    Args:
        texts: training sentences, in a deterministic order (any iterable, e.g. a generator).
        config: see ``SentencePieceTrainConfig``.

    Returns:
        The path of the written ``.model`` file.
    """
    import sentencepiece as spm

    out_dir = os.path.dirname(os.path.abspath(config.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    sentences = (_cut_utf8(t, config.max_sentence_length) for t in texts if t and t.strip())
    if config.input_sentence_size:
        sentences = sample_sentences(sentences, config.input_sentence_size, config.seed)
    else:
        sentences = list(sentences)
    if not sentences:
        raise DataError("train_sentencepiece: no non-empty training text. Check --input/--json-keys.")
    model = io.BytesIO()
    kwargs = dict(
        vocab_size=int(config.vocab_size),
        model_type=config.model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=["\n", "\t"],
        character_coverage=config.character_coverage,
        max_sentence_length=config.max_sentence_length,
        input_sentence_size=0,  # sampled above, reproducibly
        shuffle_input_sentence=False,
        num_threads=config.num_threads,
        seed_sentencepiece_size=config.seed_pieces,
        hard_vocab_limit=config.hard_vocab_limit,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=config.minloglevel,
    )
    kwargs.update(config.extra)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **kwargs)
    except RuntimeError as exc:
        raise DataError(f"SentencePiece training failed: {exc}. With a small corpus lower --vocab-size.") from None
    proto = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    model_path = config.model_prefix + ".model"
    vocab_path = config.model_prefix + ".vocab"
    atomic_write_bytes(model_path, proto)
    lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())]
    atomic_write_bytes(vocab_path, "".join(lines).encode("utf-8"))
    return model_path


class InputStats:
    """What the sentence stream has read so far (for the summary line and the bad-line report)."""

    def __init__(self, started: float, sample_size: int):
        self.started = started
        self.sample_size = sample_size
        self.docs = 0
        self.lines = 0
        self.bytes = 0
        self.bad: dict = {}


def document_lines(texts) -> Iterator[str]:
    """The non-blank lines of each text (the training sentences)."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def stream_sentences(
    files: Sequence[str], json_keys: Sequence[str], stats: InputStats, progress: Progress
) -> Iterator[str]:
    """Every non-blank line of every document of ``files``, read once, with progress."""
    keys = tuple(json_keys)
    for batch in iter_line_batches(files):
        docs = nbytes = 0
        for _, _, raw in batch:
            nbytes += len(raw)
            status, texts = parse_line(raw, keys)
            if status != "ok":
                stats.bad[status] = stats.bad.get(status, 0) + 1
                continue
            docs += 1
            for line in document_lines(texts):
                stats.lines += 1
                yield line
        stats.docs += docs
        stats.bytes += nbytes
        progress.update(nbytes, docs=docs)
    progress.close()
    kept = f"{min(stats.lines, stats.sample_size):,} sampled" if stats.sample_size else "all"
    print(
        f"[inputs        +{time.monotonic() - stats.started:6.1f}s] read {stats.docs:,} documents, {stats.lines:,} "
        f"lines, {stats.bytes / 1e6:.1f} MB; training on {kept} lines",
        file=sys.stderr,
        flush=True,
    )


_SPM_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] (.*)$")
_SPM_DROP = ("Adding meta_piece", "All log messages before absl::InitializeLog()")


@contextlib.contextmanager
def condensed_sentencepiece_log(started: float):
    """Show SentencePiece's own stderr log (it writes to fd 2 from C++) one line per event,
    prefixed with the elapsed time; drop its config dump and its 260 "Adding meta_piece" lines.
    Everything else written to stderr meanwhile passes through unchanged."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        in_spec = False
        with os.fdopen(read_end, "r", errors="replace") as src, os.fdopen(os.dup(saved), "w") as dst:
            for line in src:
                match = _SPM_LINE.match(line)
                if match is None:
                    if in_spec:  # the multi-line trainer/normalizer spec dump
                        in_spec = not line.startswith("denormalizer_spec")
                    elif line.strip() and not any(d in line for d in _SPM_DROP):  # blank: the "\\n" piece's line
                        dst.write(line)
                else:
                    message = match.group(1)
                    in_spec = message.startswith("Starts training with")
                    if not any(d in message for d in _SPM_DROP):
                        dst.write(
                            f"[sentencepiece +{time.monotonic() - started:6.1f}s] "
                            f"{'starts training' if in_spec else message}\n"
                        )
                dst.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    # Python's own writes (a tqdm bar redraws without newlines) go straight to the terminal.
    python_stderr, sys.stderr = sys.stderr, os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield
    finally:
        sys.stderr.close()
        sys.stderr = python_stderr
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF
        os.close(saved)
        thread.join(timeout=10)
