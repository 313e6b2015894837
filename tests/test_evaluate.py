"""Downstream evaluation (megatron_dga/evaluation.py, tools/evaluate.py) on the local multiple-choice task
tests/data/lm_eval_tiny: the harness's accuracy against the model's own log-likelihoods computed here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_dga.data import mock
from tests.dist_utils import run_pretrain
from tests.synthetic import NULL_TOKENIZER_ARGS, TINY_GPT_ARGS, VOCAB, EOD, three_domain_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_DIR = os.path.join(ROOT, "tests", "data", "lm_eval_tiny")
ITEMS = os.path.join(TASK_DIR, "tiny_chain.jsonl")


def chain_items(per_domain: int = 12, context_len: int = 6, seed: int = 7) -> list:
    """tiny_chain's items (tests/data/lm_eval_tiny/utils.py): contexts following one domain's successor
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
            items.append({"context": " ".join(str(int(ids[t])) for t in chain),
                          "choices": [str(int(ids[choices[i]])) for i in order],
                          "label": int(np.argmin(order)), "domain": d})
    return items


def test_the_shipped_task_items_are_the_generated_ones():
    with open(ITEMS) as fh:
        shipped = [json.loads(line) for line in fh]
    assert shipped == chain_items()


def _train(out_dir) -> str:
    """A tiny model trained 60 steps on three_domain_shards (it learns the chains' successors); its
    checkpoint root, which holds run_info.json too (--log-dir = --save)."""
    shards = three_domain_shards(os.path.join(out_dir, "shards"))
    ckpt = os.path.join(out_dir, "ckpt")
    argv = ["--data-path", *shards["domains"], "--specific-data-path", shards["specific"], *NULL_TOKENIZER_ARGS,
            *TINY_GPT_ARGS, "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", "60",
            "--log-interval", "60", "--eval-interval", "0", "--lr", "1e-2", "--mixing", "uniform",
            "--save", ckpt, "--log-dir", ckpt]
    rcs, _ = run_pretrain(argv)
    assert rcs == [0]
    return ckpt


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
                        logp = torch.log_softmax(logits[0, :, :model.tokenizer.vocab_size].double(), dim=-1)
                        oracle.append(sum(float(logp[n - len(cont) + j, t]) for j, t in enumerate(cont)))
                out[name + "_oracle"] = oracle
        finally:
            platform.shutdown()
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(str(tmp_path_factory.mktemp("evaluate")))


def test_tool_accuracy_on_the_local_task_is_the_models_own_choice(trained, tmp_path):
    """tools/evaluate.py through lm_eval: its accuracy is the share of items whose answer has the highest
    log-likelihood under the model's logits (computed here), and the trained model is far above chance."""
    out = tmp_path / "downstream.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", trained,
                           "--tasks", TASK_DIR, "--output", str(out), "--eval-batch-size", "16"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["iteration"] == 60 and result["task_names"] == ["tiny_chain"]
    acc = result["results"]["tiny_chain"]["acc"]

    (scores,) = [r for r in __import__("tests.dist_utils", fromlist=["x"]).run_distributed(
        _scores, world_size=1, args=(trained, {"one": {}}))]
    items, _ = _items_as_tokens()
    ours, oracle = np.array(scores["one"]).reshape(len(items), 4), np.array(scores["one_oracle"]).reshape(len(items), 4)
    np.testing.assert_allclose(ours, oracle, rtol=0, atol=1e-4)
    labels = np.array([it["label"] for it in items])
    assert acc == pytest.approx(float(np.mean(oracle.argmax(axis=1) == labels)), abs=1e-12)
    assert acc >= 0.75, acc  # chance: 0.25
    assert result["results"]["tiny_chain"]["acc_stderr"] == pytest.approx(np.std(oracle.argmax(1) == labels, ddof=1)
                                                                            / np.sqrt(len(items)))


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
    text = (task / "tiny_chain.yaml").read_text().replace("task: tiny_chain", "task: tiny_gen").replace(
        "output_type: multiple_choice", "output_type: generate_until")
    (task / "tiny_gen.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"tiny_gen \(generate_until\) cannot be scored"):
        evaluation.load_tasks([str(task)])
    with pytest.raises(DataError, match="no such directory"):
        evaluation.split_tasks([str(tmp_path / "missing" / "tasks")])
    with pytest.raises(ConfigError, match="--lr: not a flag of the evaluation"):
        evaluation.trainer_overrides(["--lr", "0.1", "--num-layers", "2"])
    assert evaluation.trainer_overrides(["--num-layers", "2", "--tokenizer-type", "NullTokenizer",
                                         "--pipeline-model-parallel-size", "2"]) == {
        "model.num_layers": 2, "data.tokenizer_type": "NullTokenizer", "parallel.pipeline_model_parallel_size": 2}
