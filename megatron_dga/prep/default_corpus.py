"""The embedded default corpus: a real multi-domain text corpus built from the Python installation.

Nothing is downloaded. The running interpreter's standard library and site-packages supply the
text, so a fresh machine with the project venv can always build it:

===================== ===================================================================
domain                source
===================== ===================================================================
stdlib_code           stdlib ``.py`` sources, chunked at top-level statement boundaries
docstrings            module/class/function docstrings of the stdlib (``ast``), with names
comments              ``#`` comment blocks of the stdlib sources
c_module_docs         ``__doc__`` of the interpreter's built-in C modules and their members
package_descriptions  long descriptions in site-packages ``*.dist-info/METADATA``
licenses              the Python licence and the licence files of installed packages
manuals               man pages under ``sys.base_prefix/share/man`` and IDLE's text/help
test_data             text fixtures of the stdlib test suite (e-mail messages, configs, ...)
language_reference    ``pydoc_data.topics`` (the language reference): the TARGET domain
===================== ===================================================================

Optional domains (``manuals``, ``test_data``, ``licenses``, ``package_descriptions``) are
dropped with a log message when an installation has too little of them (e.g. images that
strip the test suite); at least 3 generic domains are required.

The target domain is held out of the generic pool entirely: its documents are split *by
topic* into ``targets/<name>.jsonl`` (the specific set DGA aligns to, a few hundred documents)
and ``targets/<name>_eval.jsonl``; no generic document equals a target document (global
dedupe on whitespace-normalised text).

Documents are 200-4000 characters (paragraph-greedy chunking towards ``chunk_chars``); domain
sizes are capped by seeded sampling, so the whole build (extraction, a SentencePiece tokenizer,
shards for every domain) takes well under a minute on 2 cores and a few MB of disk.

``prepare_default_data(out_dir, vocab_size, seed)`` is the complete recipe. Layout::

    out_dir/manifest.json                      # config + SHA-256 of every file below
    out_dir/corpus/domains/<domain>.jsonl      # {"text", "domain", "source"} per line
    out_dir/corpus/targets/<target>.jsonl, <target>_eval.jsonl
    out_dir/tokenizer/spm.model, spm.vocab
    out_dir/shards/domains/<domain>_text_document.{bin,idx,json}
    out_dir/shards/targets/<target>_text_document.*, <target>_eval_text_document.*

A second call with the same arguments verifies the manifest hashes and returns in well under a
second. Builds are deterministic: two builds on the same machine give byte-identical corpus,
tokenizer and shard files (shard sidecars record absolute paths, which differ between
output directories). A file lock serialises concurrent callers; in distributed jobs call it on
one rank and barrier.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import html.parser
import json
import logging
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Optional

from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import atomic_write, atomic_write_json, sha256_files

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1
MANIFEST_FORMAT = "megatron-dga/default-data-v1"
TARGET_DOMAIN = "language_reference"
GENERIC_DOMAINS = (
    "stdlib_code",
    "docstrings",
    "comments",
    "c_module_docs",
    "package_descriptions",
    "licenses",
    "manuals",
    "test_data",
)
_REQUIRED = ("stdlib_code", "docstrings", "comments", "c_module_docs")
_OWNED_NAMES = ("corpus", "tokenizer", "shards", "manifest.json", ".lock")


@dataclass
class CorpusConfig:
    """Sizes and seed of the default corpus."""

    seed: int = 1234
    """Seed of every sampling decision (file order, domain caps, target split)."""
    max_docs_per_domain: int = 400
    """Cap on documents per generic domain (seeded sample when more are available)."""
    min_docs_per_domain: int = 20
    """Optional domains with fewer documents are dropped."""
    min_chars: int = 200
    """Shortest document kept."""
    max_chars: int = 4000
    """Longest document; longer paragraphs are cut at line boundaries."""
    chunk_chars: int = 1500
    """Chunking target: paragraphs are joined until the next one would pass it."""
    target_train_docs: int = 200
    """Documents of the specific (target) training set."""
    target_eval_docs: int = 100
    """Documents of the target evaluation set (disjoint topics from the training set)."""

    def __post_init__(self):
        if not 0 < self.min_chars <= self.chunk_chars <= self.max_chars:
            raise ConfigError(
                f"need 0 < min_chars ({self.min_chars}) <= chunk_chars ({self.chunk_chars}) "
                f"<= max_chars ({self.max_chars}); fix the corpus sizes."
            )
        for name in ("max_docs_per_domain", "min_docs_per_domain", "target_train_docs", "target_eval_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"CorpusConfig.{name} = {getattr(self, name)} must be >= 1.")
        if self.min_docs_per_domain > self.max_docs_per_domain:
            raise ConfigError(
                f"min_docs_per_domain ({self.min_docs_per_domain}) > max_docs_per_domain "
                f"({self.max_docs_per_domain}); lower the minimum."
            )


@dataclass(frozen=True)
class Document:
    """One corpus document."""

    text: str
    """The text (``min_chars`` to ``max_chars`` characters)."""
    source: str
    """Where it came from: a path relative to its root, a module or a topic name."""


@dataclass
class Corpus:
    """The extracted corpus, before writing."""

    domains: dict[str, list[Document]]
    """Generic domains, in ``GENERIC_DOMAINS`` order (dropped ones absent)."""
    target_name: str
    """Name of the target domain."""
    target_train: list[Document]
    """The specific set."""
    target_eval: list[Document]
    """Its evaluation split."""


# --------------------------------------------------------------------------- text utilities
def _normalise(text: str) -> str:
    return " ".join(text.split())


def _fingerprint(text: str) -> str:
    return hashlib.sha1(_normalise(text).encode("utf-8")).hexdigest()


def _split_long(paragraph: str, max_chars: int) -> Iterator[str]:
    """Cut a paragraph longer than ``max_chars`` at line boundaries (hard cut as a last resort)."""
    buf = ""
    for line in paragraph.splitlines(keepends=True):
        while len(line) > max_chars:
            if buf:
                yield buf
                buf = ""
            yield line[:max_chars]
            line = line[max_chars:]
        if len(buf) + len(line) > max_chars:
            yield buf
            buf = ""
        buf += line
    if buf:
        yield buf


def chunk_text(text: str, cfg: CorpusConfig) -> list[str]:
    """Split ``text`` into documents of ``min_chars``..``max_chars`` characters.

    Paragraphs (blank-line separated) are joined greedily while the chunk stays under
    ``chunk_chars``; chunks shorter than ``min_chars`` are dropped.
    """
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if p.strip()]
    pieces: list[str] = []
    for p in paragraphs:
        pieces.extend(_split_long(p.strip("\n"), cfg.max_chars) if len(p) > cfg.max_chars else [p.strip("\n")])
    chunks: list[str] = []
    buf = ""
    for piece in pieces:
        if buf and len(buf) + 2 + len(piece) > cfg.chunk_chars:
            chunks.append(buf)
            buf = ""
        buf = piece if not buf else buf + "\n\n" + piece
    if buf:
        chunks.append(buf)
    return [c for c in chunks if cfg.min_chars <= len(c.strip()) and len(c) <= cfg.max_chars]


def _read_text(path: str, limit: int = 2_000_000) -> Optional[str]:
    try:
        if os.path.getsize(path) > limit:
            return None
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if "\x00" in text:
        return None
    printable = sum(c.isprintable() or c in "\n\t" for c in text[:5000])
    if printable < 0.97 * min(len(text), 5000):
        return None
    return text


# --------------------------------------------------------------------------- locations
def stdlib_dir() -> str:
    """The standard library of the interpreter behind this venv (``sys.base_prefix``)."""
    path = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
    if not os.path.isdir(path):
        path = os.path.dirname(os.__file__)
    return path


def site_packages_dirs() -> list[str]:
    """site-packages of the venv and of the base interpreter, existing ones, deduplicated."""
    seen, out = set(), []
    for p in [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")] + [
        p for p in sys.path if p.endswith(("site-packages", "dist-packages"))
    ]:
        if p and os.path.isdir(p) and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append(p)
    return sorted(out)


def _stdlib_py_files(root: str) -> list[str]:
    # encodings/ is mostly generated code tables; tests live in their own domain.
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "encodings"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(os.path.relpath(p, root) for p in out)


def _shuffled(items: list, seed: int, salt: str) -> list:
    items = list(items)
    random.Random(f"{seed}:{salt}").shuffle(items)
    return items


# --------------------------------------------------------------------------- extractors
# Each extractor yields (text, source) candidates in a deterministic order; the builder
# chunks, dedupes and caps them. Extractors stop early via the ``enough`` callback so large
# installations cost no more time than small ones.
Extractor = Callable[[CorpusConfig, Callable[[], bool]], Iterator[tuple[str, str]]]


def _code_chunks(source: str, tree: ast.Module, cfg: CorpusConfig) -> list[str]:
    """Group consecutive top-level statements into chunks (a def never straddles two)."""
    lines = source.splitlines(keepends=True)
    spans = []
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        spans.append((start, node.end_lineno))
    chunks, buf = [], ""
    for i, (start, end) in enumerate(spans):
        # Up to the next statement, so comments between definitions stay with the code.
        nxt = spans[i + 1][0] if i + 1 < len(spans) else len(lines)
        text = "".join(lines[start : max(end, nxt)]).rstrip("\n") + "\n"
        if buf and len(buf) + len(text) > cfg.chunk_chars:
            chunks.append(buf)
            buf = ""
        if len(text) > cfg.max_chars:
            chunks.extend(_split_long(text, cfg.max_chars))
            continue
        buf = text if not buf else buf + "\n" + text
    if buf:
        chunks.append(buf)
    return chunks


def _parse(path: str) -> Optional[tuple[str, ast.Module]]:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return text, ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return None


def extract_stdlib_code(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    root = stdlib_dir()
    for rel in _shuffled(_stdlib_py_files(root), cfg.seed, "stdlib_code"):
        if enough():
            return
        parsed = _parse(os.path.join(root, rel))
        if parsed:
            for chunk in _code_chunks(parsed[0], parsed[1], cfg):
                yield chunk, rel


def extract_docstrings(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    root = stdlib_dir()
    for rel in _shuffled(_stdlib_py_files(root), cfg.seed, "docstrings"):
        if enough():
            return
        parsed = _parse(os.path.join(root, rel))
        if not parsed:
            continue
        module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        parts = []

        def visit(node, qual):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                parts.append(f"{qual}\n{doc}")
            for child in getattr(node, "body", []):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, f"{qual}.{child.name}")

        visit(parsed[1], module)
        if parts:
            yield "\n\n".join(parts), rel


def extract_comments(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    root = stdlib_dir()
    for rel in _shuffled(_stdlib_py_files(root), cfg.seed, "comments"):
        if enough():
            return
        text = _read_text(os.path.join(root, rel))
        if text is None:
            continue
        # Whole-line comments only (a line scan: tokenize is 10x slower on the whole stdlib).
        blocks, cur = [], []
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                body = stripped.lstrip("#").strip()
                if body and not body.startswith(("!", "-*-", "type:", "noqa", "pragma")):
                    cur.append(body)
            elif cur:
                blocks.append("\n".join(cur))
                cur = []
        if cur:
            blocks.append("\n".join(cur))
        blocks = [b for b in blocks if len(b) >= 40]
        if blocks:
            yield "\n\n".join(blocks), rel


def extract_c_module_docs(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    import importlib

    # Built-in modules are compiled into the interpreter: importing them has no side effects.
    for name in sorted(sys.builtin_module_names):
        if enough():
            return
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts = []
        if isinstance(mod.__doc__, str) and len(mod.__doc__) >= 40:
            parts.append(f"{name}\n{mod.__doc__.strip()}")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            # Dunders and re-exported objects (e.g. __loader__) would repeat across modules.
            if attr.startswith("__") or getattr(obj, "__module__", name) != name:
                continue
            doc = getattr(obj, "__doc__", None) if callable(obj) else None
            if isinstance(doc, str) and len(doc) >= 40:
                parts.append(f"{name}.{attr}\n{doc.strip()}")
            if isinstance(obj, type) and obj.__module__ == mod.__name__:
                for meth in sorted(vars(obj)):
                    mdoc = getattr(vars(obj)[meth], "__doc__", None)
                    if not meth.startswith("__") and isinstance(mdoc, str) and len(mdoc) >= 40:
                        parts.append(f"{name}.{attr}.{meth}\n{mdoc.strip()}")
        if parts:
            yield "\n\n".join(parts), name


def _dist_info_dirs() -> list[str]:
    out = []
    for sp in site_packages_dirs():
        try:
            names = sorted(os.listdir(sp))
        except OSError:
            continue
        out.extend(os.path.join(sp, n) for n in names if n.endswith(".dist-info"))
    return out


def extract_package_descriptions(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    for d in _dist_info_dirs():
        if enough():
            return
        text = _read_text(os.path.join(d, "METADATA"))
        if not text:
            continue
        head, _, body = text.partition("\n\n")
        summary = re.search(r"^Summary: (.*)$", head, re.M)
        name = re.search(r"^Name: (.*)$", head, re.M)
        if not body.strip():
            continue
        title = f"{name.group(1) if name else os.path.basename(d)}: {summary.group(1) if summary else ''}"
        yield f"{title.strip()}\n\n{body}", os.path.basename(d)


def extract_licenses(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    base = os.path.join(stdlib_dir(), "LICENSE.txt")
    if os.path.isfile(base):
        text = _read_text(base)
        if text:
            yield text, "python/LICENSE.txt"
    for d in _dist_info_dirs():
        if enough():
            return
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for f in sorted(filenames):
                if re.match(r"(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", f, re.I):
                    text = _read_text(os.path.join(dirpath, f))
                    if text:
                        yield text, os.path.relpath(os.path.join(dirpath, f), os.path.dirname(d))


class _HTMLText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("p", "div", "section", "h1", "h2", "h3", "h4", "li", "dt", "dd", "pre", "br"):
            self.parts.append("\n\n" if tag not in ("li", "br", "dd") else "\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _html_to_text(text: str) -> str:
    parser = _HTMLText()
    parser.feed(text)
    out = "".join(parser.parts)
    out = re.sub(r"[ \t]+\n", "\n", out)
    return re.sub(r"\n{3,}", "\n\n", out)


_ROFF_INLINE = {".B", ".I", ".BR", ".RB", ".IR", ".RI", ".BI", ".IB", ".SM", ".SB"}


def _roff_to_text(text: str) -> str:
    """Plain text of a man page: section headings kept, font macros folded into the prose."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            if macro in (".SH", ".SS"):
                lines.extend(["", rest.strip('"'), ""])
            elif macro in (".PP", ".LP", ".P", ".TP", ".IP", ".sp", ".br"):
                lines.append("")
            elif macro in _ROFF_INLINE and rest:
                # Alternating-font macros join their arguments without spaces (".BR -x ," -> "-x,").
                words = re.findall(r'"[^"]*"|\S+', rest)
                joiner = "" if len(macro) == 3 else " "
                piece = joiner.join(w.strip('"') for w in words)
                if lines and lines[-1]:
                    lines[-1] += " " + piece
                else:
                    lines.append(piece)
            continue
        if lines and lines[-1] and not line.startswith((" ", "\t")):
            lines[-1] += " " + line
        else:
            lines.append(line)
    out = "\n".join(lines)
    out = re.sub(r"\\f[BIRP]", "", out)
    out = out.replace("\\-", "-").replace("\\(em", "--").replace("\\(hy", "-").replace("\\e", "\\").replace("\\&", "")
    return re.sub(r"\n{3,}", "\n\n", out)


def extract_manuals(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    mandir = os.path.join(sys.base_prefix, "share", "man")
    if os.path.isdir(mandir):
        for dirpath, dirnames, filenames in sorted(os.walk(mandir)):
            dirnames.sort()
            for f in sorted(filenames):
                if re.search(r"\.\d$", f):
                    text = _read_text(os.path.join(dirpath, f))
                    if text:
                        yield _roff_to_text(text), os.path.relpath(os.path.join(dirpath, f), mandir)
    idle = os.path.join(stdlib_dir(), "idlelib")
    if os.path.isdir(idle):
        for f in sorted(os.listdir(idle)):
            if enough():
                return
            path = os.path.join(idle, f)
            if f.endswith(".txt") or f == "help.html":
                text = _read_text(path)
                if text:
                    yield (_html_to_text(text) if f.endswith(".html") else text), f"idlelib/{f}"


def extract_test_data(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    root = os.path.join(stdlib_dir(), "test")
    if not os.path.isdir(root):
        return
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in filenames:
            if f.endswith((".txt", ".cfg", ".ini", ".rst", ".eml", ".html", ".xml", ".csv")):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    for rel in _shuffled(sorted(found), cfg.seed, "test_data"):
        if enough():
            return
        text = _read_text(os.path.join(root, rel), limit=200_000)
        if text:
            yield text, f"test/{rel}"


def extract_language_reference(cfg: CorpusConfig, enough) -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            "the default corpus needs pydoc_data.topics (part of the standard library), which "
            "this Python installation lacks. Install the full stdlib (e.g. python3-doc / a "
            "non-slim image) or pass your own data with --data-path."
        ) from None
    for name in sorted(topics):
        yield topics[name], name


EXTRACTORS: dict[str, Extractor] = {
    "stdlib_code": extract_stdlib_code,
    "docstrings": extract_docstrings,
    "comments": extract_comments,
    "c_module_docs": extract_c_module_docs,
    "package_descriptions": extract_package_descriptions,
    "licenses": extract_licenses,
    "manuals": extract_manuals,
    "test_data": extract_test_data,
    TARGET_DOMAIN: extract_language_reference,
}


# --------------------------------------------------------------------------- corpus building
def _collect(name: str, cfg: CorpusConfig, seen: set[str], limit: Optional[int]) -> list[Document]:
    """Chunk and dedupe one domain's candidates; stop once ``limit`` documents are found."""
    docs: list[Document] = []
    enough = (lambda: len(docs) >= limit) if limit is not None else (lambda: False)
    for text, source in EXTRACTORS[name](cfg, enough):
        # Code arrives already chunked at statement boundaries; prose is chunked by paragraph.
        chunks = [text] if name == "stdlib_code" else chunk_text(text, cfg)
        for chunk in chunks:
            if not cfg.min_chars <= len(chunk.strip()) <= cfg.max_chars:
                continue
            fp = _fingerprint(chunk)
            if fp in seen:
                continue
            seen.add(fp)
            docs.append(Document(chunk, source))
    return docs


def _cap(docs: list[Document], n: int, seed: int, salt: str) -> list[Document]:
    if len(docs) <= n:
        return docs
    keep = sorted(random.Random(f"{seed}:{salt}:cap").sample(range(len(docs)), n))
    return [docs[i] for i in keep]


def build_corpus(cfg: CorpusConfig) -> Corpus:
    """Extract, chunk, dedupe, cap and split the default corpus (deterministic in ``cfg``)."""
    seen: set[str] = set()
    # The target first, so generic domains drop any document that duplicates a target one.
    target_docs = _collect(TARGET_DOMAIN, cfg, seen, None)
    by_topic: dict[str, list[Document]] = {}
    for d in target_docs:
        by_topic.setdefault(d.source, []).append(d)
    topics = _shuffled(sorted(by_topic), cfg.seed, "target_split")
    eval_docs: list[Document] = []
    train_docs: list[Document] = []
    for t in topics:
        (eval_docs if len(eval_docs) < cfg.target_eval_docs else train_docs).extend(by_topic[t])
    eval_docs = _cap(eval_docs, cfg.target_eval_docs, cfg.seed, "target_eval")
    train_docs = _cap(train_docs, cfg.target_train_docs, cfg.seed, "target_train")
    if len(train_docs) < min(cfg.target_train_docs, 50) or not eval_docs:
        raise DataError(
            f"default corpus: the target domain {TARGET_DOMAIN!r} gave only {len(train_docs)} "
            f"train / {len(eval_docs)} eval documents; lower target_train_docs/target_eval_docs."
        )
    domains: dict[str, list[Document]] = {}
    # Oversample x2 before capping so the seeded cap, not the extraction order, picks documents.
    for name in GENERIC_DOMAINS:
        docs = _cap(_collect(name, cfg, seen, 2 * cfg.max_docs_per_domain), cfg.max_docs_per_domain, cfg.seed, name)
        if len(docs) < cfg.min_docs_per_domain:
            if name in _REQUIRED:
                raise DataError(
                    f"default corpus: required domain {name!r} has {len(docs)} documents "
                    f"(< {cfg.min_docs_per_domain}); the standard library at {stdlib_dir()!r} "
                    "looks incomplete."
                )
            logger.info("default corpus: dropping domain %s (%d documents)", name, len(docs))
            continue
        domains[name] = docs
    return Corpus(domains, TARGET_DOMAIN, train_docs, eval_docs)


def _write_jsonl(path: str, domain: str, docs: Iterable[Document]) -> None:
    def write(f):
        for d in docs:
            f.write(json.dumps({"text": d.text, "domain": domain, "source": d.source}, ensure_ascii=False))
            f.write("\n")

    atomic_write(path, write, binary=False)


def write_corpus(corpus: Corpus, corpus_dir: str) -> dict[str, str]:
    """Write ``domains/<name>.jsonl`` and ``targets/<target>[_eval].jsonl``; return name -> path."""
    paths = {}
    os.makedirs(os.path.join(corpus_dir, "domains"), exist_ok=True)
    os.makedirs(os.path.join(corpus_dir, "targets"), exist_ok=True)
    for name, docs in corpus.domains.items():
        paths[name] = os.path.join(corpus_dir, "domains", f"{name}.jsonl")
        _write_jsonl(paths[name], name, docs)
    for suffix, docs in (("", corpus.target_train), ("_eval", corpus.target_eval)):
        key = corpus.target_name + suffix
        paths[key] = os.path.join(corpus_dir, "targets", f"{key}.jsonl")
        _write_jsonl(paths[key], corpus.target_name, docs)
    return paths


# --------------------------------------------------------------------------- full recipe
@dataclass(frozen=True)
class DefaultData:
    """Paths of a prepared default dataset (all absolute)."""

    root: str
    """The output directory."""
    manifest: str
    """``manifest.json``: config, per-file SHA-256 and a content hash."""
    domains: tuple[str, ...]
    """Generic domain names, in shard order."""
    domain_jsonl: dict
    """Generic domain -> its jsonl."""
    domain_prefixes: dict
    """Generic domain -> shard prefix (``.../<domain>_text_document``)."""
    target_name: str
    """Name of the specific set (the held-out domain)."""
    target_train_jsonl: str
    """Specific training set (jsonl)."""
    target_eval_jsonl: str
    """Specific evaluation set (jsonl)."""
    target_train_prefix: str
    """Shard prefix of the specific training set."""
    target_eval_prefix: str
    """Shard prefix of the specific evaluation set."""
    tokenizer_model: str
    """The SentencePiece model (``--tokenizer-type SentencePieceTokenizer``)."""
    vocab_size: int
    """The tokenizer's vocabulary size."""
    content_hash: str
    """SHA-256 over the relative paths and hashes of every file in the manifest."""


def _content_hash(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\t{files[rel]}\n".encode())
    return h.hexdigest()


def _result(root: str, manifest: dict) -> DefaultData:
    p = lambda rel: os.path.join(root, rel)
    t = manifest["target_name"]
    doms = tuple(manifest["domains"])
    return DefaultData(
        root=root,
        manifest=p("manifest.json"),
        domains=doms,
        domain_jsonl={d: p(f"corpus/domains/{d}.jsonl") for d in doms},
        domain_prefixes={d: p(f"shards/domains/{d}_text_document") for d in doms},
        target_name=t,
        target_train_jsonl=p(f"corpus/targets/{t}.jsonl"),
        target_eval_jsonl=p(f"corpus/targets/{t}_eval.jsonl"),
        target_train_prefix=p(f"shards/targets/{t}_text_document"),
        target_eval_prefix=p(f"shards/targets/{t}_eval_text_document"),
        tokenizer_model=p("tokenizer/spm.model"),
        vocab_size=int(manifest["vocab_size"]),
        content_hash=manifest["content_hash"],
    )


def _check_manifest(root: str, params: dict) -> Optional[dict]:
    """The manifest if it matches ``params`` and every listed file has its recorded hash."""
    path = os.path.join(root, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("params") != params:
        return None
    files = manifest.get("files", {})
    for rel, digest in files.items():
        full = os.path.join(root, rel)
        if not os.path.isfile(full) or sha256_files(full) != digest:
            return None
    if _content_hash(files) != manifest.get("content_hash"):
        return None
    return manifest


def _claim_dir(root: str) -> None:
    """Refuse to build into a directory holding files that are not ours."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"default data directory {root!r} is a file; pass a directory as --out.")
    if not os.path.isdir(root):
        os.makedirs(root, exist_ok=True)
        return
    foreign = [n for n in os.listdir(root) if n not in _OWNED_NAMES and not n.startswith(".staging-")]
    if foreign:
        raise DataError(
            f"default data directory {root!r} holds files the builder does not own "
            f"({sorted(foreign)[:5]}); pass an empty or new directory as --out."
        )


def prepare_default_data(
    out_dir: str,
    vocab_size: int = 2048,
    seed: int = 1234,
    corpus_config: Optional[CorpusConfig] = None,
    log: Optional[Callable[[str], None]] = None,
) -> DefaultData:
    """Build (or reuse) the default corpus, its tokenizer and its shards.

    Idempotent: when ``out_dir/manifest.json`` matches the arguments and every file still has
    its recorded SHA-256, returns at once without rebuilding.

    Args:
        out_dir: output directory (created; must be empty or a previous output of this function).
        vocab_size: SentencePiece vocabulary size (>= 300).
        seed: seed of every sampling decision; overrides ``corpus_config.seed``.
        corpus_config: corpus sizes; defaults to ``CorpusConfig()``.
        log: progress callback (default: ``logging.info``).

    Returns:
        ``DefaultData`` with the paths of everything built.

    Raises:
        ConfigError: invalid sizes. DataError: an unusable installation or output directory.
    """
    from megatron_dga.prep.train_tokenizer import SentencePieceTrainConfig

    log = log or logger.info
    cfg = corpus_config or CorpusConfig()
    cfg = CorpusConfig(**{**asdict(cfg), "seed": int(seed)})
    sp_cfg = SentencePieceTrainConfig(model_prefix="spm", vocab_size=int(vocab_size))  # validates
    params = {
        "builder_version": BUILDER_VERSION,
        "vocab_size": int(vocab_size),
        "corpus": asdict(cfg),
        "python": sys.version,
        "stdlib": stdlib_dir(),
    }
    root = os.path.abspath(out_dir)
    manifest = _check_manifest(root, params)
    if manifest is not None:
        return _result(root, manifest)
    _claim_dir(root)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = _check_manifest(root, params)  # another process may have built it meanwhile
            if manifest is None:
                manifest = _build(root, params, cfg, sp_cfg, log)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _result(root, manifest)


def _build(root: str, params: dict, cfg: CorpusConfig, sp_cfg, log) -> dict:
    from megatron_dga.prep.preprocess import PreprocessConfig, preprocess
    from megatron_dga.data.tokenizers import SentencePieceTokenizer, TokenizerSpec
    from megatron_dga.prep.train_tokenizer import SentencePieceTrainConfig, train_sentencepiece

    t0 = time.monotonic()
    staging = os.path.join(root, f".staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        log(f"[default data] extracting corpus from {stdlib_dir()} (seed {cfg.seed})")
        corpus = build_corpus(cfg)
        for name, docs in corpus.domains.items():
            log(f"[default data]   {name}: {len(docs)} docs, {sum(len(d.text) for d in docs) / 1e6:.2f} MB")
        log(
            f"[default data]   target {corpus.target_name}: {len(corpus.target_train)} train / "
            f"{len(corpus.target_eval)} eval docs"
        )
        write_corpus(corpus, os.path.join(staging, "corpus"))

        log(f"[default data] training SentencePiece (vocab {sp_cfg.vocab_size}) [{time.monotonic() - t0:.1f}s]")
        sample = [d.text for name in corpus.domains for d in _cap(corpus.domains[name], 120, cfg.seed, "tok:" + name)]
        sample += [d.text for d in _cap(corpus.target_train, 120, cfg.seed, "tok:target")]
        sp_cfg = SentencePieceTrainConfig(
            model_prefix=os.path.join(staging, "tokenizer", "spm"), vocab_size=sp_cfg.vocab_size
        )
        model = train_sentencepiece(sample, sp_cfg)
        tokenizer = SentencePieceTokenizer(model)

        log(f"[default data] writing shards [{time.monotonic() - t0:.1f}s]")
        final_model = os.path.join(root, "tokenizer", "spm.model")
        spec = TokenizerSpec("SentencePieceTokenizer", tokenizer_model=final_model)
        for sub in ("domains", "targets"):
            preprocess(
                PreprocessConfig(
                    input=os.path.join(staging, "corpus", sub),
                    output_prefix=os.path.join(staging, "shards", sub),
                    tokenizer=spec,
                    append_eod=True,
                    workers=1,
                    progress=False,
                ),
                tokenizer=tokenizer,
            )
        _fix_sidecars(staging, root)

        # Swap the finished build in; the manifest goes last, so a crash leaves no manifest.
        manifest_path = os.path.join(root, "manifest.json")
        if os.path.exists(manifest_path):
            os.unlink(manifest_path)
        for sub in ("corpus", "tokenizer", "shards"):
            shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
            os.replace(os.path.join(staging, sub), os.path.join(root, sub))
        files = {}
        for sub in ("corpus", "tokenizer", "shards"):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
                dirnames.sort()
                for f in sorted(filenames):
                    full = os.path.join(dirpath, f)
                    files[os.path.relpath(full, root)] = sha256_files(full)
        manifest = {
            "format": MANIFEST_FORMAT,
            "params": params,
            "domains": list(corpus.domains),
            "target_name": corpus.target_name,
            "vocab_size": tokenizer.vocab_size,
            "num_documents": {n: len(d) for n, d in corpus.domains.items()}
            | {corpus.target_name: len(corpus.target_train), corpus.target_name + "_eval": len(corpus.target_eval)},
            "files": files,
            "content_hash": _content_hash(files),
        }
        atomic_write_json(manifest_path, manifest, indent=2, sort_keys=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"[default data] done in {time.monotonic() - t0:.1f}s: {root}")
    return manifest


def _fix_sidecars(staging: str, root: str) -> None:
    """Point shard sidecars at the final locations (they were written inside the staging dir)."""
    shard_root = os.path.join(staging, "shards")
    for dirpath, _, filenames in os.walk(shard_root):
        for f in filenames:
            if not f.endswith("_document.json"):
                continue
            path = os.path.join(dirpath, f)
            with open(path, encoding="utf-8") as fh:
                side = json.load(fh)
            side["sources"] = [s.replace(staging, root, 1) for s in side["sources"]]
            side["tokenizer_model"] = os.path.join(root, "tokenizer", "spm.model")
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(side, fh, indent=2, sort_keys=True)
                fh.write("\n")
