"""Downstream evaluation (megatron_dga/evaluation.py, tools/evaluate.py) on the local multiple-choice task
tests/fixtures/lm_eval_tiny: the harness's accuracy against the model's own log-likelihoods computed here."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_dga.data import mock
from tests.helpers.dist_utils import run_distributed
from tests.helpers.synthetic import EOD, VOCAB, three_domain_shards

from tests.helpers import REPO as ROOT

TASK_DIR = os.path.join(ROOT, "tests", "fixtures", "lm_eval_tiny")
ITEMS = os.path.join(TASK_DIR, "tiny_chain.jsonl")


def chain_items(per_domain: int = 12, context_len: int = 6, seed: int = 7) -> list:
    """tiny_chain's items (tests/fixtures/lm_eval_tiny/utils.py): contexts following one domain's successor
    table (three_domain_shards' tables), the answer its successor, wrong choices no domain's successor."""
    ids = mock.content_ids(VOCAB, EOD)
    tables = mock.domain_tables(3, len(ids), seed=0)
    rng = np.random.default_rng(seed)
    items = []
    for d in range(3):
        for _ in range(per_domain):
            chain = [int(rng.integers(0, len(ids)))]
            for _ in range(context_len - 1):
                chain.append(int(tables[d][chain[-1]]))
            last = chain[-1]
            gold = int(tables[d][last])
            taken = {int(t[last]) for t in tables} | {last}
            wrong = [int(x) for x in rng.permutation([i for i in range(len(ids)) if i not in taken])[:3]]
            choices = [gold] + wrong
            order = rng.permutation(4)
            items.append(
                {
                    "context": " ".join(str(int(ids[t])) for t in chain),
                    "choices": [str(int(ids[choices[i]])) for i in order],
                    "label": int(np.argmin(order)),
                    "domain": d,
                }
            )
    return items


def test_the_shipped_task_items_are_the_generated_ones():
    with open(ITEMS) as fh:
        shipped = [json.loads(line) for line in fh]
    assert shipped == chain_items()


RUNNER_MODEL = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --make-vocab-size-divisible-by 64 "
    "--micro-batch-size 8 --global-batch-size 8 --lr 1e-2 --min-lr 1e-3 --log-interval 20"
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """examples/experiments.py --eval-tasks tests/fixtures/lm_eval_tiny: uniform and dga_ema, seeds 1 and 2, 60 steps
    each on three_domain_shards (the models learn the chains' successors), checkpoints kept."""
    root = tmp_path_factory.mktemp("experiment")
    shards = three_domain_shards(str(root / "shards"))
    cmd = [
        sys.executable,
        os.path.join(ROOT, "examples", "experiments.py"),
        "unlimited",
        "--data-path",
        *shards["domains"],
        "--specific-data-path",
        shards["specific"],
        "--specific-eval-data-path",
        shards["specific_eval"],
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        str(VOCAB - 1),
        "--seeds",
        "1",
        "2",
        "--methods",
        "uniform,dga_ema",
        "--train-iters",
        "60",
        "--eval-interval",
        "30",
        "--eval-iters",
        "1",
        "--threads",
        "1",
        "--out",
        str(root / "out"),
        "--dga-interval",
        "10",
        "--extra-args",
        RUNNER_MODEL,
        "--keep-checkpoints",
        "--dga-args",
        "--dga-domain-batch-size 4 --dga-specific-batch-size 4",
        "--eval-tasks",
        TASK_DIR,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root / "out" / "unlimited", cmd, proc.stdout


def _run_dir(out, method, seed):
    return out / "runs" / method / f"seed{seed}"


def test_runner_reports_downstream_accuracy_statistics_from_the_run_files(experiment):
    """results.md/csv's accuracies, per-seed spreads, paired differences and verdicts, recomputed here from
    each run's downstream.json; a re-run evaluates nothing again."""
    import csv

    from megatron_dga.experiments import results as er

    out, cmd, log = experiment
    acc = {
        (m, s): json.loads((_run_dir(out, m, s) / "downstream.json").read_text())["results"]["tiny_chain"]["acc"]
        for m in ("uniform", "dga_ema")
        for s in (1, 2)
    }
    assert all(0.0 <= a <= 1.0 for a in acc.values()) and max(acc.values()) >= 0.75, acc  # chance: 0.25
    md = (out / "results.md").read_text()
    assert "Downstream accuracy" in md
    for method in ("uniform", "dga_ema"):
        vals = [acc[(method, 1)], acc[(method, 2)]]
        spread = er.Spread.of(vals).text()
        assert f"| {method} | 2 | {spread} |" in md, md
    d = [acc[("dga_ema", s)] - acc[("uniform", s)] for s in (1, 2)]
    mean = sum(d) / 2
    sd = abs(d[0] - d[1]) / 2**0.5
    lo, hi = mean - 12.706205 * sd / 2**0.5, mean + 12.706205 * sd / 2**0.5
    verdict = "beats" if lo > 0 else "worse" if hi < 0 else "within noise"
    higher = sum(x > 0 for x in d)
    row = next(line for line in md.splitlines() if line.startswith("| dga_ema | uniform | tiny_chain:acc |"))
    assert f"| {mean:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {higher}/2 | **{verdict}** |" in row, row
    assert f"1: {d[0]:+.4f}, 2: {d[1]:+.4f}" in row
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "results.csv").read_text()))}
    dga = rows["dga_ema"]
    assert float(dga["tiny_chain:acc_mean"]) == pytest.approx((acc[("dga_ema", 1)] + acc[("dga_ema", 2)]) / 2, abs=1e-6)
    assert float(dga["vs_uniform_tiny_chain:acc_mean"]) == pytest.approx(mean, abs=1e-6)
    assert float(dga["vs_uniform_tiny_chain:acc_ci_low"]) == pytest.approx(lo, abs=1e-5)
    assert dga["vs_uniform_tiny_chain:acc_paired_verdict"] == verdict
    runs = list(csv.DictReader(io.StringIO((out / "runs.csv").read_text())))
    assert {(r["method"], int(r["seed"])): float(r["tiny_chain:acc"]) for r in runs} == acc
    # a re-run: finished runs and their evaluations are skipped, the same table comes out
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("downstream results up to date, skipped") == 4
    assert (out / "results.md").read_text().split("Command:")[0] == md.split("Command:")[0]


def _items_as_tokens():
    with open(ITEMS) as fh:
        items = [json.loads(line) for line in fh]
    pairs = [([int(t) for t in it["context"].split()], [int(c)]) for it in items for c in it["choices"]]
    return items, pairs


def _scores(rank, world_size, ckpt, layouts):
    """Per layout: our scores of every (item, choice) pair; on one process also the oracle's, from the
    model's logits (log-softmax over the vocabulary, summed over the continuation)."""
    import torch

    from megatron_dga import evaluation, platform
    from megatron_dga.model import causal_attention_mask, unwrap

    _, pairs = _items_as_tokens()
    out = {}
    for name, overrides in layouts.items():
        model = evaluation.open_model(ckpt, overrides)
        try:
            # micro-batches of 3 and calls of 10 requests: padding, tails and ordering all exercised
            out[name] = model.score(pairs, batch_size=10, micro_batch_size=3)
            if world_size == 1:
                core = unwrap(model.chunks[0])
                oracle = []
                with torch.no_grad():
                    for context, cont in pairs:
                        seq = torch.tensor([context + cont])
                        n = seq.shape[1] - 1
                        logits = core(seq[:, :-1], torch.arange(n)[None], causal_attention_mask(n, "cpu"))
                        logp = torch.log_softmax(logits[0, :, : model.tokenizer.vocab_size].double(), dim=-1)
                        oracle.append(sum(float(logp[n - len(cont) + j, t]) for j, t in enumerate(cont)))
                out[name + "_oracle"] = oracle
        finally:
            platform.shutdown()
    return out


def test_accuracy_is_the_models_own_choice_on_any_layout(experiment):
    """A run's downstream accuracy (lm_eval through the runner) is the share of items whose answer has the
    highest log-likelihood under the model's logits (computed here); the scores are the same on two pipeline
    stages and on two tensor-parallel ranks."""
    out, _, _ = experiment
    run = _run_dir(out, "dga_ema", 1)
    result = json.loads((run / "downstream.json").read_text())
    assert result["iteration"] == 60 and result["task_names"] == ["tiny_chain"]
    acc = result["results"]["tiny_chain"]["acc"]
    ckpt = str(run / "ckpt")
    (one,) = run_distributed(_scores, world_size=1, args=(ckpt, {"one": {}}))
    items, _ = _items_as_tokens()
    ours, oracle = np.array(one["one"]).reshape(len(items), 4), np.array(one["one_oracle"]).reshape(len(items), 4)
    np.testing.assert_allclose(ours, oracle, rtol=0, atol=1e-4)
    labels = np.array([it["label"] for it in items])
    right = oracle.argmax(axis=1) == labels
    assert acc == pytest.approx(float(np.mean(right)), abs=1e-12)
    assert result["results"]["tiny_chain"]["acc_stderr"] == pytest.approx(np.std(right, ddof=1) / np.sqrt(len(items)))
    # One spawn per layout: a process group torn down and made again in the same ranks can fail to connect.
    for layout, overrides in (
        ("pp2", {"parallel.pipeline_model_parallel_size": 2}),
        ("tp2", {"parallel.tensor_model_parallel_size": 2}),
    ):
        for r in run_distributed(_scores, world_size=2, args=(ckpt, {layout: overrides})):
            np.testing.assert_allclose(r[layout], one["one"], rtol=0, atol=1e-5)


def test_without_lm_eval_the_error_names_the_install_command(monkeypatch):
    from megatron_dga import evaluation
    from megatron_dga.errors import ConfigError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ConfigError, match=r"pip install '\.\[eval\]'"):
        evaluation.load_tasks([TASK_DIR])


def test_tasks_the_model_cannot_score_and_foreign_flags_are_refused_by_name(tmp_path):
    import shutil

    from megatron_dga import evaluation
    from megatron_dga.errors import ConfigError, DataError

    task = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, task)
    text = (
        (task / "tiny_chain.yaml")
        .read_text()
        .replace("task: tiny_chain", "task: tiny_gen")
        .replace("output_type: multiple_choice", "output_type: generate_until")
    )
    (task / "tiny_gen.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"tiny_gen \(generate_until\) cannot be scored"):
        evaluation.load_tasks([str(task)])
    with pytest.raises(DataError, match="no such directory"):
        evaluation.split_tasks([str(tmp_path / "missing" / "tasks")])
    with pytest.raises(ConfigError, match="--lr: not a flag of the evaluation"):
        evaluation.trainer_overrides(["--lr", "0.1", "--num-layers", "2"])
    assert evaluation.trainer_overrides(
        ["--num-layers", "2", "--tokenizer-type", "NullTokenizer", "--pipeline-model-parallel-size", "2"]
    ) == {"model.num_layers": 2, "data.tokenizer_type": "NullTokenizer", "parallel.pipeline_model_parallel_size": 2}


def test_accuracy_verdicts_count_higher_as_better():
    from megatron_dga.experiments import results as er

    up = er.Pair("dga", "uniform", {1: 0.10, 2: 0.12, 3: 0.11}, 0.05, "t:acc", higher_is_better=True)
    down = er.Pair("dga", "uniform", {1: -0.10, 2: -0.12, 3: -0.11}, 0.05, "t:acc", higher_is_better=True)
    assert (up.verdict, up.spread_verdict, up.better) == ("beats", "beats", 3)
    assert (down.verdict, down.spread_verdict, down.better) == ("worse", "worse", 0)
    loss = er.Pair("dga", "uniform", {1: -0.10, 2: -0.12, 3: -0.11}, 0.05)
    assert (loss.verdict, loss.better) == ("beats", 3)
