"""Running method comparisons: data preparation, resumable training jobs, results read back.

The glue of ``examples/experiments.py`` (and through it ``scripts/demo.sh``):

* :func:`prepare_jsonl_corpus` turns a directory of ``<domain>.jsonl`` files plus a target's
  train/eval jsonl into a tokenizer, Megatron shards and (on demand) importance weights, with
  the project's own tools (``tools/train_tokenizer.py``, ``preprocess_data.py``,
  ``importance_weights.py``), their ``main(argv)`` called in-process with the arguments a user
  would type (one megatron-core import, not one per step). Each step leaves a stamp (its inputs' sizes and
  mtimes, its arguments) under ``<data dir>/stamps/``; a re-run skips a step whose stamp
  matches and whose outputs exist.
* :func:`prepare_fine_domains` (the fine-grained scenario, on any of the data sources) clusters
  the domains' shards into a fine-domain map (``tools/cluster_domains.py --input-shards
  --output-map``), cuts a little specific set from the target's shard, and writes the importance
  weights and the basis over the map's fine domains (``tools/importance_weights.py
  --domain-map``), stamped the same way under ``<data dir>/fine-grained/<configuration>/stamps/``.
* :func:`run_job` runs one training job (``python -m megatron_dga.pretrain_gpt``, optionally
  under torchrun) so that it can always be resumed: ``--save`` in its run directory, a
  ``job.json`` with its arguments, ``--load`` when a checkpoint is there. A finished job
  (``job.json`` says so and ``metrics.jsonl`` reaches ``--train-iters``) is skipped. Ctrl-C
  stops the running job through Megatron's ``--exit-signal-handler`` (it saves, then exits).
* :func:`ensure_downstream` (``--eval-tasks``): a finished job's final checkpoint evaluated with
  ``tools/evaluate.py`` (lm-evaluation-harness, :mod:`megatron_dga.evaluation`) into
  ``<run_dir>/downstream.json``, before the checkpoints are deleted; a re-run with the same tasks
  skips it.
* :class:`RunResult` holds what a finished job logged (and its downstream accuracies);
  ``megatron_dga/experiments/results.py`` turns several into tables.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from megatron_dga.errors import ConfigError, DataError
from megatron_dga.fileio import atomic_write_json
from megatron_dga.training.metrics import read_metrics

JOB_FORMAT = "megatron-dga/experiment-job-v1"
JOB_FILE = "job.json"
"""In each run directory: the job's arguments, whether it finished, and the time of each attempt."""

STOP_ONLY_FLAGS = {"--exit-interval": 1, "--exit-duration-in-mins": 1, "--exit-signal-handler": 0}
"""Trainer flags that decide when a job pauses, not what it computes (flag -> number of values):
they may differ between the attempts of one job."""


def say(message: str) -> None:
    """One progress line of the runner (stdout, flushed: the runs' lines interleave with it)."""
    print(message, flush=True)


# --------------------------------------------------------------------------- data preparation
def run_tool(name: str, main: Callable[[List[str]], int], *args: str) -> None:
    """Run ``tools/<name> args`` to completion in this process (its progress goes to our stderr):
    ``main`` is the tool's entry point, so megatron-core is imported once, not once per step.
    DataError if it fails."""
    started = time.monotonic()
    say(f"[prep] python tools/{name} {' '.join(args)}")
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse rejected the arguments
        rc = exc.code if isinstance(exc.code, int) else 2
    if rc != 0:
        raise DataError(
            f"tools/{name} failed (exit {rc}): its error is printed above; the command was "
            f"python tools/{name} {' '.join(args)}"
        )
    say(f"[prep] tools/{name} done in {time.monotonic() - started:.1f}s")


def file_fingerprint(paths: Sequence[str]) -> List[list]:
    """(absolute path, size, mtime) of each file: what a cached step's output depends on."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def cached_step(name: str, stamp_dir: str, key: dict, outputs: Sequence[str], work: Callable[[], None]) -> None:
    """Run ``work`` unless its stamp holds ``key`` and every output exists; then write the stamp.

    The stamp is written after ``work`` returns (atomically), so an interrupted step runs again.
    """
    stamp = os.path.join(stamp_dir, f"{name}.json")
    try:
        with open(stamp, encoding="utf-8") as fh:
            previous = json.load(fh)
    except (OSError, ValueError):
        previous = None
    if previous == key and all(os.path.exists(p) for p in outputs):
        say(f"[prep] {name}: up to date, skipped")
        return
    say(f"[prep] {name} ...")
    work()
    missing = [p for p in outputs if not os.path.exists(p)]
    if missing:
        raise DataError(f"[prep] {name} finished without writing {missing}")
    atomic_write_json(stamp, key, indent=1)


@dataclass(frozen=True)
class ExperimentData:
    """What the training jobs of an experiment read: shards, tokenizer, weights (absolute paths)."""

    source: str
    """Where the data comes from, in words (the results' title)."""
    domains: tuple
    """Generic domain names, in --data-path order."""
    domain_prefixes: tuple
    """Shard prefix of each domain (``.../<domain>_text_document``)."""
    specific_prefix: str
    """Shard prefix of the target's training split (--specific-data-path)."""
    specific_eval_prefix: str
    """Shard prefix of the target's evaluation split (--specific-eval-data-path)."""
    tokenizer_args: tuple
    """--tokenizer-type ... flags of every job."""
    importance_weights: Optional[str] = None
    """Weights file of --mixing importance (None: not computed yet, or not available)."""
    domain_jsonl_dir: Optional[str] = None
    """Directory of the domains' jsonl files (the importance weights over the domains)."""
    target_train_jsonl: Optional[str] = None
    """The target's training split as jsonl (the importance weights over the domains)."""


def check_prefix(prefix: str, flag: str) -> str:
    """The absolute prefix; DataError naming ``flag`` when its .bin/.idx pair is missing."""
    missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
    if missing:
        raise DataError(
            f"{flag} {prefix}: no {prefix}{missing[0]}; give a shard prefix written by "
            "tools/preprocess_data.py (<dir>/<name>_text_document)"
        )
    return os.path.abspath(prefix)


def shards_data(
    data_paths: Sequence[str],
    specific: str,
    specific_eval: str,
    tokenizer_args: Sequence[str],
    importance_weights: Optional[str],
) -> ExperimentData:
    """ExperimentData over shards built beforehand (no preparation)."""
    from megatron_dga.data.domains import domain_name

    prefixes = tuple(check_prefix(p, "--data-path") for p in data_paths)
    names = tuple(domain_name(p) for p in prefixes)
    if len(set(names)) != len(names):
        raise ConfigError(f"--data-path: two shards share a domain name ({sorted(names)}); rename one")
    if importance_weights is not None and not os.path.isfile(importance_weights):
        raise DataError(
            f"--importance-weights {importance_weights}: no such file; write it with "
            "tools/importance_weights.py --labelled-domains DIR --specific TARGET.jsonl --output FILE"
        )
    return ExperimentData(
        source=f"shards ({len(prefixes)} domains)",
        domains=names,
        domain_prefixes=prefixes,
        specific_prefix=check_prefix(specific, "--specific-data-path"),
        specific_eval_prefix=check_prefix(specific_eval, "--specific-eval-data-path"),
        tokenizer_args=tuple(tokenizer_args),
        importance_weights=os.path.abspath(importance_weights) if importance_weights else None,
    )


def domain_files(corpus_dir: str) -> Dict[str, str]:
    """``<domain>.jsonl`` (or ``.jsonl.gz``) files of a corpus directory, by domain name."""
    from megatron_dga.prep.inputs import jsonl_files_in, jsonl_stem

    if not os.path.isdir(corpus_dir):
        raise DataError(
            f"--corpus-dir {corpus_dir} is not a directory; give a directory holding one <domain>.jsonl per domain"
        )
    files: Dict[str, str] = {}
    for path in jsonl_files_in(corpus_dir):
        name = jsonl_stem(path)
        if name in files:
            raise DataError(
                f"--corpus-dir {corpus_dir}: domain {name!r} has two files ({files[name]}, {path}); keep one"
            )
        files[name] = path
    if len(files) < 2:
        raise DataError(
            f"--corpus-dir {corpus_dir} holds {len(files)} <domain>.jsonl file(s); a mixture needs at least 2 domains"
        )
    return files


TARGET_LINES_CHECKED = 1000
"""Lines of each --target-train/--target-eval file checked up front (the tools read them all later)."""


def check_target_jsonl(path: str, flag: str) -> None:
    """DataError naming ``flag`` unless ``path`` is a jsonl file whose first lines are objects with a
    non-empty "text": checked before the tokenizer is trained and the shards are written, so a wrong
    file costs a second, not minutes, and is not reported under the runner's internal paths."""
    from megatron_dga.prep.inputs import iter_jsonl, parse_text

    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file; give the target's {flag[9:]} split as jsonl")
    texts = 0
    try:
        for i, (_, lineno, raw) in enumerate(iter_jsonl([path])):
            if i == TARGET_LINES_CHECKED:
                break
            texts += bool(parse_text(raw, ("text",), path, lineno).strip())
    except DataError as exc:
        reason = str(exc).replace("; set --json-keys to the field holding the text", "")  # the runner reads "text"
        raise DataError(
            f"{flag}: {reason}; give the target's {flag[9:]} split as jsonl, one {{\"text\": ...}} object per line"
        ) from None
    if not texts:
        raise DataError(
            f"{flag} {path} holds no document with a non-empty \"text\"; give the target's {flag[9:]} "
            "split as jsonl, one {\"text\": ...} object per line"
        )


def prepare_jsonl_corpus(
    corpus_dir: str, target_train: str, target_eval: str, data_dir: str, *, vocab_size: int, seed: int, workers: int
) -> ExperimentData:
    """Tokenizer and shards of a ``<domain>.jsonl`` directory and a target's train/eval jsonl.

    Writes ``data_dir/tokenizer/spm.model``, ``data_dir/shards/domains/<domain>_text_document``
    and ``data_dir/shards/targets/{target_train,target_eval}_text_document``; each step is
    skipped when its stamp matches (module docstring).
    """
    from megatron_dga.cli import preprocess_data, train_tokenizer

    files = domain_files(corpus_dir)
    for path, flag in ((target_train, "--target-train"), (target_eval, "--target-eval")):
        check_target_jsonl(path, flag)
    corpus_dir, data_dir = os.path.abspath(corpus_dir), os.path.abspath(data_dir)
    stamps = os.path.join(data_dir, "stamps")
    os.makedirs(stamps, exist_ok=True)
    # The target files keep their names out of the way: fixed names, linked into one directory.
    targets_in = os.path.join(data_dir, "targets_jsonl")
    os.makedirs(targets_in, exist_ok=True)
    for name, path in (("target_train", target_train), ("target_eval", target_eval)):
        link = os.path.join(targets_in, f"{name}.jsonl")
        if not (os.path.islink(link) and os.readlink(link) == os.path.abspath(path)):
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(os.path.abspath(path), link)
    inputs = file_fingerprint([*files.values(), target_train, target_eval])
    model = os.path.join(data_dir, "tokenizer", "spm.model")
    tok_args = [
        "--input",
        corpus_dir,
        os.path.abspath(target_train),
        "--vocab-size",
        str(vocab_size),
        "--model-prefix",
        model[: -len(".model")],
        "--seed",
        str(seed),
    ]
    cached_step(
        "tokenizer",
        stamps,
        {"inputs": inputs[:-1], "args": tok_args},
        [model],
        lambda: run_tool("train_tokenizer.py", train_tokenizer.main, *tok_args),
    )
    tokenizer = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
    model_fp = file_fingerprint([model])
    shard_dir = os.path.join(data_dir, "shards")
    for sub, src, names in (
        ("domains", corpus_dir, list(files)),
        ("targets", targets_in, ["target_train", "target_eval"]),
    ):
        out = os.path.join(shard_dir, sub)
        args = ["--input", src, "--output-prefix", out, *tokenizer, "--append-eod"]
        key_inputs = inputs[: len(files)] if sub == "domains" else inputs[len(files) :]
        # (--workers changes the speed, not the shards: it stays out of the stamp)
        cached_step(
            f"shards-{sub}",
            stamps,
            {"inputs": key_inputs, "tokenizer": model_fp, "args": args},
            [os.path.join(out, f"{n}_text_document.idx") for n in names],
            lambda args=args: run_tool("preprocess_data.py", preprocess_data.main, *args, "--workers", str(workers)),
        )
    return ExperimentData(
        source=f"--corpus-dir {corpus_dir} ({len(files)} domains)",
        domains=tuple(files),
        domain_prefixes=tuple(os.path.join(shard_dir, "domains", f"{n}_text_document") for n in files),
        specific_prefix=os.path.join(shard_dir, "targets", "target_train_text_document"),
        specific_eval_prefix=os.path.join(shard_dir, "targets", "target_eval_text_document"),
        tokenizer_args=tuple(tokenizer),
        domain_jsonl_dir=corpus_dir,
        target_train_jsonl=os.path.abspath(target_train),
    )


def embedded_data(data_dir: str, vocab_size: Optional[int], seed: int) -> ExperimentData:
    """The embedded default corpus (built from this Python installation), built or reused."""
    from megatron_dga.prep.default_corpus import prepare_default_data

    kwargs = {} if vocab_size is None else {"vocab_size": vocab_size}
    d = prepare_default_data(os.path.join(data_dir, "embedded"), seed=seed, log=say, **kwargs)
    return ExperimentData(
        source="the embedded default corpus (text of the local Python installation)",
        domains=tuple(d.domains),
        domain_prefixes=tuple(d.domain_prefixes[n] for n in d.domains),
        specific_prefix=d.target_train_prefix,
        specific_eval_prefix=d.target_eval_prefix,
        tokenizer_args=("--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", d.tokenizer_model),
        domain_jsonl_dir=os.path.dirname(d.domain_jsonl[d.domains[0]]),
        target_train_jsonl=d.target_train_jsonl,
    )


def with_importance_weights(data: ExperimentData, data_dir: str, *, smoothing: float = 0.02) -> ExperimentData:
    """``data`` with importance weights: given ones, else computed by tools/importance_weights.py
    --labelled-domains over the domains' jsonl (cached like the other preparation steps)."""
    if data.importance_weights:
        return data
    if not (data.domain_jsonl_dir and data.target_train_jsonl):
        raise ConfigError(
            "--methods importance on prepared shards needs "
            "--importance-weights FILE (tools/importance_weights.py --labelled-domains DIR "
            "--specific TARGET.jsonl --output FILE writes it)"
        )
    out = os.path.join(os.path.abspath(data_dir), "importance_weights.json")
    args = [
        "--labelled-domains",
        data.domain_jsonl_dir,
        "--specific",
        data.target_train_jsonl,
        "--output",
        out,
        "--smoothing",
        str(smoothing),
        "--no-progress",
    ]
    from megatron_dga.cli import importance_weights
    from megatron_dga.prep.inputs import jsonl_files_in

    inputs = file_fingerprint([*jsonl_files_in(data.domain_jsonl_dir), data.target_train_jsonl])
    stamps = os.path.join(os.path.abspath(data_dir), "stamps")
    os.makedirs(stamps, exist_ok=True)
    cached_step(
        "importance-weights",
        stamps,
        {"inputs": inputs, "args": args},
        [out],
        lambda: run_tool("importance_weights.py", importance_weights.main, *args),
    )
    return ExperimentData(**{**data.__dict__, "importance_weights": out})


def shard_fingerprint(prefixes: Sequence[str]) -> List[list]:
    """:func:`file_fingerprint` of the shards' ``.bin`` and ``.idx`` files."""
    return file_fingerprint([p + suffix for p in prefixes for suffix in (".bin", ".idx")])


@dataclass(frozen=True)
class FineDomainData:
    """What the fine-grained scenario's jobs read beside :class:`ExperimentData` (absolute paths)."""

    domain_map: str
    """The fine-domain map over the domains' shards (--domain-map; the shards stay --data-path)."""
    levels: tuple
    """k1, k2, ... of the hierarchical k-means (--num-clusters of tools/cluster_domains.py)."""
    num_domains: int
    """K = k1 * k2 * ... fine domains (empty ones included: the trainer never samples them)."""
    empty_domains: int
    """Fine domains without a document."""
    specific_prefix: str
    """The little specific set: the first ``specific_docs`` documents of the target's training shard."""
    specific_docs: int
    """Documents in it."""
    importance_weights: str
    """Importance histogram of the little specific set over the K fine domains (--importance-weights)."""
    basis: str
    """N x K basis: each domain shard's own histogram over the fine domains (--dga-basis)."""
    basis_names: tuple
    """The N basis distributions: the domains' names."""
    cache_dir: str
    """--data-cache-path of the jobs: the fine-domain index is built once, then shared by every run."""


def check_fine_args(levels: Sequence[int], specific_docs: int) -> None:
    """ConfigError for fine-grained flags that cannot work (called before any preparation)."""
    if not levels or any(k < 1 for k in levels) or math.prod(levels) < 2:
        raise ConfigError(
            f"--fine-clusters {' '.join(map(str, levels))}: give the k-means levels k1 [k2 ...], each "
            ">= 1, with at least 2 fine domains in all (e.g. 16 16 16 = 4,096)"
        )
    if specific_docs < 1:
        raise ConfigError(f"--specific-docs {specific_docs}: the little specific set needs at least 1 document")


def prepare_fine_domains(
    data: ExperimentData,
    data_dir: str,
    *,
    levels: Sequence[int],
    specific_docs: int,
    seed: int,
    workers: int,
    smoothing: float = 0.02,
    basis_smoothing: float = 0.01,
) -> FineDomainData:
    """The fine-grained scenario's data under ``data_dir/fine-grained/<k1>x<k2>..._seed<seed>_<n>docs``
    (cached steps, module docstring).

    1. ``map.npz`` (+ ``map.clusters/``): tools/cluster_domains.py --input-shards over the domains'
       shards, ``levels`` of k-means on the documents' token ids: K = prod(levels) fine domains
       inside the ordinary shards (no shard per fine domain).
    2. ``specific/specific_small_text_document``: the first ``specific_docs`` documents of the
       target's training shard (the scenario's premise: little specific data).
    3. ``fine_importance.json`` and ``basis.npz``: tools/importance_weights.py --domain-map, the
       little specific set's histogram over the fine domains (importance sampling), and one basis
       row per domain shard, its own histogram (--basis-shards NAME=PREFIX): DGA reweights the
       coarse domains' distributions over the fine ones.
    """
    from megatron_dga.data.domain_map import read_domain_map
    from megatron_dga.data.domains import inspect_shard
    from megatron_dga.cli import cluster_domains, importance_weights
    from megatron_dga.prep.preprocess import copy_documents

    check_fine_args(levels, specific_docs)
    # One directory per configuration: the jobs' flags name its files, so a run over another map
    # or specific set never passes for a finished one (the runner compares a job's flags).
    tag = f"{'x'.join(str(k) for k in levels)}_seed{seed}_{specific_docs}docs"
    prep = os.path.join(os.path.abspath(data_dir), "fine-grained", tag)
    stamps = os.path.join(prep, "stamps")
    os.makedirs(stamps, exist_ok=True)
    domains = list(data.domain_prefixes)
    map_path = os.path.join(prep, "map.npz")
    cluster = [
        "--input-shards",
        *domains,
        "--output-map",
        map_path,
        "--num-clusters",
        *(str(k) for k in levels),
        "--seed",
        str(seed),
        "--no-progress",
    ]
    # (--workers changes the speed only: it stays out of the stamps, as in prepare_jsonl_corpus)
    cached_step(
        "fine-map",
        stamps,
        {"shards": shard_fingerprint(domains), "args": cluster},
        [map_path, os.path.join(prep, "map.clusters")],
        lambda: run_tool("cluster_domains.py", cluster_domains.main, *cluster, "--workers", str(max(1, workers))),
    )
    small = os.path.join(prep, "specific", "specific_small_text_document")
    cached_step(
        "fine-specific",
        stamps,
        {"shard": shard_fingerprint([data.specific_prefix]), "docs": specific_docs},
        [small + ".bin", small + ".idx"],
        lambda: copy_documents(data.specific_prefix, small, specific_docs),
    )
    weights, basis = os.path.join(prep, "fine_importance.json"), os.path.join(prep, "basis.npz")
    iw = [
        "--domain-map",
        map_path,
        "--specific-shards",
        small,
        "--output",
        weights,
        "--smoothing",
        str(smoothing),
        "--basis-shards",
        *(f"{n}={p}" for n, p in zip(data.domains, domains)),
        "--basis-output",
        basis,
        "--basis-smoothing",
        str(basis_smoothing),
        "--no-progress",
    ]
    cached_step(
        "fine-weights",
        stamps,
        {"inputs": file_fingerprint([map_path, small + ".idx"]), "args": iw},
        [weights, basis],
        lambda: run_tool("importance_weights.py", importance_weights.main, *iw),
    )
    dmap = read_domain_map(map_path)
    return FineDomainData(
        domain_map=map_path,
        levels=tuple(dmap.levels),
        num_domains=dmap.num_domains,
        empty_domains=int((dmap.domain_counts() == 0).sum()),
        specific_prefix=small,
        specific_docs=inspect_shard(small).num_documents,
        importance_weights=weights,
        basis=basis,
        basis_names=tuple(data.domains),
        cache_dir=os.path.join(prep, "index-cache"),
    )


# --------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One training run of an experiment: a method under one seed."""

    method: str
    """Method (or sweep variant) name, e.g. ``dga_ema`` or ``dga_ema+eta=3``."""
    seed: int
    """--seed of the run."""
    argv: List[str]
    """Trainer flags, without --seed, --log-dir, --save, --load (:func:`run_job` adds them)."""
    run_dir: str
    """The run's directory: metrics.jsonl, run_info.json, stdout.log, job.json, ckpt/."""
    mixture_from: Optional[str] = None
    """For a transfer method ``<A>->static``: the method A whose run (same seed) gives the mixture;
    ``argv`` gets its weights (:func:`with_transferred_mixture`) once that run has finished."""


TRANSFER_SUFFIX = "->static"
"""A method named ``<A>->static`` trains with --mixing static on the time-averaged mixture of A's run."""


def with_transferred_mixture(job: Job, source: "RunResult") -> Job:
    """``job`` (a ``<A>->static`` method) with --data-path W1 P1 ... set to the time-averaged weights of
    ``source`` (A's finished run of the same seed), as tools/export_mixture.py --format data-path
    writes them; the weights file goes to ``<run_dir>/mixture.json`` for the record.

    The weights are in the job's flags, so a later run of A with other results makes the runner
    refuse this run directory (other arguments) instead of reusing a run on a stale mixture.
    """
    from megatron_dga.mixing import export

    exp = export.export_mixture(source.run_dir)
    data_path = job.argv[job.argv.index("--data-path") + 1 :]
    data_path = data_path[: next((i for i, a in enumerate(data_path) if a.startswith("--")), len(data_path))]
    tokens = export.data_path_tokens(exp.names, export.exact_simplex(exp.weights, "data-path"), data_path)
    at = job.argv.index("--data-path")
    argv = [*job.argv[: at + 1], *tokens, *job.argv[at + 1 + len(data_path) :]]
    os.makedirs(job.run_dir, exist_ok=True)
    export.write_export(exp, os.path.join(job.run_dir, "mixture.json"), "weights")
    return Job(job.method, job.seed, argv, job.run_dir, job.mixture_from)


@dataclass
class RunResult:
    """What one finished run logged."""

    method: str
    seed: int
    run_dir: str
    seconds: float
    """Wall-clock seconds of all its attempts (start-up, evaluation and checkpoints included)."""
    metrics: List[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    """run_info.json (domain and basis names, the resolved config)."""
    downstream: Dict[str, Dict[str, float]] = field(default_factory=dict)
    """{task: {metric: value}} of its downstream.json (--eval-tasks); empty without one."""

    def evals(self, key: str = "specific_eval_loss") -> List[float]:
        return [m[key] for m in self.metrics if m.get(key) is not None]


def strip_stop_flags(argv: Sequence[str]) -> List[str]:
    """``argv`` without the flags of :data:`STOP_ONLY_FLAGS` (what a job's identity ignores)."""
    out, i = [], 0
    while i < len(argv):
        n = STOP_ONLY_FLAGS.get(argv[i])
        if n is None:
            out.append(argv[i])
            i += 1
        else:
            i += 1 + n
    return out


def job_argv(job: Job, save_interval: int) -> List[str]:
    """The trainer flags of every attempt: the job's, its seed, and where it saves and logs."""
    return [
        *job.argv,
        "--seed",
        str(job.seed),
        "--log-dir",
        job.run_dir,
        "--save",
        os.path.join(job.run_dir, "ckpt"),
        "--save-interval",
        str(save_interval),
        "--exit-signal-handler",
    ]


def train_iters_of(argv: Sequence[str]) -> int:
    """The value of the last --train-iters in ``argv``."""
    idx = max(i for i, a in enumerate(argv) if a == "--train-iters")
    return int(argv[idx + 1])


def _read_job_file(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, JOB_FILE), encoding="utf-8") as fh:
            state = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{os.path.join(run_dir, JOB_FILE)} is unreadable ({exc}); delete the run directory "
            f"{run_dir} to run it again"
        ) from None
    if state.get("format") != JOB_FORMAT:
        raise DataError(f"{os.path.join(run_dir, JOB_FILE)}: format {state.get('format')!r}, expected {JOB_FORMAT!r}")
    return state


def _last_iteration(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    metrics = read_metrics(path)
    return int(metrics[-1]["iteration"]) if metrics else 0


def job_status(job: Job, save_interval: int) -> str:
    """``new``, ``finished`` or ``interrupted``; ConfigError when the run directory holds another job."""
    state = _read_job_file(job.run_dir)
    if state is None:
        return "new"
    mine = strip_stop_flags(job_argv(job, save_interval))
    theirs = strip_stop_flags(state.get("argv", []))
    if theirs != mine:
        at = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
        flag = next((a for a in reversed(mine[: at + 1]) if a.startswith("--")), "the flags")
        diff = f"{flag}: {' '.join(theirs[at : at + 3])!r}... vs {' '.join(mine[at : at + 3])!r}..."
        raise ConfigError(
            f"run directory {job.run_dir} holds a run of {job.method} (seed {job.seed}) with other arguments "
            f"(first difference, before vs now: {diff}); re-run with the same arguments to resume it, "
            "or pass another --out (or delete that directory) to start afresh"
        )
    if state.get("finished") and _last_iteration(job.run_dir) >= train_iters_of(mine):
        return "finished"
    return "interrupted"


def load_result(job: Job) -> RunResult:
    """The RunResult of a finished job, read from its run directory."""
    state = _read_job_file(job.run_dir) or {}
    with open(os.path.join(job.run_dir, "run_info.json"), encoding="utf-8") as fh:
        info = json.load(fh)
    seconds = sum(a.get("seconds", 0.0) for a in state.get("attempts", []))
    downstream_path = os.path.join(job.run_dir, DOWNSTREAM_FILE)
    downstream = {}
    if os.path.isfile(downstream_path):
        from megatron_dga.evaluation import read_results

        downstream = read_results(downstream_path)["results"]
    return RunResult(
        job.method,
        job.seed,
        job.run_dir,
        seconds,
        read_metrics(os.path.join(job.run_dir, "metrics.jsonl")),
        info,
        downstream,
    )


DOWNSTREAM_FILE = "downstream.json"
"""In a run directory: its final checkpoint's downstream results (``evaluation.RESULTS_FILE``)."""


def downstream_current(run_dir: str, evaluation) -> bool:
    """Whether ``run_dir`` holds downstream results of exactly ``evaluation``'s tasks and settings."""
    from megatron_dga.evaluation import read_results

    path = os.path.join(run_dir, DOWNSTREAM_FILE)
    if not os.path.isfile(path):
        return False
    try:
        done = read_results(path)
    except DataError:
        return False
    return (done.get("tasks"), done.get("num_fewshot"), done.get("limit"), done.get("seed")) == (
        list(evaluation.tasks),
        evaluation.num_fewshot,
        evaluation.limit,
        evaluation.seed,
    )


def ensure_downstream(job: Job, evaluation) -> None:
    """Evaluate the job's final checkpoint on ``evaluation`` (an ``evaluation.EvalConfig``) into
    ``<run_dir>/downstream.json`` with tools/evaluate.py, unless that is done already.

    Raises:
        ConfigError: the results are missing and the checkpoints are gone (a run finished before
            without --eval-tasks, or with other tasks, and without --keep-checkpoints).
        DataError: the evaluation failed (the checkpoint is kept: a re-run evaluates again).
    """
    label = f"{job.method} seed {job.seed}"
    if downstream_current(job.run_dir, evaluation):
        say(f"=== {label}: downstream results up to date, skipped")
        return
    ckpt = os.path.join(job.run_dir, "ckpt")
    from megatron_dga.cli.evaluate import main as evaluate_main
    from megatron_dga.training.checkpoint import latest_iteration

    if not os.path.isdir(ckpt) or latest_iteration(ckpt) is None:
        raise ConfigError(
            f"--eval-tasks: {label} finished before without downstream results for these tasks, and its checkpoints "
            f"were deleted ({ckpt}); delete {job.run_dir} to train it again, or pass --keep-checkpoints when runs "
            "may be evaluated later"
        )
    args = [
        "--load",
        ckpt,
        "--output",
        os.path.join(job.run_dir, DOWNSTREAM_FILE),
        "--tasks",
        *evaluation.tasks,
        "--seed",
        str(evaluation.seed),
        "--eval-batch-size",
        str(evaluation.batch_size),
        "--eval-micro-batch-size",
        str(evaluation.micro_batch_size),
    ]
    if evaluation.num_fewshot is not None:
        args += ["--num-fewshot", str(evaluation.num_fewshot)]
    if evaluation.limit is not None:
        args += ["--limit", str(evaluation.limit)]
    say(f"=== {label}: downstream evaluation of {ckpt}")
    run_tool("evaluate.py", evaluate_main, *args)


class Interrupted(Exception):
    """The user stopped the runner (Ctrl-C); the running job saved a checkpoint first."""


def run_job(
    job: Job,
    *,
    save_interval: int,
    threads: int = 1,
    nproc: int = 1,
    echo: bool = True,
    keep_checkpoints: bool = False,
    evaluation=None,
) -> Optional[RunResult]:
    """Run (or resume, or skip) one job; its RunResult, or None when it stopped before --train-iters.

    A finished job is skipped. An interrupted one resumes from the latest checkpoint under
    ``<run_dir>/ckpt`` (``--load``). A job that stops early but cleanly (``--exit-interval``,
    ``--exit-duration-in-mins`` in the job's flags) returns None and resumes next time. When the
    job finishes, its checkpoints are deleted unless ``keep_checkpoints`` (results come from
    metrics.jsonl; a finished job never resumes). With ``evaluation`` (an ``evaluation.EvalConfig``,
    the runner's --eval-tasks) the final checkpoint is evaluated first (:func:`ensure_downstream`),
    also for a job that finished before.

    Raises:
        ConfigError: the run directory holds a job with other arguments.
        DataError: the trainer failed (the message points at its stdout.log).
        Interrupted: Ctrl-C; the job saved and stopped, a re-run resumes it.
    """
    label = f"{job.method} seed {job.seed}"
    status = job_status(job, save_interval)
    if status == "finished":
        say(f"=== {label}: finished before, skipped ({job.run_dir})")
        if evaluation is not None:
            ensure_downstream(job, evaluation)
        return load_result(job)
    argv = job_argv(job, save_interval)
    state = _read_job_file(job.run_dir) or {"format": JOB_FORMAT, "argv": argv, "finished": False, "attempts": []}
    state["argv"], state["finished"] = argv, False
    os.makedirs(job.run_dir, exist_ok=True)
    ckpt = os.path.join(job.run_dir, "ckpt")
    resumed_from = None
    if os.path.isdir(ckpt):  # (imports torch: only when there is something to resume)
        from megatron_dga.training.checkpoint import latest_iteration

        resumed_from = latest_iteration(ckpt)
    if resumed_from is not None:
        argv = [*argv, "--load", ckpt]
    say(f"=== {label}: " + (f"resuming from iteration {resumed_from}" if resumed_from is not None else "starting"))
    atomic_write_json(os.path.join(job.run_dir, JOB_FILE), state, indent=1)
    rc, seconds, interrupted = _launch(label, argv, job.run_dir, threads, nproc, echo, append=resumed_from is not None)
    state["attempts"].append({"seconds": seconds, "from_iteration": resumed_from or 0, "exit_code": rc})
    last = _last_iteration(job.run_dir) if rc == 0 else None
    state["finished"] = rc == 0 and last >= train_iters_of(argv)
    atomic_write_json(os.path.join(job.run_dir, JOB_FILE), state, indent=1)
    if interrupted:
        from megatron_dga.training.checkpoint import latest_iteration

        saved = latest_iteration(ckpt) if os.path.isdir(ckpt) else None
        raise Interrupted(
            f"{label} stopped; its last checkpoint is at iteration {saved}: re-run the same command to resume it"
            if saved is not None
            else f"{label} stopped before its first checkpoint: re-run the same command to start it again"
        )
    if rc != 0:
        raise DataError(
            f"{label} failed (exit {rc}); see {os.path.join(job.run_dir, 'stdout.log')}. Re-running "
            "the same command resumes it from its last checkpoint"
        )
    if not state["finished"]:
        from megatron_dga.training.checkpoint import latest_iteration

        say(f"=== {label}: stopped at iteration {latest_iteration(ckpt)} (saved); re-run the same command to resume it")
        return None
    if evaluation is not None:
        ensure_downstream(job, evaluation)
    if not keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    say(f"=== {label}: done in {seconds:.0f}s")
    return load_result(job)


def launch_command(threads: int, nproc: int) -> tuple:
    """(command prefix, environment) of one trainer run of ``nproc`` ranks sharing ``threads`` cores.

    Each rank gets its share of OpenMP threads, ``threads // nproc`` (at least 1): oversubscribed
    OpenMP threads spin against each other (two 2-thread ranks on 2 cores run several times slower).
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // max(nproc, 1))), PYTHONUNBUFFERED="1")
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "megatron_dga.pretrain_gpt",
        ], env
    return [sys.executable, "-m", "megatron_dga.pretrain_gpt"], env


def _launch(label: str, argv: Sequence[str], run_dir: str, threads: int, nproc: int, echo: bool, append: bool) -> tuple:
    """Run the trainer once; (exit code, seconds, whether Ctrl-C came). Its output goes to
    stdout.log (appended on a resume); Megatron's log lines are echoed with the job's label."""
    launcher, env = launch_command(threads, nproc)
    # Ctrl-C: the trainer's --exit-signal-handler saves and exits 0, and the runner waits for that
    # instead of dying first (the signal is passed on, in case it reached the runner only). A
    # second Ctrl-C kills the trainer: it resumes from its previous checkpoint.
    interrupted: List[int] = []
    proc = None

    def on_sigint(signum, frame):
        interrupted.append(signum)
        if proc is not None and proc.poll() is None:
            if len(interrupted) == 1:
                proc.send_signal(signal.SIGINT)
            else:
                proc.kill()

    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal.signal works
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    start = time.time()
    try:
        with open(os.path.join(run_dir, "stdout.log"), "a" if append else "w") as log:
            proc = subprocess.Popen(
                [*launcher, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
            for line in proc.stdout:
                log.write(line)
                if echo and (
                    line.startswith("[20")
                    or line.startswith("error")
                    or "Error" in line
                    or line.startswith("resumed from")
                ):
                    text = line.rstrip()
                    say(f"  {label:>20} | {text[22:] if text.startswith('[20') else text}")
            rc = proc.wait()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    return rc, time.time() - start, bool(interrupted)
