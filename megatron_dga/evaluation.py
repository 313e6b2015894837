"""Downstream accuracy of a checkpoint with lm-evaluation-harness (``lm_eval``, the ``eval`` extra).

:class:`MegatronLM` is an ``lm_eval`` model over our own megatron-core model, built the trainer's
way (``model.build_model_chunks``) and run through the trainer's forward (``training/step.py``:
megatron-core's pipeline schedules), so it evaluates on any TP/PP/VPP layout, launched like the
trainer (``torchrun ... tools/evaluate.py``), and reads both checkpoint formats (torch_dist
reshards onto the evaluation's layout; torch needs the saved one). The text goes through the
run's own tokenizer (``--tokenizer-type`` and its files, as the run recorded them). No Hugging Face
export is involved: it covers every model the trainer builds (not only the Llama/GPT-2 layouts the
converter maps) and every tokenizer (SentencePiece and NullTokenizer runs have no Hugging Face
tokenizer), without writing a copy of the weights per evaluation.

What it scores: ``loglikelihood`` requests (every multiple-choice task: arc_easy, hellaswag, piqa,
sciq, mmlu, ...) and ``loglikelihood_rolling`` (perplexity tasks). A continuation's log-likelihood
is minus the sum of the trainer's per-token losses over its tokens. Generation tasks and the
``is_greedy`` accuracy of plain ``loglikelihood`` tasks (lambada) need logits, which the pipeline
does not return: such tasks are refused by name.

Where the model and tokenizer come from: the run's ``run_info.json`` (the trainer writes it into
--log-dir, which defaults to --save; the experiment runner's run directory holds both), found
beside or above the checkpoint; trainer flags given on the command line override it, and a
checkpoint without it (tools/convert_hf_checkpoint.py's output) takes the model flags
(``model_flags.txt``) and the tokenizer flags instead.

Every rank runs the same requests in the same order (the model-parallel ranks compute each forward
together; data-parallel replicas repeat it); rank 0 writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_dga.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install '.[eval]'"
"""The fix when lm_eval is missing (the ``eval`` extra of setup.py)."""

RESULTS_FILE = "downstream.json"
"""What an evaluation writes: in the experiment runner's run directory, or tools/evaluate.py --output."""

RESULTS_FORMAT = "megatron-dga/downstream-v1"

SUPPORTED_OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling")
"""lm_eval task output types the model scores (module docstring)."""

TOKENIZER_FIELDS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size")
"""DataConfig fields that build the run's tokenizer."""

RUN_INFO = "run_info.json"


def require_lm_eval():
    """The ``lm_eval`` package, or ConfigError naming the install command."""
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM  # noqa: F401  (0.4 API)
    except ImportError as exc:
        raise ConfigError(
            f"downstream evaluation needs lm-evaluation-harness (the lm_eval package: {exc}); "
            f"install the eval extra: {INSTALL_HINT}"
        ) from None
    return lm_eval


# ----------------------------------------------------------------------------- configuration


@dataclass
class EvalConfig:
    """What to evaluate and how (tools/evaluate.py's flags, the runner's --eval-*)."""

    tasks: List[str]
    """--tasks: lm_eval task or group names (arc_easy, hellaswag, piqa, sciq, mmlu, ...) and/or
    directories of task YAMLs (their data files beside them: offline)."""
    num_fewshot: Optional[int] = None
    """--num-fewshot: examples in each prompt (None: each task's default, 0 for most)."""
    limit: Optional[float] = None
    """--limit: items per task (an int), or a fraction of each task (< 1); None: all."""
    batch_size: int = 32
    """--eval-batch-size: requests per forward call."""
    micro_batch_size: int = 8
    """--eval-micro-batch-size: sequences per micro-batch of that call (the pipeline's unit)."""
    seed: int = 1234
    """--seed of lm_eval's few-shot sampling and shuffling."""
    bootstrap_iters: int = 1000
    """Bootstrap resamples of the stderr of metrics that need them (0: none)."""

    def __post_init__(self):
        self.tasks = [t for t in (s.strip() for s in self.tasks) if t]
        if not self.tasks:
            raise ConfigError(
                "--tasks: give at least one lm_eval task name (e.g. arc_easy) or a directory of task YAMLs"
            )
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"--num-fewshot {self.num_fewshot}: must be >= 0")
        if self.limit is not None and not self.limit > 0:
            raise ConfigError(f"--limit {self.limit}: must be > 0 (items per task, or a fraction < 1)")
        for name in ("batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--eval-{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"bootstrap_iters {self.bootstrap_iters}: must be >= 0")


def split_tasks(tasks: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(task names, include directories): each directory entry adds the tasks its YAMLs name."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm_eval's tags (!function ...) read as plain values: only 'task' matters
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    names: List[str] = []
    include: List[str] = []
    for entry in tasks:
        if os.path.isdir(entry):
            found = []
            for path in sorted(Path(entry).rglob("*.yaml")):
                try:
                    doc = yaml.load(path.read_text(), Loader=Loader)
                except (OSError, yaml.YAMLError) as exc:
                    raise DataError(f"--tasks {entry}: cannot read {path} ({exc}); fix the task YAML") from None
                task = doc.get("task") if isinstance(doc, dict) else None
                if isinstance(task, str):
                    found.append(task)
                elif isinstance(doc, dict) and isinstance(doc.get("group"), str):
                    found.append(doc["group"])
            if not found:
                raise DataError(
                    f"--tasks {entry}: a directory without task YAMLs (a *.yaml with a 'task: NAME' "
                    "key); give lm_eval task names or a directory of task YAMLs"
                )
            include.append(os.path.abspath(entry))
            names += [n for n in found if n not in names]
        elif os.sep in entry or entry.endswith((".yaml", ".yml")):
            raise DataError(f"--tasks {entry}: no such directory; give lm_eval task names or a directory of task YAMLs")
        elif entry not in names:
            names.append(entry)
    return names, include


# ----------------------------------------------------------------------------- the run's model and tokenizer


def find_run_info(load_dir: str | os.PathLike) -> Optional[Path]:
    """The ``run_info.json`` of the run that saved ``load_dir``: in it or in its parent (the runner's
    ``<run>/ckpt``); None when neither has one."""
    root = Path(load_dir).resolve()
    for d in (root, root.parent):
        if (d / RUN_INFO).is_file():
            return d / RUN_INFO
    return None


def run_settings(load_dir: str | os.PathLike, overrides: Dict[str, object]) -> Tuple[dict, dict, Optional[Path]]:
    """({model field: value}, {tokenizer field: value}, run_info.json used) of the run behind ``load_dir``.

    ``overrides``: trainer flags from the command line as {"model.x"/"data.x": value}; they win.
    """
    info_path = find_run_info(load_dir)
    model: Dict[str, object] = {}
    tokenizer: Dict[str, object] = {}
    if info_path is not None:
        try:
            config = json.loads(info_path.read_text())["config"]
            model.update(config["model"])
            tokenizer.update({k: config["data"].get(k) for k in TOKENIZER_FIELDS})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{info_path}: not a run_info.json of the trainer ({exc!r}); give the model and "
                "tokenizer flags of the run instead"
            ) from None
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if section == "model":
            model[name] = value
        elif section == "data" and name in TOKENIZER_FIELDS:
            tokenizer[name] = value
    if info_path is None and not {"num_layers", "hidden_size"} <= set(model):
        raise ConfigError(
            f"--load {load_dir}: no {RUN_INFO} beside or above it to read the model and tokenizer from; give the "
            "training run's model and tokenizer flags (e.g. --tokenizer-type ... --tokenizer-model ... and, for a "
            "converted checkpoint, $(cat CONVERTED/model_flags.txt))"
        )
    if not tokenizer.get("tokenizer_type"):
        raise ConfigError(
            f"--load {load_dir}: the tokenizer is unknown; give --tokenizer-type (and "
            "--tokenizer-model / --vocab-size) of the training run"
        )
    return model, tokenizer, info_path


def _check_against_checkpoint(cfg, tp_size: int, ckpt_dir: Path, extra: dict) -> None:
    from megatron_dga.training.resume import MODEL_SHAPE_FLAGS

    saved = extra.get("model", {})
    for name, flag in MODEL_SHAPE_FLAGS.items():
        if name in saved and saved[name] != getattr(cfg, name):
            raise ConfigError(
                f"{flag}: the checkpoint {ckpt_dir} has {saved[name]!r}, the evaluation's model "
                f"{getattr(cfg, name)!r}; give the training run's model and tokenizer flags"
            )
    padded = extra.get("padded_vocab_size")
    if padded is not None and padded != cfg.padded_vocab_size(tp_size):
        raise ConfigError(
            f"--tensor-model-parallel-size {tp_size}: the evaluation pads the vocabulary to "
            f"{cfg.padded_vocab_size(tp_size)} rows, the checkpoint {ckpt_dir} has {padded}; "
            "evaluate with the TP size it was converted for"
        )


def load_chunks(load_dir: str | os.PathLike, model_cfg, ctx, ckpt_step: Optional[int] = None):
    """This rank's model chunks (megatron DDP around each, frozen: no gradient buffers), loaded from
    ``load_dir`` and in eval mode; returns (ddp chunks, iteration)."""
    from megatron.core.distributed import DistributedDataParallel

    from megatron_dga.model import build_model_chunks
    from megatron_dga.training import checkpoint as ckpt
    from megatron_dga.training.optim import ddp_config
    from megatron_dga.training.config import OptimizerConfig
    from megatron_dga.training.resume import load_model_state_dicts, model_state_dicts

    ckpt_dir, meta = ckpt.resolve_checkpoint(load_dir, ckpt_step)
    _check_against_checkpoint(model_cfg, ctx.tp_size, ckpt_dir, meta.get("extra", {}))
    built = build_model_chunks(model_cfg, ctx)
    cores = [core for core, _ in built]
    if meta.get("ckpt_format", "torch") == "torch_dist":
        template = model_state_dicts(cores, lambda core: core.sharded_state_dict())
        state = ckpt.load_distributed_checkpoint(ckpt_dir, meta, template)
    else:
        _, state, _ = ckpt.load_checkpoint(
            load_dir, layout=ckpt.CheckpointLayout.from_context(ctx), iteration=meta["iteration"]
        )
    load_model_state_dicts(cores, state, str(ckpt_dir))
    chunks = []
    for i, (core, module) in enumerate(built):
        module.to(ctx.device)
        for p in module.parameters():
            p.requires_grad_(False)  # DDP allocates no gradient buffer for them
        ddp = DistributedDataParallel(core.config, ddp_config(OptimizerConfig()), module, disable_bucketing=i > 0)
        ddp.eval()
        chunks.append(ddp)
    return chunks, int(meta["iteration"])


# ----------------------------------------------------------------------------- the lm_eval model


def _template_lm():
    require_lm_eval()
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def _pad_length(longest: int, seq_length: int) -> int:
    """Sequence length of one forward call: the longest request rounded up to 64 (a multiple of any
    TP size with sequence parallelism), at most --seq-length."""
    return min(seq_length, 64 * math.ceil(longest / 64))


def score_token_requests(
    chunks,
    device,
    requests: Sequence[Tuple[List[int], List[int]]],
    *,
    seq_length: int,
    pad_id: int,
    batch_size: int,
    micro_batch_size: int,
) -> List[float]:
    """Log-likelihood of each (context tokens, continuation tokens) pair: minus the sum of the model's
    per-token losses over the continuation, the context truncated on the left to fit ``seq_length``.

    Requests are run longest first (fewer padded tokens per call) and returned in input order.
    """
    from megatron_dga.training.step import forward_backward

    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: List[float] = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = []
        for i in idx:
            ctx_tokens, cont = requests[i]
            if not cont:
                raise DataError(
                    "an lm_eval request with an empty continuation (nothing to score); check the task's "
                    "doc_to_choice/doc_to_target"
                )
            whole = (list(ctx_tokens) + list(cont))[-(seq_length + 1) :]
            rows.append((whole, min(len(cont), len(whole) - 1)))
        length = _pad_length(max(len(w) - 1 for w, _ in rows), seq_length)
        tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.float32)
        for r, (whole, n_cont) in enumerate(rows):
            n = len(whole) - 1
            tokens[r, :n] = torch.tensor(whole[:-1])
            labels[r, :n] = torch.tensor(whole[1:])
            mask[r, n - n_cont : n] = 1.0
        positions = torch.arange(length, dtype=torch.long).expand(len(rows), length).contiguous()
        batch = {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions}
        micro = [
            {k: v[a : a + micro_batch_size] for k, v in batch.items()} for a in range(0, len(rows), micro_batch_size)
        ]
        stats = forward_backward(chunks, micro, device, forward_only=True, keep_token_losses=True)
        losses = torch.cat(stats.token_losses).double().cpu()
        for r, i in enumerate(idx):
            out[i] = -float(losses[r].sum())
    return out


def build_lm(chunks, tokenizer, *, device, seq_length: int, batch_size: int, micro_batch_size: int):
    """An ``lm_eval`` model (a ``TemplateLM``) over ``chunks`` and our ``tokenizer``."""
    TemplateLM = _template_lm()

    class MegatronLM(TemplateLM):
        """lm_eval's view of our model: loglikelihood and loglikelihood_rolling (module docstring)."""

        backend = "causal"

        def __init__(self):
            super().__init__()
            self.chunks, self.tok, self._device = chunks, tokenizer, device
            self.seq_length, self.batch_size, self.micro_batch_size = seq_length, batch_size, micro_batch_size

        @property
        def eot_token_id(self) -> int:
            return self.tok.eod

        @property
        def prefix_token_id(self) -> int:
            return self.tok.bos if self.tok.bos is not None else self.tok.eod

        @property
        def tokenizer_name(self) -> str:
            return self.tok.unique_description()

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
            return list(self.tok.tokenize(string))

        def _score(self, pairs) -> List[float]:
            return score_token_requests(
                self.chunks,
                self._device,
                pairs,
                seq_length=self.seq_length,
                pad_id=self.tok.eod,
                batch_size=self.batch_size,
                micro_batch_size=self.micro_batch_size,
            )

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            # (ll, is_greedy): greedy needs logits, which the pipeline does not return; the tasks that
            # read it are refused before the run (check_output_types), so False is never scored.
            return [(ll, False) for ll in self._score([(c, x) for _, c, x in requests])]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
            pairs, owner = [], []
            for n, (text,) in enumerate(req.args for req in requests):
                ids = self.tok_encode(text)
                # Windows of seq_length tokens, each predicted from up to seq_length tokens before it.
                for a in range(0, len(ids), self.seq_length):
                    ctx_tokens = ids[max(0, a - self.seq_length) : a] or [self.prefix_token_id]
                    pairs.append((ctx_tokens, ids[a : a + self.seq_length]))
                    owner.append(n)
            total = [0.0] * len(requests)
            for n, ll in zip(owner, self._score(pairs)):
                total[n] += ll
            return total

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise ConfigError(
                "generation tasks are not supported by this evaluation (multiple-choice and "
                "perplexity tasks only); drop them from --tasks"
            )

    return MegatronLM()


# ----------------------------------------------------------------------------- running tasks


def load_tasks(tasks: Sequence[str]):
    """(lm_eval TaskManager, task names) of ``tasks`` (names and task directories), every task loaded
    once here so that an unknown name, unreadable data or an output type the model cannot score fails
    before the model is built."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names, include = split_tasks(tasks)
    manager = TaskManager(include_path=include, include_defaults=False, verbosity="ERROR") if include else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        # lm_eval's own tasks: indexing its thousands of YAMLs takes ~20 s, so only when needed
        manager = TaskManager(include_path=include or None, include_defaults=True, verbosity="ERROR")
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks {','.join(unknown)}: not an lm_eval task or group (nor named by a task YAML of "
            "the directories given); `lm-eval ls tasks` lists them, or give a directory of task YAMLs"
        )
    try:
        loaded = manager.load(names)
    except Exception as exc:  # the harness's own loading (datasets, network) failed
        raise DataError(
            f"--tasks {','.join(names)}: lm_eval could not load the task data ({type(exc).__name__}: "
            f"{exc}); offline, give a directory of task YAMLs with local data files"
        ) from None
    bad = sorted(
        f"{name} ({task.get_config('output_type')})"
        for name, task in loaded["tasks"].items()
        if task.get_config("output_type") not in SUPPORTED_OUTPUT_TYPES
    )
    if bad:
        raise ConfigError(
            f"--tasks: {', '.join(bad[:5])} cannot be scored here: this evaluation runs "
            f"{' and '.join(SUPPORTED_OUTPUT_TYPES)} tasks (arc_easy, hellaswag, piqa, sciq, mmlu, "
            "wikitext, ...); drop them"
        )
    return manager, names


def metrics_of(results: dict) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} from lm_eval's ``results`` (the ``,none`` filter suffix dropped;
    stderr kept as ``<metric>_stderr``; values that are not numbers left out)."""
    out: Dict[str, Dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        if row:
            out[task] = row
    return out


def run_tasks(lm, manager, names: Sequence[str], cfg: EvalConfig) -> dict:
    """lm_eval's ``simple_evaluate`` of ``lm``; {"results": {task: {metric: value}}, "n_samples": ...}."""
    from lm_eval import evaluator

    out = evaluator.simple_evaluate(
        model=lm,
        tasks=list(names),
        task_manager=manager,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        bootstrap_iters=cfg.bootstrap_iters,
        log_samples=False,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
        verbosity="ERROR",
    )
    results = dict(out["results"])
    results.update(out.get("groups", {}))
    return {"results": metrics_of(results), "n_samples": out.get("n-samples", {})}


@dataclass
class EvalJob:
    """One checkpoint to evaluate (tools/evaluate.py, the runner's --eval-tasks)."""

    load: str
    """--load: the checkpoint root (the trainer's --save)."""
    eval: EvalConfig
    """What to run."""
    overrides: Dict[str, object] = field(default_factory=dict)
    """Trainer flags given on the command line ({"model.x"/"data.x"/"parallel.x": value})."""
    ckpt_step: Optional[int] = None
    """--ckpt-step: the iteration (default: the latest)."""


@dataclass
class LoadedModel:
    """A checkpoint's model on this rank, ready to score (:func:`open_model`)."""

    chunks: list
    """This rank's DDP-wrapped model chunks, frozen, in eval mode."""
    tokenizer: object
    """The run's tokenizer (``data.tokenizers.BaseTokenizer``)."""
    model_cfg: object
    """Its GPTModelConfig."""
    ctx: object
    """The ``platform.ParallelContext`` of the evaluation."""
    iteration: int
    """The checkpoint's iteration."""
    run_info: Optional[str]
    """The run_info.json the model and tokenizer came from (None: flags only)."""

    def score(self, pairs, *, batch_size: int = 32, micro_batch_size: int = 8) -> List[float]:
        """:func:`score_token_requests` of (context tokens, continuation tokens) pairs."""
        return score_token_requests(
            self.chunks,
            self.ctx.device,
            pairs,
            seq_length=self.model_cfg.seq_length,
            pad_id=self.tokenizer.eod,
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
        )


def open_model(load: str, overrides: Dict[str, object], ckpt_step: Optional[int] = None) -> LoadedModel:
    """Initialise megatron's parallel state from ``overrides``' parallel flags (one process: TP=PP=1;
    under torchrun: the launched layout) and load the checkpoint ``load`` into it. The caller shuts
    the parallel state down (``platform.shutdown``)."""
    from megatron_dga import platform
    from megatron_dga.data.tokenizers import build_tokenizer
    from megatron_dga.model import GPTModelConfig
    from megatron_dga.platform import ParallelConfig

    model_values, tok_values, info_path = run_settings(load, overrides)
    tokenizer = build_tokenizer(tok_values["tokenizer_type"], **{k: tok_values.get(k) for k in TOKENIZER_FIELDS[1:]})
    fields = {f.name for f in dataclasses.fields(GPTModelConfig)}
    model_values = {k: v for k, v in model_values.items() if k in fields}
    model_values["vocab_size"] = tokenizer.vocab_size
    try:
        model_cfg = GPTModelConfig(**model_values)
    except TypeError as exc:
        raise ConfigError(
            f"the model settings of --load {load} are not valid ({exc}); give the training run's model flags"
        ) from None
    parallel = ParallelConfig(**{k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("parallel.")})
    parallel.resolve_virtual_pipeline(model_cfg.num_layers)
    model_cfg.check_parallel(
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.virtual_pipeline_model_parallel_size,
    )
    ctx = platform.initialize(parallel)
    chunks, iteration = load_chunks(load, model_cfg, ctx, ckpt_step)
    return LoadedModel(chunks, tokenizer, model_cfg, ctx, iteration, str(info_path) if info_path else None)


def evaluate_checkpoint(job: EvalJob, output: Optional[str] = None) -> dict:
    """Evaluate ``job.load`` on ``job.eval.tasks`` (:func:`open_model`, then lm_eval); the results,
    written to ``output`` as JSON by rank 0 when given."""
    import time

    from megatron_dga import platform

    manager, names = load_tasks(job.eval.tasks)  # before any model work: a bad task fails fast
    started = time.monotonic()
    try:
        model = open_model(job.load, job.overrides, job.ckpt_step)
        lm = build_lm(
            model.chunks,
            model.tokenizer,
            device=model.ctx.device,
            seq_length=model.model_cfg.seq_length,
            batch_size=job.eval.batch_size,
            micro_batch_size=job.eval.micro_batch_size,
        )
        with torch.no_grad():
            scored = run_tasks(lm, manager, names, job.eval)
        ctx = model.ctx
        result = {
            "format": RESULTS_FORMAT,
            "load": os.path.abspath(job.load),
            "iteration": model.iteration,
            "tasks": list(job.eval.tasks),
            "task_names": names,
            "results": scored["results"],
            "n_samples": scored["n_samples"],
            "num_fewshot": job.eval.num_fewshot,
            "limit": job.eval.limit,
            "seed": job.eval.seed,
            "run_info": model.run_info,
            "layout": {"tp": ctx.tp_size, "pp": ctx.pp_size, "vp": ctx.vp_size, "dp": ctx.dp_size},
            "seconds": time.monotonic() - started,
        }
        if output and ctx.rank == 0:
            from megatron_dga.fileio import atomic_write_json

            atomic_write_json(output, result, indent=1)
    finally:
        platform.shutdown()
    return result


def read_results(path: str | os.PathLike) -> dict:
    """A :data:`RESULTS_FILE` written by :func:`evaluate_checkpoint`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: no downstream results; evaluate the checkpoint with tools/evaluate.py, or re-run "
            "the experiment with --eval-tasks and --keep-checkpoints"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); delete it and evaluate again") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise DataError(
            f"{path}: format {data.get('format') if isinstance(data, dict) else None!r}, expected {RESULTS_FORMAT!r}"
        )
    return data


def trainer_overrides(argv: Sequence[str]) -> Dict[str, object]:
    """{"model.x"/"parallel.x"/"data.<tokenizer field>": value} of the trainer flags in ``argv``; any other
    flag is a ConfigError (an evaluation takes the model, tokenizer and layout flags only)."""
    from megatron_dga.training.arguments import build_parser

    ns, unknown = build_parser().parse_known_args(list(argv))
    given = {k: v for k, v in vars(ns).items() if "." in k}
    other = [
        k
        for k in given
        if not (
            k.startswith(("model.", "parallel.")) or (k.startswith("data.") and k.split(".", 1)[1] in TOKENIZER_FIELDS)
        )
    ]
    if unknown or other:
        names = unknown + ["--" + k.split(".", 1)[1].replace("_", "-") for k in other]
        raise ConfigError(
            f"{' '.join(names)}: not a flag of the evaluation; it takes its own flags (--tasks, ...) and "
            "the trainer's model, tokenizer and --tensor/--pipeline-model-parallel-size flags"
        )
    return given
