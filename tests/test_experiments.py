"""examples/experiments.py, the multi-seed method comparison: data preparation from jsonl domains,
resumable runs, and the table's statistics recomputed here from the runs' metrics.jsonl."""
import csv
import json
import os
import random
import subprocess
import sys

import pytest

from megatron_dga import experiment as ex
from megatron_dga import experiment_results as er
from megatron_dga.errors import ConfigError
from megatron_dga.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import experiments  # noqa: E402  (examples/ is no package)

VOCAB = {
    "code": "def return class import self value list dict for in if else while try except".split(),
    "law": "court plaintiff defendant statute section appeal judgment counsel hereby pursuant".split(),
    "food": "salt pepper onion garlic butter simmer roast bake flour sugar egg".split(),
}
TINY = ("--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 32 --micro-batch-size 4 "
        "--global-batch-size 4 --log-interval 2 --ckpt-format torch")


def _write_corpus(root):
    """Three domains with disjoint words; the target mixes law with a little code."""
    rng = random.Random(0)

    def doc(words):
        return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) for _ in range(6))

    (root / "corpus").mkdir()
    for name, words in VOCAB.items():
        (root / "corpus" / f"{name}.jsonl").write_text("".join(json.dumps({"text": doc(words)}) + "\n" for _ in range(80)))
    mix = VOCAB["law"] + VOCAB["code"][:4]
    for name, n in (("target_train", 40), ("target_eval", 30)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": doc(mix)}) + "\n" for _ in range(n)))


def _runner(root, methods, seeds, extra=TINY):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "experiments.py"), "unlimited",
           "--corpus-dir", str(root / "corpus"), "--target-train", str(root / "target_train.jsonl"),
           "--target-eval", str(root / "target_eval.jsonl"), "--seeds", *map(str, seeds), "--methods", methods,
           "--train-iters", "6", "--eval-interval", "2", "--eval-iters", "1", "--save-interval", "100",
           "--vocab-size", "300", "--threads", "1", "--out", str(root / "out"), "--dga-interval", "2",
           "--extra-args", extra, "--dga-args", "--dga-domain-batch-size 2 --dga-specific-batch-size 2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stdout + proc.stderr


def _expected(run_dir):
    """The per-run numbers, straight from metrics.jsonl."""
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = [(m["iteration"], m["specific_eval_loss"]) for m in metrics if m.get("specific_eval_loss") is not None]
    best = min(v for _, v in evals)
    last = [m for m in metrics if m.get("specific_eval_loss") is not None][-1]["domain_eval_loss"]
    return {"final": evals[-1][1], "best": best, "best_iter": next(i for i, v in evals if v == best),
            "generic": sum(last) / len(last), "iterations": [m["iteration"] for m in metrics]}


def test_runner_end_to_end_resumes_skips_and_reports_seed_statistics(tmp_path):
    _write_corpus(tmp_path)
    out = tmp_path / "out" / "unlimited"
    # 1. One run stops at iteration 2 (--exit-interval only pauses a run: same job, resumable).
    rc, log = _runner(tmp_path, "dga_ema", [1], TINY + " --exit-interval 2")
    assert rc == 3, log[-3000:]
    assert "dga_ema seed 1: stopped at iteration 2" in log
    # 2. The full command: preparation cached, the stopped run resumed, three runs fresh.
    rc, log = _runner(tmp_path, "uniform,dga_ema", [1, 2])
    assert rc == 0, log[-3000:]
    for step in ("tokenizer", "shards-domains", "shards-targets"):
        assert f"[prep] {step}: up to date, skipped" in log
    assert "dga_ema seed 1: resuming from iteration 2" in log
    resumed = out / "runs" / "dga_ema" / "seed1"
    assert "resumed from" in (resumed / "stdout.log").read_text()
    job = json.loads((resumed / "job.json").read_text())
    assert [a["from_iteration"] for a in job["attempts"]] == [0, 2] and job["finished"]

    runs = {(m, s): _expected(out / "runs" / m / f"seed{s}") for m in ("uniform", "dga_ema") for s in (1, 2)}
    assert runs[("dga_ema", 1)]["iterations"] == [2, 4, 6]  # each logged iteration once across the two attempts
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    for method in ("uniform", "dga_ema"):
        row = rows[method]
        for key in ("final", "best"):
            values = [runs[(method, s)][key] for s in (1, 2)]
            assert float(row[f"{key}_mean"]) == pytest.approx(sum(values) / 2, rel=1e-5)
            assert float(row[f"{key}_min"]) == pytest.approx(min(values), rel=1e-5)
            assert float(row[f"{key}_max"]) == pytest.approx(max(values), rel=1e-5)
        assert row["best_iters"] == " ".join(str(runs[(method, s)]["best_iter"]) for s in (1, 2))
        assert float(row["generic_mean"]) == pytest.approx(sum(runs[(method, s)]["generic"] for s in (1, 2)) / 2,
                                                           rel=1e-5)
    # Paired differences against uniform, seed by seed, and the verdict by the documented rule.
    diffs = [runs[("dga_ema", s)]["final"] - runs[("uniform", s)]["final"] for s in (1, 2)]
    base = [runs[("uniform", s)]["final"] for s in (1, 2)]
    noise = max(base) - min(base)
    row = rows["dga_ema"]
    assert float(row["vs_uniform_mean"]) == pytest.approx(sum(diffs) / 2, rel=1e-4, abs=1e-7)
    assert float(row["vs_uniform_min"]) == pytest.approx(min(diffs), rel=1e-4, abs=1e-7)
    assert float(row["vs_uniform_max"]) == pytest.approx(max(diffs), rel=1e-4, abs=1e-7)
    assert float(row["vs_uniform_noise"]) == pytest.approx(noise, rel=1e-4)
    mean = sum(diffs) / 2
    verdict = ("beats" if all(d < 0 for d in diffs) and mean < -noise else
               "worse" if all(d > 0 for d in diffs) and mean > noise else "within noise")
    assert row["vs_uniform_verdict"] == verdict
    assert float(row["overhead_cost_model"]) == pytest.approx((3 * 2 + 2) / (2 * 4))  # (k b_dom + b_spe) / (T_r B)
    assert rows["uniform"]["overhead_cost_model"] == ""
    md = (out / "results.md").read_text()
    assert f"| dga_ema | uniform | {mean:+.4f} |" in md and f"**{verdict}**" in md
    for png in ("target_loss.png", "weights_dga_ema.png", "epochs.png"):
        assert (out / png).stat().st_size > 1000, png

    # 3. Again: every run is finished, nothing trains.
    logs = {k: os.path.getmtime(out / "runs" / k[0] / f"seed{k[1]}" / "stdout.log") for k in runs}
    rc, log = _runner(tmp_path, "uniform,dga_ema", [1, 2])
    assert rc == 0, log[-3000:]
    assert log.count("finished before, skipped") == 4 and "starting" not in log
    assert logs == {k: os.path.getmtime(out / "runs" / k[0] / f"seed{k[1]}" / "stdout.log") for k in runs}


# --------------------------------------------------------------------------- fast unit tests
def test_verdict_rule():
    assert er.Pair("m", "b", {1: -0.2, 2: -0.15, 3: -0.3}, noise=0.1).verdict == "beats"
    assert er.Pair("m", "b", {1: -0.2, 2: -0.15, 3: -0.3}, noise=0.25).verdict == "within noise"  # mean -0.217
    assert er.Pair("m", "b", {1: -0.2, 2: 0.01, 3: -0.3}, noise=0.0).verdict == "within noise"  # one seed loses
    assert er.Pair("m", "b", {1: 0.2, 2: 0.15}, noise=0.1).verdict == "worse"
    assert er.Pair("m", "b", {1: -0.5}, noise=0.0).verdict == "one seed: no verdict"


def test_sweep_makes_one_variant_per_combination_of_dga_methods_only():
    methods = {"uniform": ["--mixing", "uniform"],
               "dga_ema": ["--mixing", "dga", "--dga-eta", "10", "--dga-ema", "0.1"]}
    out = experiments.sweep_variants(methods, experiments.parse_sweep(["dga_eta=3,30", "--dga-ema=0.1,1.0"]))
    assert list(out) == ["uniform", "dga_ema+eta=3+ema=0.1", "dga_ema+eta=3+ema=1.0", "dga_ema+eta=30+ema=0.1",
                         "dga_ema+eta=30+ema=1.0"]
    # The swept flag replaces the method's own value: one --dga-eta, the variant's.
    assert out["dga_ema+eta=30+ema=1.0"] == ["--mixing", "dga", "--dga-eta", "30", "--dga-ema", "1.0"]
    with pytest.raises(ConfigError, match="only DGA flags"):
        experiments.parse_sweep(["lr=1e-3,2e-3"])
    with pytest.raises(ConfigError, match="FLAG=V1,V2"):
        experiments.parse_sweep(["dga-eta"])
    assert experiments.with_flags(["--lr", "1", "--data-path", "a", "b"], experiments.parse_flags("--data-path c", "x")) \
        == ["--lr", "1", "--data-path", "c"]


def test_a_run_directory_of_another_job_is_refused(tmp_path):
    job = ex.Job("uniform", 1, ["--train-iters", "6", "--mixing", "uniform"], str(tmp_path / "run"))
    os.makedirs(job.run_dir)
    state = {"format": ex.JOB_FORMAT, "argv": ex.job_argv(job, 3) + ["--exit-interval", "2"], "finished": False,
             "attempts": []}
    (tmp_path / "run" / ex.JOB_FILE).write_text(json.dumps(state))
    assert ex.job_status(job, 3) == "interrupted"  # a stop flag does not change the job
    other = ex.Job("uniform", 1, ["--train-iters", "8", "--mixing", "uniform"], job.run_dir)
    with pytest.raises(ConfigError, match=r"other arguments.*--train-iters: '6 --mixing uniform'... vs '8 --mixing uniform'"):
        ex.job_status(other, 3)


def test_train_tokenizer_samples_lines_reproducibly_with_progress(tmp_path):
    rng = random.Random(3)
    words = VOCAB["code"] + VOCAB["food"]
    with open(tmp_path / "a.jsonl", "w") as fh:
        for _ in range(200):
            fh.write(json.dumps({"text": "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(5))}) + "\n")
    tool = [sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", str(tmp_path / "a.jsonl"),
            "--vocab-size", "300", "--input-sentence-size", "300", "--num-threads", "2"]
    models = []
    for name, seed in (("r1", 1), ("r2", 1), ("r3", 2)):
        proc = subprocess.run([*tool, "--model-prefix", str(tmp_path / name / "spm"), "--seed", str(seed)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        models.append((tmp_path / name / "spm.model").read_bytes())
    assert "read 200 documents, 1,000 lines" in proc.stderr and "training on 300 sampled lines" in proc.stderr
    assert "[sentencepiece +" in proc.stderr and "EM sub_iter" in proc.stderr and "meta_piece" not in proc.stderr
    assert models[0] == models[1] and models[0] != models[2]  # the sample follows --seed, not the process
