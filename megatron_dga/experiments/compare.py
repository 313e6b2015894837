"""The paper's comparison on your own domains and target, or on the embedded corpus: several methods
over several seeds, resumable, with means, spreads, paired differences and plain-words verdicts.

Scenarios:
  token-limited   every generic domain is capped (--token-limit tokens, --domain-token-limit), as in
                  the paper's 30M-tokens-per-domain regime: importance sampling keeps drawing the few
                  domains nearest the target and repeats them epoch after epoch; DGA sees their
                  gradients shrink as they are overfit and moves weight on.
  unlimited       the same methods without a cap (the paper's Fig. 1 sets both side by side).
  fine-grained    little specific data (--specific-docs documents) and many fine domains: the
                  domains' shards are clustered into a fine-domain map (hierarchical k-means on the
                  documents' token ids, --fine-clusters 16 16 16 -> 4,096 fine domains inside the
                  ordinary shards, trained with --data-path <shards> --domain-map map.npz); DGA runs on
                  N basis distributions (each coarse domain's histogram over the fine ones: distribution
                  reweighting, --dga-basis), beside importance sampling on the fine domains and uniform.

Data, one of:
  (nothing)                         the embedded default corpus, built from this Python installation
  --corpus-dir DIR --target-train FILE.jsonl --target-eval FILE.jsonl
                                    DIR holds one <domain>.jsonl per domain; the runner trains the
                                    tokenizer, writes the shards and the importance weights with
                                    tools/train_tokenizer.py, preprocess_data.py, importance_weights.py
                                    (cached under OUT/data: a re-run skips what is done)
  --data-path P1 P2 ... --specific-data-path P --specific-eval-data-path P --tokenizer-model M
                                    shards built beforehand (+ --importance-weights FILE for the
                                    importance method; fine-grained computes its own over the map)

Every method runs under every --seeds value as a real pretraining job in
OUT/<scenario>/runs/<method>/seed<seed>/. A re-run of the same command skips finished runs and
resumes an interrupted one from its checkpoint (Ctrl-C saves first). The results, recomputed
from the runs' metrics.jsonl: OUT/<scenario>/results.md, results.csv (per method), runs.csv (per
run) and PNG plots; with --eval-tasks also each run's downstream accuracy (lm-evaluation-harness on its
final checkpoint, the same statistics and paired verdicts). Presets: cpu (a 0.7M-parameter GPT, minutes on 2 cores) and gpu (a 125M GPT
in bf16, one process per visible GPU).

    python examples/experiments.py token-limited --out runs/exp
    python examples/experiments.py unlimited --corpus-dir corpus/ --target-train t.jsonl \\
        --target-eval t_eval.jsonl --seeds 1 2 3 --methods uniform,importance,dga,dga_ema --out runs/mine
    # does the learned mixture transfer? dga_ema->static trains --mixing static on the time-averaged
    # mixture of the dga_ema run of the same seed (tools/export_mixture.py), after it
    python examples/experiments.py unlimited --methods 'uniform,dga_ema,dga_ema->static' --out runs/transfer
    # one command for a sweep: every DGA method once per (eta, beta), baselines once per seed
    python examples/experiments.py token-limited ... --methods uniform,importance,dga_ema \\
        --sweep dga-eta=3,10,30 dga-ema=0.1,0.3,1.0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
from typing import Dict, List, Sequence

from megatron_dga.experiments import runner as ex
from megatron_dga.errors import ConfigError, DGAError
from megatron_dga.fileio import atomic_write_json, atomic_write_text, ensure_writable_dir

SCENARIOS = ("token-limited", "unlimited", "fine-grained")

PRESETS = {
    "cpu": {
        "model": [
            "--num-layers",
            "2",
            "--hidden-size",
            "128",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "128",
            "--position-embedding-type",
            "rope",
        ],
        "batch": ["--micro-batch-size", "16", "--global-batch-size", "16"],
        "optim": ["--lr", "2e-3", "--min-lr", "2e-4", "--weight-decay", "0.1"],
        "train_iters": 600,
        "token_limit": 40_000,
        "dga": ["--dga-domain-batch-size", "4", "--dga-specific-batch-size", "8"],
    },
    "gpu": {
        "model": [
            "--num-layers",
            "12",
            "--hidden-size",
            "768",
            "--num-attention-heads",
            "12",
            "--seq-length",
            "1024",
            "--position-embedding-type",
            "rope",
            "--bf16",
        ],
        "batch": ["--micro-batch-size", "8", "--global-batch-size", "64"],
        "optim": ["--lr", "6e-4", "--min-lr", "6e-5", "--weight-decay", "0.1"],
        "train_iters": 3000,
        "token_limit": 2_000_000,
        "dga": ["--dga-domain-batch-size", "8", "--dga-specific-batch-size", "32"],
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--out", default="runs/experiments", help="output directory (default: runs/experiments)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="model/optimizer preset (default: cpu)")
    g = p.add_argument_group("data: jsonl domains")
    g.add_argument("--corpus-dir", help="directory of <domain>.jsonl files, one per domain")
    g.add_argument("--target-train", help="the target's training split (jsonl), DGA's specific set")
    g.add_argument("--target-eval", help="the target's evaluation split (jsonl)")
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer vocabulary (default: 4096 with --corpus-dir, the builder's with the embedded corpus; "
        "prepared shards with --tokenizer-type NullTokenizer: the trainer's --vocab-size)",
    )
    g.add_argument("--prep-seed", type=int, default=1234, help="seed of tokenizer sampling and clustering")
    g = p.add_argument_group("data: shards built beforehand")
    g.add_argument("--data-path", nargs="+", help="one shard prefix per domain (<dir>/<name>_text_document)")
    g.add_argument("--specific-data-path", help="shard prefix of the target's training split")
    g.add_argument("--specific-eval-data-path", help="shard prefix of the target's evaluation split")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", help="the shards' tokenizer type")
    g.add_argument("--tokenizer-model", help="the shards' tokenizer model")
    g.add_argument("--importance-weights", help="weights file of the importance method (tools/importance_weights.py)")
    g = p.add_argument_group("runs")
    g.add_argument("--seeds", type=int, nargs="+", default=[1234], help="one run per seed and method (default: 1234)")
    g.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the scenario's methods (default: all); "
        "<method>->static (quoted in a shell) trains --mixing static on that method's time-averaged mixture",
    )
    g.add_argument("--train-iters", type=int, default=None, help="default: the preset's")
    g.add_argument("--token-limit", type=int, default=None, help="token-limited: tokens per domain (default: preset's)")
    g.add_argument("--dga-interval", type=int, default=10, help="T_r of the DGA methods")
    g.add_argument("--eval-interval", type=int, default=None, help="default: train-iters / 12, at least 10")
    g.add_argument("--eval-iters", type=int, default=2, help="evaluation batches (default: 2)")
    g.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="checkpoint interval of every run, for resuming (default: train-iters / 4)",
    )
    g.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints of finished runs")
    g.add_argument(
        "--extra-args",
        default="",
        help="trainer flags for every run, quoted; they replace the preset's (e.g. '--lr 1e-3'; one "
        "flag alone: --extra-args=--bf16)",
    )
    g.add_argument(
        "--dga-args", default="", help="trainer flags for the DGA methods' runs only (e.g. '--dga-preconditioner adam')"
    )
    g.add_argument(
        "--sweep",
        nargs="+",
        default=[],
        metavar="FLAG=V1,V2",
        help="a DGA flag and its values: every DGA method runs once per combination of all --sweep "
        "items (e.g. dga-eta=3,10 dga-ema=0.1,0.3); baselines run once per seed",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="OpenMP threads per run, shared by its ranks (default: all cores)",
    )
    g = p.add_argument_group("downstream accuracy (lm-evaluation-harness: pip install '.[eval]')")
    g.add_argument(
        "--eval-tasks",
        default=None,
        help="evaluate each run's final checkpoint on these lm_eval tasks (comma-separated names, e.g. "
        "arc_easy,hellaswag,piqa,sciq,mmlu, and/or directories of task YAMLs with local data); the "
        "accuracies join results.md/csv with the same statistics and verdicts as the losses",
    )
    g.add_argument("--eval-limit", type=float, default=None, help="items per task (or a fraction < 1; default: all)")
    g.add_argument("--eval-num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    g = p.add_argument_group("fine-grained")
    g.add_argument(
        "--fine-clusters",
        type=int,
        nargs="+",
        default=[16, 16, 16],
        help="k-means levels of the fine-domain map, k1 [k2 ...] (default: 16 16 16 = 4,096 fine domains)",
    )
    g.add_argument(
        "--specific-docs",
        type=int,
        default=60,
        help="documents of the target's training split kept as the specific set (default: 60)",
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- flags
def parse_flags(text: str, what: str) -> List[tuple]:
    """``"--a 1 --b x y --c"`` -> ``[("--a", ["1"]), ("--b", ["x", "y"]), ("--c", [])]``."""
    tokens = shlex.split(text)
    if tokens and not tokens[0].startswith("--"):
        raise ConfigError(f"{what} {text!r}: expected trainer flags starting with '--', e.g. '--lr 1e-3'")
    flags: List[tuple] = []
    for tok in tokens:
        if tok.startswith("--"):
            flags.append((tok, []))
        else:
            flags[-1][1].append(tok)
    return flags


def set_flag(argv: Sequence[str], flag: str, values: Sequence[str]) -> List[str]:
    """``argv`` with every occurrence of ``flag`` (and its values) replaced by ``flag values`` at the end."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
        else:
            out.append(argv[i])
            i += 1
    return [*out, flag, *values]


def with_flags(argv: Sequence[str], flags: Sequence[tuple]) -> List[str]:
    for flag, values in flags:
        argv = set_flag(argv, flag, values)
    return list(argv)


def is_dga(argv: Sequence[str]) -> bool:
    return any(a == "--mixing" and b == "dga" for a, b in zip(argv, argv[1:]))


def parse_sweep(items: Sequence[str]) -> List[tuple]:
    """``["dga-eta=3,10", ...]`` -> ``[("--dga-eta", ["3", "10"]), ...]``."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        flag = "--" + key.strip().lstrip("-").replace("_", "-")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or flag == "--" or not vals:
            raise ConfigError(f"--sweep {item!r}: write FLAG=V1,V2,... (e.g. dga-eta=3,10,30)")
        if not flag.startswith("--dga-"):
            raise ConfigError(
                f"--sweep {item!r}: only DGA flags (--dga-*) are swept, baselines run once per seed; "
                "give other flags to every method with --extra-args"
            )
        out.append((flag, vals))
    return out


def sweep_variants(methods: Dict[str, List[str]], sweep: Sequence[tuple]) -> Dict[str, List[str]]:
    """Each DGA method replaced by one variant per combination of the sweep's values, named
    ``<method>+<flag without --dga->=<value>...``; variants that equal an earlier one are dropped."""
    if not sweep:
        return methods
    out: Dict[str, List[str]] = {}
    for name, argv in methods.items():
        if not is_dga(argv):
            out[name] = argv
            continue
        for combo in itertools.product(*(vals for _, vals in sweep)):
            variant = with_flags(argv, [(flag, [v]) for (flag, _), v in zip(sweep, combo)])
            label = name + "".join(f"+{flag[len('--dga-') :]}={v}" for (flag, _), v in zip(sweep, combo))
            same = next((n for n, a in out.items() if a == variant), None)
            if same:
                ex.say(f"[sweep] {label} runs the same flags as {same}: dropped")
            else:
                out[label] = variant
    return out


# --------------------------------------------------------------------------- data
def prepare_data(args, data_dir: str) -> ex.ExperimentData:
    """The experiment's shards and tokenizer from the data flags (module docstring)."""
    jsonl = [f for f in ("corpus_dir", "target_train", "target_eval") if getattr(args, f)]
    shards = [
        f for f in ("data_path", "specific_data_path", "specific_eval_data_path", "tokenizer_model") if getattr(args, f)
    ]
    if jsonl and shards:
        raise ConfigError(
            f"--{jsonl[0].replace('_', '-')} with --{shards[0].replace('_', '-')}: give jsonl domains "
            "(--corpus-dir, --target-train, --target-eval) or prepared shards (--data-path, ...), not both"
        )
    if jsonl:
        missing = [f for f in ("corpus_dir", "target_train", "target_eval") if not getattr(args, f)]
        if missing:
            raise ConfigError(
                f"--corpus-dir needs --target-train and --target-eval; --{missing[0].replace('_', '-')} is missing"
            )
        return ex.prepare_jsonl_corpus(
            args.corpus_dir,
            args.target_train,
            args.target_eval,
            data_dir,
            vocab_size=args.vocab_size or 4096,
            seed=args.prep_seed,
            workers=max(1, args.threads),
        )
    if shards:
        null = args.tokenizer_type == "NullTokenizer"  # synthetic shards of token ids: --vocab-size, no model file
        missing = [
            f
            for f in (
                "data_path",
                "specific_data_path",
                "specific_eval_data_path",
                "vocab_size" if null else "tokenizer_model",
            )
            if not getattr(args, f)
        ]
        if missing:
            raise ConfigError(
                f"prepared shards need --data-path, --specific-data-path, --specific-eval-data-path and "
                f"--tokenizer-model (--vocab-size with --tokenizer-type NullTokenizer); "
                f"--{missing[0].replace('_', '-')} is missing"
            )
        if args.scenario == "fine-grained" and args.importance_weights:
            raise ConfigError(
                f"--importance-weights {args.importance_weights} with fine-grained: that scenario "
                "computes the importance weights over the fine domains of the map it builds from "
                "--data-path; drop --importance-weights"
            )
        tokenizer = ["--vocab-size", str(args.vocab_size)] if null else ["--tokenizer-model", args.tokenizer_model]
        return ex.shards_data(
            args.data_path,
            args.specific_data_path,
            args.specific_eval_data_path,
            ["--tokenizer-type", args.tokenizer_type, *tokenizer],
            args.importance_weights,
        )
    if args.importance_weights:
        raise ConfigError(
            "--importance-weights goes with prepared shards (--data-path ...); with jsonl domains or "
            "the embedded corpus the runner computes the weights"
        )
    return ex.embedded_data(data_dir, args.vocab_size, args.prep_seed)


def check_same_source(out: str, data: ex.ExperimentData) -> None:
    """One --out holds one experiment's data: refuse another source before any run starts."""
    path = os.path.join(out, "experiment.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            previous = json.load(fh).get("source")
        if previous != data.source:
            raise ConfigError(
                f"--out {out} holds runs on {previous}; this command trains on {data.source}. Pass another --out"
            )
    else:
        atomic_write_json(path, {"source": data.source}, indent=1)


# --------------------------------------------------------------------------- methods
def common_args(data: ex.ExperimentData, preset: dict, args) -> List[str]:
    iters = args.train_iters or preset["train_iters"]
    # Warmup over the first 1/30 of the run (20 of the CPU preset's 600 iterations), so a
    # shortened run keeps megatron's warmup < decay length.
    return [
        "--lr-warmup-iters",
        str(iters // 30),
        *data.tokenizer_args,
        "--train-iters",
        str(iters),
        *preset["model"],
        *preset["batch"],
        *preset["optim"],
        "--log-interval",
        "10",
        "--eval-interval",
        str(args.eval_interval or max(iters // 12, 10)),
        "--eval-iters",
        str(args.eval_iters),
    ]


def dga_args(preset: dict, args) -> List[str]:
    """The DGA flags (the trainer refuses them without --mixing dga)."""
    return ["--mixing", "dga", "--dga-interval", str(args.dga_interval), "--dga-eta", "10", *preset["dga"]]


def domain_methods(data: ex.ExperimentData, preset: dict, args) -> Dict[str, List[str]]:
    """token-limited and unlimited: uniform, importance sampling, DGA without and with EMA."""
    base = [
        "--data-path",
        *data.domain_prefixes,
        "--specific-data-path",
        data.specific_prefix,
        "--specific-eval-data-path",
        data.specific_eval_prefix,
        *common_args(data, preset, args),
    ]
    if args.scenario == "token-limited":
        base += ["--domain-token-limit", str(args.token_limit or preset["token_limit"])]
    noise_args = ["--dga-noise", "shrink", "--dga-noise-groups", str(NOISE_GROUPS)]
    instep_args = ["--dga-estimator", "instep", "--micro-batch-size", str(INSTEP_MICRO_BATCH)]
    methods = {
        "uniform": base + ["--mixing", "uniform"],
        "dga": base + [*dga_args(preset, args), "--dga-ema", "1.0"],
        "dga_ema": base + [*dga_args(preset, args), "--dga-ema", "0.1"],
        # token budgets on the simplex: at most CAP_EPOCHS epochs of any domain's distinct samples
        "dga_ema_cap": base + [*dga_args(preset, args), "--dga-ema", "0.1", "--dga-max-epochs", str(CAP_EPOCHS)],
        # alignment noise: the update on alignments shrunk by their standard error over NOISE_GROUPS groups
        "dga_ema_shrink": base + [*dga_args(preset, args), "--dga-ema", "0.1", *noise_args],
        # alignments from the training micro-batches, grouped by domain (small micro-batches: most hold one)
        "dga_ema_instep": base + [*dga_args(preset, args), "--dga-ema", "0.1", *instep_args],
    }
    methods.update(online_baselines(base, args))
    if data.importance_weights:  # computed or given only when the importance method runs
        methods["importance"] = base + ["--mixing", "importance", "--importance-weights", data.importance_weights]
    # <A>->static: --mixing static on A's time-averaged mixture (its weights join --data-path at run time)
    methods.update({m + ex.TRANSFER_SUFFIX: base + ["--mixing", "static"] for m in list(methods)})
    return methods


def online_baselines(base: List[str], args) -> Dict[str, List[str]]:
    """The other online mixers at their defaults: ODM (an EXP3 bandit on the training losses, no specific
    set) and PiKE (gradient size and noise, no specific set), PiKE updating as often as DGA."""
    return {
        "odm": base + ["--mixing", "odm"],
        "pike": base + ["--mixing", "pike", "--pike-interval", str(args.dga_interval)],
    }


def fine_grained_methods(data: ex.ExperimentData, fine: ex.FineDomainData, preset: dict, args) -> Dict[str, List[str]]:
    """fine-grained: uniform, importance and DGA over the basis distributions, all over the K fine
    domains of the map (``ex.prepare_fine_domains``), sampled inside the domains' ordinary shards."""
    base = [
        "--data-path",
        *data.domain_prefixes,
        "--domain-map",
        fine.domain_map,
        "--data-cache-path",
        fine.cache_dir,  # the fine-domain index: built by the first run, read by the others
        "--specific-data-path",
        fine.specific_prefix,
        "--specific-eval-data-path",
        data.specific_eval_prefix,
        *common_args(data, preset, args),
    ]
    return {
        "uniform": base + ["--mixing", "uniform"],
        "importance": base + ["--mixing", "importance", "--importance-weights", fine.importance_weights],
        "dga_basis": base + [*dga_args(preset, args), "--dga-ema", "0.1", "--dga-basis", fine.basis],
        "odm": base + ["--mixing", "odm"],  # a bandit arm per fine domain (PiKE would probe each one)
    }


CAP_EPOCHS = 4
"""--dga-max-epochs of the dga_ema_cap method: up to 4 epochs, repeated data trains nearly as well as new
data (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models")."""

NOISE_GROUPS = 4
"""--dga-noise-groups of the dga_ema_shrink method: 4 groups (of one sequence each in the cpu preset, whose
domain probe is 4 sequences; of two in the gpu preset)."""

INSTEP_MICRO_BATCH = 2
"""--micro-batch-size of the dga_ema_instep method: a global batch sorted by domain and cut into micro-batches
of 2 leaves most of them with one domain (the same training math as one micro-batch of the whole batch)."""

DOMAIN_METHODS = (
    "uniform",
    "importance",
    "dga",
    "dga_ema",
    "dga_ema_cap",
    "dga_ema_shrink",
    "dga_ema_instep",
    "odm",
    "pike",
)
"""The methods of the token-limited and unlimited scenarios (``domain_methods``)."""

SCENARIO_METHODS = {
    "token-limited": DOMAIN_METHODS,
    "unlimited": DOMAIN_METHODS,
    "fine-grained": ("uniform", "importance", "dga_basis", "odm"),
}
"""Every method of each scenario (--methods chooses among them)."""
DEFAULT_METHODS = {
    "token-limited": ("uniform", "importance", "dga", "dga_ema"),
    "unlimited": ("uniform", "importance", "dga", "dga_ema"),
    "fine-grained": ("uniform", "importance", "dga_basis"),
}
"""The methods run without --methods: the paper's comparison."""


def chosen_methods(args) -> List[str]:
    """The --methods in order, each transfer method ``<A>->static`` after the methods it depends on."""
    names = SCENARIO_METHODS[args.scenario]
    chosen = (
        [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.methods
        else list(DEFAULT_METHODS[args.scenario])
    )
    transfers = [m for m in chosen if m.endswith(ex.TRANSFER_SUFFIX)]
    unknown = [m for m in chosen if m not in names and m not in transfers]
    if unknown or not chosen:
        raise ConfigError(
            f"--methods {args.methods!r}: {unknown or 'none'} not a method of {args.scenario}; choose "
            f"from {', '.join(names)}, or <method>{ex.TRANSFER_SUFFIX} (a static run on that method's "
            "time-averaged mixture)"
        )
    for m in transfers:
        source = m[: -len(ex.TRANSFER_SUFFIX)]
        if args.scenario == "fine-grained":
            raise ConfigError(
                f"--methods {m}: transfer methods run in token-limited and unlimited (with a domain "
                "map, --data-path takes no weights); export the mixture with tools/export_mixture.py "
                "and train with --mixing importance --importance-weights FILE"
            )
        if source not in names:
            raise ConfigError(f"--methods {m}: {source!r} is not a method of {args.scenario} ({', '.join(names)})")
        if source not in chosen:
            raise ConfigError(f"--methods {m} trains on the mixture of {source}'s runs: add {source} to --methods")
        if getattr(args, "sweep", None):
            raise ConfigError(
                f"--methods {m} with --sweep: the sweep renames {source} into variants; run the "
                "transfer without --sweep"
            )
    return [m for m in chosen if m not in transfers] + transfers


def build_jobs(
    args, data: ex.ExperimentData, out: str, data_dir: str, fine: "ex.FineDomainData | None" = None
) -> List[ex.Job]:
    """One job per (method or sweep variant, seed), method-major (``fine``: the fine-grained scenario's data)."""
    preset = PRESETS[args.preset]
    chosen = chosen_methods(args)
    if args.scenario == "fine-grained":
        methods = fine_grained_methods(data, fine, preset, args)
    else:
        if "importance" in chosen:
            data = ex.with_importance_weights(data, data_dir)
        methods = domain_methods(data, preset, args)
    methods = {m: methods[m] for m in chosen}
    extra, dga_extra = parse_flags(args.extra_args, "--extra-args"), parse_flags(args.dga_args, "--dga-args")
    methods = {m: with_flags(with_flags(a, extra), dga_extra if is_dga(a) else []) for m, a in methods.items()}
    methods = sweep_variants(methods, parse_sweep(args.sweep))
    jobs = []
    for m, argv in methods.items():
        source = m[: -len(ex.TRANSFER_SUFFIX)] if m.endswith(ex.TRANSFER_SUFFIX) else None
        run_name = f"{source}-to-static" if source else m
        jobs += [
            ex.Job(m, seed, argv, os.path.join(out, "runs", run_name, f"seed{seed}"), mixture_from=source)
            for seed in args.seeds
        ]
    return jobs


# --------------------------------------------------------------------------- results
def write_results(
    args,
    data: ex.ExperimentData,
    results: Sequence[ex.RunResult],
    methods: Sequence[str],
    out: str,
    command: str,
    fine: "ex.FineDomainData | None" = None,
) -> str:
    """results.md, results.csv, runs.csv and the plots; returns the markdown."""
    from megatron_dga.experiments import results as er

    summary = er.Summary.of(results, methods)
    iters = args.train_iters or PRESETS[args.preset]["train_iters"]
    title = (
        f"### {args.scenario}: {data.source}; {args.preset} preset, {iters} iterations, "
        f"seeds {' '.join(map(str, args.seeds))}"
    )
    if args.scenario == "token-limited":
        title += f", {args.token_limit or PRESETS[args.preset]['token_limit']:,} tokens per domain"
    if fine is not None:
        title += (
            f", {fine.num_domains:,} fine domains ({' x '.join(map(str, fine.levels))} k-means, "
            f"{fine.empty_domains:,} empty) from a domain map over the {len(data.domains)} domains' shards, "
            f"{len(fine.basis_names)} basis distributions, {fine.specific_docs} specific documents"
        )
    table = er.markdown(summary, title)
    if len(args.seeds) == 1:
        table += (
            "\n\nOne seed: seeds move the target loss by ~0.05-0.1 nats at this scale, more than some gaps "
            "between methods; compare over several (--seeds 1 2 3) before concluding."
        )
    plots = er.write_plots(results, out)
    text = f"{table}\n\nCommand:\n\n    {command}\n\nPlots:\n" + "".join(
        f"- {os.path.relpath(p, out)}\n" for p in plots
    )
    atomic_write_text(os.path.join(out, "results.md"), text)
    atomic_write_text(os.path.join(out, "results.csv"), er.csv_text(summary))
    atomic_write_text(
        os.path.join(out, "runs.csv"), er.runs_csv_text(summary, {(r.method, r.seed): r.run_dir for r in results})
    )
    return table


def downstream_config(args):
    """The runs' evaluation.EvalConfig (None without --eval-tasks); a missing lm_eval fails here, before any run."""
    if not args.eval_tasks:
        if args.eval_limit is not None or args.eval_num_fewshot is not None:
            raise ConfigError("--eval-limit/--eval-num-fewshot need --eval-tasks")
        return None
    from megatron_dga import evaluation

    evaluation.require_lm_eval()
    limit = args.eval_limit
    tasks = [os.path.abspath(t) if os.path.isdir(t) else t for t in args.eval_tasks.split(",") if t.strip()]
    cfg = evaluation.EvalConfig(
        tasks=tasks, num_fewshot=args.eval_num_fewshot, limit=int(limit) if limit is not None and limit >= 1 else limit
    )
    evaluation.split_tasks(cfg.tasks)  # a missing task directory fails now
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python examples/experiments.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    root = os.path.abspath(args.out)
    out, data_dir = os.path.join(root, args.scenario), os.path.join(root, "data")
    try:
        if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
            raise ConfigError(f"--seeds {args.seeds}: give distinct non-negative integers")
        chosen_methods(args)  # before any preparation
        downstream = downstream_config(args)
        parse_sweep(args.sweep)
        fine = None
        if args.scenario == "fine-grained":
            ex.check_fine_args(args.fine_clusters, args.specific_docs)
        ensure_writable_dir(out, "--out")
        data = prepare_data(args, data_dir)
        check_same_source(root, data)
        if args.scenario == "fine-grained":
            fine = ex.prepare_fine_domains(
                data,
                data_dir,
                levels=args.fine_clusters,
                specific_docs=args.specific_docs,
                seed=args.prep_seed,
                workers=args.threads,
            )
        jobs = build_jobs(args, data, out, data_dir, fine)
        nproc = 1
        if args.preset == "gpu":
            import torch

            nproc = max(torch.cuda.device_count(), 1)
        iters = args.train_iters or PRESETS[args.preset]["train_iters"]
        save_interval = args.save_interval or max(iters // 4, 1)
        results, unfinished = [], []
        for i, job in enumerate(jobs, 1):
            ex.say(f"\n[{i}/{len(jobs)}] {args.scenario} / {job.method} / seed {job.seed}")
            if job.mixture_from is not None:  # after its source's run (chosen_methods orders them)
                source = next((r for r in results if (r.method, r.seed) == (job.mixture_from, job.seed)), None)
                if source is None:
                    ex.say(f"=== {job.method} seed {job.seed}: waits for {job.mixture_from} seed {job.seed} to finish")
                    unfinished.append(job)
                    continue
                job = ex.with_transferred_mixture(job, source)
            result = ex.run_job(
                job,
                save_interval=save_interval,
                threads=args.threads,
                nproc=nproc,
                keep_checkpoints=args.keep_checkpoints,
                evaluation=downstream,
            )
            (results if result is not None else unfinished).append(result or job)
    except ex.Interrupted as exc:
        print(f"\ninterrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(
            "\ninterrupted: re-run the same command to go on (finished preparation steps and runs are kept)",
            file=sys.stderr,
        )
        return 130
    except DGAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if unfinished:
        print(
            f"\n{len(unfinished)} run(s) stopped before --train-iters: "
            f"{', '.join(f'{j.method}/seed{j.seed}' for j in unfinished)}. Re-run the same command to resume them; "
            "the results are written once every run has finished.",
            file=sys.stderr,
        )
        return 3
    methods = list(dict.fromkeys(j.method for j in jobs))
    table = write_results(args, data, results, methods, out, command, fine)
    print("\n" + table + f"\n\nwritten: {os.path.join(out, 'results.md')}, results.csv, runs.csv and the plots")
    return 0
