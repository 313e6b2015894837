"""The trainer's step time against a bare megatron-core loop on the same model and batches.

One process, world size 1 (gloo on CPU, NCCL on GPU), runs both sides:

  * trainer: ``Trainer.train()`` with --mixing uniform, logging and evaluation out of the way
    (--log-interval past the end, --eval-interval 0, no --save), timed from the start of one
    iteration to the start of the next: the sampler and its look-ahead, the dataset reads and
    token-id checks, the schedule hooks, the loss statistics, the NaN check and the loop's hooks
    are all in it;
  * bare: Megatron's ``train_step`` and nothing else, on a second GPTModel built by the same
    builder (``model.build_model_chunks``) and given the trainer's initial weights: megatron-core's
    DDP, ``get_megatron_optimizer`` and OptimizerParamScheduler, ``get_forward_backward_func``
    with ``finalize_model_grads`` and the hooks set once (as Megatron's ``train()`` sets them),
    fed the very micro-batches the trainer drew (recorded as it draws them; no sampler, no
    mixing, no metrics, no checks). On CPU its megatron calls run inside the same scoped shims
    as the trainer's (``platform.megatron_cuda_calls_on_cpu``; nothing is patched on a GPU).

Windows of --window steps alternate (trainer, bare, trainer, bare ...) so that load from other
processes hits both alike. The two models see the same batches from the same weights, so every
step's loss must agree: the first step's losses are printed and checked, and the largest
difference over all steps is printed. The table gives, per side, the median and the best window
in wall-clock time and the median in process CPU time, as ms per step; the trainer's speed relative
to the bare loop (bare / trainer; the target is >= 0.97x) and its host overhead in ms per step
(trainer - bare). On CPU torch runs one thread by default (--threads), so the CPU time measures
the work done even when other jobs share the machine (with several OpenMP threads on a busy
machine both clocks mostly measure waiting); the RESULT lines use it there, and the wall-clock
median on a GPU. ``--profile`` adds where the trainer's extra time goes: cProfile of both sides,
own time per function, trainer minus bare, in ms per step, then the project's functions by
cumulative time. Lines starting with ``RESULT`` are what ``scripts/gpu_check.sh`` puts in its table.

    cd /work/main && .venv/bin/python benchmarks/bench_trainer_overhead.py        # CPU: tiny and small, ~1.5 min
    .venv/bin/python benchmarks/bench_trainer_overhead.py --preset tiny --profile
    python benchmarks/bench_trainer_overhead.py --preset gpu          # GPU: ~125M-parameter GPT, bf16, < 1 min
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import logging
import os
import pstats
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

from megatron_dga.data import mock

PRESETS = {
    "tiny": dict(
        layers=2, hidden=64, heads=4, seq=64, vocab=512, micro_batch=4, batch=8, window=8, rounds=30, extra=[]
    ),
    "small": dict(
        layers=4, hidden=256, heads=4, seq=256, vocab=2048, micro_batch=2, batch=4, window=3, rounds=10, extra=[]
    ),
    # GPT-2 small shape; micro-batch 8 x 1024 tokens, 4 micro-batches per step. Sized for the minute
    # scripts/gpu_check.sh gives it (two models, 3 + 20 + 1 trainer steps and 23 bare ones).
    "gpu": dict(
        layers=12,
        hidden=768,
        heads=12,
        seq=1024,
        vocab=32000,
        micro_batch=8,
        batch=32,
        window=4,
        rounds=5,
        extra=["--bf16"],
    ),
}
DOMAINS = 4


def build_trainer(p: dict, prefixes: list, log_dir: str, train_iters: int):
    from megatron_dga import platform
    from megatron_dga.training.arguments import parse_args
    from megatron_dga.training.trainer import Trainer

    argv = [
        "--data-path",
        *prefixes,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(p["vocab"] - 1),
        "--num-layers",
        str(p["layers"]),
        "--hidden-size",
        str(p["hidden"]),
        "--num-attention-heads",
        str(p["heads"]),
        "--seq-length",
        str(p["seq"]),
        "--micro-batch-size",
        str(p["micro_batch"]),
        "--global-batch-size",
        str(p["batch"]),
        "--train-iters",
        str(train_iters),
        "--lr",
        "3e-4",
        "--lr-warmup-iters",
        "2",
        "--log-interval",
        str(10 * train_iters),
        "--eval-interval",
        "0",
        "--log-dir",
        log_dir,
        "--mixing",
        "uniform",
        *p["extra"],
    ]
    cfg = parse_args(argv)
    return Trainer(cfg, platform.initialize(cfg.parallel))


class BareLoop:
    """Megatron's train_step on a second copy of the trainer's model: megatron-core calls only."""

    def __init__(self, trainer):
        from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_dga.model import build_model_chunks, causal_attention_mask
        from megatron_dga.platform import megatron_cuda_calls_on_cpu
        from megatron_dga.training.optim import ddp_config, megatron_optimizer_config, scheduler_arguments

        cfg, ctx = trainer.cfg, trainer.ctx
        built = build_model_chunks(cfg.model, ctx)
        if len(built) != 1 or len(trainer.chunks) != 1:
            raise SystemExit("this benchmark runs one model chunk (no virtual pipeline stages)")
        core, module = built[0]
        with torch.no_grad():  # the trainer's initial weights, before DDP and the optimizer copy them
            mine, theirs = dict(core.named_parameters()), dict(trainer.model.named_parameters())
            if mine.keys() != theirs.keys():
                raise SystemExit("the bare model's parameters differ from the trainer's by name")
            for name, param in mine.items():
                param.copy_(theirs[name])
        self.ddp = DistributedDataParallel(core.config, ddp_config(cfg.optimizer), module)
        self.shims = megatron_cuda_calls_on_cpu
        with self.shims():
            self.optimizer = get_megatron_optimizer(
                megatron_optimizer_config(cfg.optimizer, bf16=cfg.model.bf16, fp16=cfg.model.fp16), [self.ddp]
            )
        self.scheduler = OptimizerParamScheduler(self.optimizer, **scheduler_arguments(cfg.optimizer, cfg.schedule))
        # The hooks Megatron's train() sets once on the model config.
        config = core.config
        config.no_sync_func = self.ddp.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.schedule = get_forward_backward_func()
        self.device = ctx.device
        self.seq = cfg.model.seq_length
        self.micro_batch = cfg.schedule.micro_batch_size
        self.mask = causal_attention_mask(self.seq, self.device)

    @staticmethod
    def _loss(loss_mask, output):
        loss = (output.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)  # the trainer's formula
        return loss, {"lm loss": loss.detach().clone()}  # the schedule divides loss in place

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, position_ids, labels, loss_mask = (
            batch[k].to(self.device, non_blocking=True) for k in ("tokens", "position_ids", "labels", "loss_mask")
        )
        output = model(tokens, position_ids, self.mask, labels=labels)
        return output, functools.partial(self._loss, loss_mask.float())

    def step(self, micro_batches) -> torch.Tensor:
        """One optimizer step; returns the mean micro-batch loss as a device tensor."""
        self.ddp.zero_grad_buffer()
        with self.shims():
            self.optimizer.zero_grad()
            losses = self.schedule(
                forward_step_func=self._forward_step,
                data_iterator=iter(micro_batches),
                model=[self.ddp],
                num_microbatches=len(micro_batches),
                seq_length=self.seq,
                micro_batch_size=self.micro_batch,
                forward_only=False,
            )
            update_successful, _, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        return torch.stack([x["lm loss"] for x in losses]).mean()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Interleaved:
    """Runs the bare loop between the trainer's windows, from inside ``Trainer.train()``.

    ``train()`` calls its step method (``self._step()``, or ``self.train_step()`` in trainers without
    it); an instance attribute of that name takes the call, so the trainer's loop runs unchanged. At
    each window boundary the trainer's window is closed (start of its first iteration to start of the
    next window: the loop's hooks included), the bare loop replays the micro-batches the trainer drew
    in that window, and the next trainer window opens.
    The first ``warmup`` steps are replayed too (the two models must stay identical), untimed.
    """

    def __init__(self, trainer, bare: BareLoop, warmup: int, window: int, rounds: int, profile: bool):
        self.trainer, self.bare = trainer, bare
        self.warmup, self.window = warmup, window
        self.last = warmup + rounds * window  # the last boundary: the step after it is not timed
        self.calls = 0
        self.recorded = []  # the micro-batches the trainer drew since the last boundary
        self.trainer_losses, self.bare_losses = [], []
        self.times = {"trainer": [], "bare": []}  # (wall s, process CPU s) per window
        self._start = None
        # The step method train() calls: _step (the loss left on the device) where the trainer has one.
        self._method = "_step" if hasattr(type(trainer), "_step") else "train_step"
        self._train_step = getattr(trainer, self._method)
        self._next = trainer.data.next_train_micro_batches
        self.profilers = {"trainer": cProfile.Profile(), "bare": cProfile.Profile()} if profile else None
        setattr(trainer, self._method, self.train_step)
        trainer.data.next_train_micro_batches = self.next_train_micro_batches

    def next_train_micro_batches(self):
        micro_batches = self._next()
        self.recorded.append(micro_batches)
        return micro_batches

    def train_step(self):
        i = self.calls
        if i >= self.warmup and (i - self.warmup) % self.window == 0:
            self._boundary(timed=i > self.warmup)
        self.calls += 1
        loss, grad_norm, lr = self._train_step()
        self.trainer_losses.append(loss)  # maybe a device tensor: read after the run
        return loss, grad_norm, lr

    def _boundary(self, timed: bool) -> None:
        _sync()
        profile = self.profilers is not None and timed
        if profile:
            self.profilers["trainer"].disable()
        if timed:
            self.times["trainer"].append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))
        batches, self.recorded = self.recorded, []
        if profile:
            self.profilers["bare"].enable()
        wall, cpu = time.perf_counter(), time.process_time()
        losses = [self.bare.step(mbs) for mbs in batches]
        _sync()
        if timed:
            self.times["bare"].append((time.perf_counter() - wall, time.process_time() - cpu))
        if profile:
            self.profilers["bare"].disable()
        self.bare_losses.extend(float(loss) for loss in losses)
        if self.profilers is not None and self.calls < self.last:
            self.profilers["trainer"].enable()
        self._start = (time.perf_counter(), time.process_time())

    def finish(self) -> None:
        delattr(self.trainer, self._method)
        del self.trainer.data.next_train_micro_batches


CLOCKS = {
    "wall median": (0, statistics.median),
    "wall best": (0, min),
    "cpu median": (1, statistics.median),
}
"""Per-side statistics over the windows: (column of (wall, process CPU), statistic)."""


def per_step_ms(times, window: int, clock: str) -> float:
    column, stat = CLOCKS[clock]
    return 1e3 * stat([t[column] for t in times]) / window


def _own_times(profiler: cProfile.Profile) -> dict:
    """(file, line, function) -> (own seconds, calls, cumulative seconds)."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    return {f: (tt, nc, ct) for f, (_, nc, tt, ct, _) in stats.stats.items()}


def _where(key) -> str:
    file, line, name = key
    if file.startswith("/"):
        parts = file.split("site-packages/", 1)
        file = parts[1] if len(parts) == 2 else os.path.relpath(file)
    return f"{file}:{line}({name})"


def profile_lines(profilers: dict, steps: int, top: int) -> list:
    """Where the trainer's extra time goes: own time per function, trainer minus bare, ms per step;
    then the project's own functions on the trainer side by cumulative time."""
    trainer, bare = _own_times(profilers["trainer"]), _own_times(profilers["bare"])
    diff = []
    for key in set(trainer) | set(bare):
        t, b = trainer.get(key, (0.0, 0, 0.0)), bare.get(key, (0.0, 0, 0.0))
        diff.append((t[0] - b[0], t[0], b[0], t[1] - b[1], key))
    diff.sort(reverse=True)
    total = (sum(v[0] for v in trainer.values()) - sum(v[0] for v in bare.values())) / steps
    lines = [
        f"  own time, trainer minus bare (total {1e3 * total:.3f} ms/step): "
        f"{'diff':>8s} {'trainer':>8s} {'bare':>8s} {'+calls':>7s} ms/step"
    ]
    for d, t, b, calls, key in diff[:top]:
        lines.append(
            f"    {1e3 * d / steps:8.3f} {1e3 * t / steps:8.3f} {1e3 * b / steps:8.3f} {calls / steps:7.1f}  "
            f"{_where(key)}"
        )
    ours = sorted(((ct, nc, key) for key, (_, nc, ct) in trainer.items() if "megatron_dga" in key[0]), reverse=True)
    lines.append("  the project's functions on the trainer side, cumulative ms/step (calls/step):")
    for ct, nc, key in ours[:top]:
        lines.append(f"    {1e3 * ct / steps:8.3f} ({nc / steps:5.1f})  {_where(key)}")
    return lines


def run_preset(name: str, p: dict, args) -> dict:
    from megatron_dga import platform

    window = args.window or p["window"]
    rounds = args.rounds or p["rounds"]
    warmup = args.warmup
    # The last iteration (after the last boundary) logs and is not timed.
    train_iters = warmup + rounds * window + 1
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        # The project's synthetic shards (what --mock-data writes): Markov-chain documents, eod-terminated.
        prefixes = mock.write_domains(
            tmp,
            vocab_size=p["vocab"],
            eod=p["vocab"] - 1,
            k=DOMAINS,
            docs_per_domain=max(64, 2 * p["batch"] * train_iters // DOMAINS),
            doc_len=p["seq"] + 1,
        )["domains"]
        trainer = build_trainer(p, prefixes, os.path.join(tmp, "run"), train_iters)
        bare = BareLoop(trainer)
        run = Interleaved(trainer, bare, warmup, window, rounds, args.profile)
        try:
            trainer.train()
        finally:
            run.finish()
        params = trainer.cfg.model.num_parameters()
        platform.shutdown()
    a = np.array([float(loss) for loss in run.trainer_losses[: len(run.bare_losses)]])
    b = np.array(run.bare_losses)
    tol = 2e-2 if p["extra"] else 1e-4  # bf16: same kernels, but the loss reductions round differently
    print(
        f"[{name}] first-step loss: trainer {a[0]:.6f}, bare {b[0]:.6f}; largest |difference| over "
        f"{len(b)} steps {np.max(np.abs(a - b)):.2e}"
    )
    if not np.isclose(a[0], b[0], rtol=tol, atol=0):
        raise SystemExit(
            f"[{name}] the first step's losses differ ({a[0]} vs {b[0]}): the two sides do not "
            "train the same model on the same batch; the comparison would mean nothing"
        )
    result = dict(name=name, params=params, window=window, rounds=rounds)
    for clock in CLOCKS:
        result[clock] = tuple(per_step_ms(run.times[side], window, clock) for side in ("trainer", "bare"))
    if run.profilers is not None:
        result["profile"] = profile_lines(run.profilers, rounds * window, args.profile_top)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        nargs="+",
        choices=sorted(PRESETS),
        default=None,
        help="model/batch presets, run in turn (default: gpu with CUDA, tiny and small without)",
    )
    parser.add_argument("--window", type=int, default=None, help="steps per timed window (default: the preset's)")
    parser.add_argument("--rounds", type=int, default=None, help="timed windows per side (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (both sides)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (1: process CPU time then measures work, robust on a shared "
        "machine; 0: torch's default, OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile both sides; print where the trainer's extra time goes"
    )
    parser.add_argument("--profile-top", type=int, default=25)
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    names = args.preset or (["gpu"] if torch.cuda.is_available() else ["tiny", "small"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    results = [run_preset(name, PRESETS[name], args) for name in names]

    print(f"\ntrainer vs bare megatron-core loop ({device}), ms per step over the interleaved windows")
    print(
        f"{'preset':7s} {'params':>11s} {'clock':12s} {'trainer':>9s} {'bare':>9s} {'speed bare/trainer':>19s} "
        f"{'overhead':>9s}"
    )
    for r in results:
        for clock in CLOCKS:
            t, b = r[clock]
            print(f"{r['name']:7s} {r['params']:11,d} {clock:12s} {t:9.2f} {b:9.2f} {b / t:18.3f}x {t - b:9.2f}")
    for r in results:
        if "profile" in r:
            print(f"\n[{r['name']}] cProfile (it adds its own cost per call, so the trainer's extra calls weigh more):")
            print("\n".join(r["profile"]))
    print()
    # On a GPU the step is the device's time as the host sees it; on CPU the process CPU time (one torch
    # thread by default) measures the work done whatever else the machine runs.
    headline = "wall median" if torch.cuda.is_available() else "cpu median"
    for r in results:
        p = PRESETS[r["name"]]
        shape = (
            f"{p['layers']}x{p['hidden']}, seq {p['seq']}, batch {p['batch']}/{p['micro_batch']}"
            f"{' bf16' if '--bf16' in p['extra'] else ''}"
        )
        t, b = r[headline]
        print(
            f"RESULT trainer speed vs bare megatron-core loop ({r['name']}: {shape}, {device}, {headline}): "
            f"{b / t:.3f}x (trainer {t:.2f} ms/step, bare {b:.2f} ms/step)"
        )
        print(f"RESULT trainer host overhead per step ({r['name']}, {headline}): {t - b:.2f} ms")


if __name__ == "__main__":
    main()
