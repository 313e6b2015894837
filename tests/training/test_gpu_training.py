"""The trainer on a CUDA GPU: transformer-engine layers, bf16 and fp32, the distributed
optimizer with DGA, save and resume. Skipped without a GPU; ``scripts/gpu_check.sh`` runs
these (with the CUDA cases of test_ops.py) and prints a summary table.

Every case is a real ``python -m megatron_dga.pretrain_gpt`` process on one GPU (NCCL,
world size 1), the command a user runs, on synthetic shards written like real ones.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers.synthetic import NULL_TOKENIZER_ARGS, write_domains

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = [
    "--num-layers",
    "4",
    "--hidden-size",
    "256",
    "--num-attention-heads",
    "8",
    "--seq-length",
    "128",
    "--make-vocab-size-divisible-by",
    "128",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_domains(
        str(tmp_path_factory.mktemp("gpu_shards")),
        k=4,
        docs_per_domain=256,
        doc_len=160,
        specific_mixture=[0.5, 0.5, 0.0, 0.0],
        specific_docs=128,
    )


def _run(shards, run_dir, extra, iters=20):
    argv = [
        "--data-path",
        *shards["domains"],
        "--specific-data-path",
        shards["specific"],
        "--specific-eval-data-path",
        shards["specific_eval"],
        *NULL_TOKENIZER_ARGS,
        *MODEL,
        "--micro-batch-size",
        "8",
        "--global-batch-size",
        "32",
        "--train-iters",
        str(iters),
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--lr",
        "1e-3",
        "--log-dir",
        str(run_dir),
        *extra,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dga.pretrain_gpt", *argv], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        metrics = [json.loads(line) for line in fh]
    return proc.stdout, metrics


def _losses(metrics):
    return np.array([m["lm_loss"] for m in metrics])


def _learns(metrics):
    losses = _losses(metrics)
    assert np.isfinite(losses).all(), losses
    assert losses[-3:].mean() < losses[:3].mean() - 0.2, losses


def test_bf16_transformer_engine_gpt_with_dga_exact(shards, tmp_path):
    pytest.importorskip("transformer_engine")
    out, metrics = _run(shards, tmp_path, ["--bf16", "--mixing", "dga", "--dga-interval", "5"])
    assert "layers=transformer-engine" in out
    _learns(metrics)
    updates = [m for m in metrics if "alignments" in m]
    assert len(updates) == 4 and all(np.isfinite(m["alignments"]).all() for m in updates)


def test_fp32_fd_alignments_agree_with_exact(shards, tmp_path):
    """Both estimators at the same first update (identical weights and probes up to it)."""
    first = {}
    for estimator in ("exact", "fd"):
        _, metrics = _run(
            shards,
            tmp_path / estimator,
            ["--mixing", "dga", "--dga-interval", "5", "--dga-estimator", estimator],
            iters=5,
        )
        _learns_nothing_bad = np.isfinite(_losses(metrics)).all()
        assert _learns_nothing_bad
        first[estimator] = np.array(metrics[-1]["alignments"])
    exact, fd = first["exact"], first["fd"]
    assert np.corrcoef(exact, fd)[0, 1] > 0.99, (exact, fd)
    assert np.max(np.abs(fd - exact)) < 0.05 * np.max(np.abs(exact)), (exact, fd)


def test_distributed_optimizer_with_dga_matches_plain(shards, tmp_path):
    extra = ["--bf16", "--mixing", "dga", "--dga-interval", "5"]
    _, plain = _run(shards, tmp_path / "plain", extra)
    _, distopt = _run(shards, tmp_path / "distopt", extra + ["--use-distributed-optimizer"])
    _learns(distopt)
    np.testing.assert_allclose(_losses(distopt), _losses(plain), rtol=2e-2)
    a = [m["alignments"] for m in plain if "alignments" in m][0]
    b = [m["alignments"] for m in distopt if "alignments" in m][0]
    np.testing.assert_allclose(b, a, rtol=5e-2, atol=1e-3 * np.max(np.abs(a)))


def test_save_and_resume_continues_the_run(shards, tmp_path):
    extra = ["--bf16", "--mixing", "dga", "--dga-interval", "4"]
    _, straight = _run(shards, tmp_path / "straight", extra, iters=12)
    ckpt = str(tmp_path / "ckpt")
    _run(shards, tmp_path / "resumed", extra + ["--save", ckpt, "--exit-interval", "6"], iters=12)
    _, resumed = _run(shards, tmp_path / "resumed", extra + ["--load", ckpt], iters=12)
    assert [m["iteration"] for m in resumed] == list(range(1, 13))
    # Same data, weights and RNG streams; GPU kernels may reduce in another order across processes.
    np.testing.assert_allclose(_losses(resumed), _losses(straight), rtol=1e-3)
    np.testing.assert_allclose(resumed[-1]["domain_weights"], straight[-1]["domain_weights"], rtol=1e-2, atol=1e-4)


LLAMA = [
    "--group-query-attention",
    "--num-query-groups",
    "2",
    "--swiglu",
    "--disable-bias-linear",
    "--normalization",
    "RMSNorm",
    "--position-embedding-type",
    "rope",
    "--rotary-base",
    "500000",
]


def test_llama_style_flash_attention_with_recompute(shards, tmp_path):
    """The GPU-only model flags on transformer-engine layers: --use-flash-attn (megatron-core's
    attention_backend flash) learns and agrees with TE's unfused attention; selective recomputation
    runs with it. CPU CI only binds this mapping (tests/training/test_megatron_contract.py)."""
    pytest.importorskip("transformer_engine")
    extra = LLAMA + ["--bf16"]
    out, flash = _run(shards, tmp_path / "flash", extra + ["--use-flash-attn", "--recompute-activations"])
    assert "layers=transformer-engine" in out
    _learns(flash)
    _, unfused = _run(shards, tmp_path / "unfused", extra + ["--attention-backend", "unfused"])
    np.testing.assert_allclose(_losses(flash), _losses(unfused), rtol=2e-2)


def test_context_parallel_is_refused_naming_why():
    """--context-parallel-size > 1 is refused on GPU too (the trainer does not split sequences over
    context-parallel ranks yet); only without transformer-engine does the message also name its
    attention (CPU CI checks that wording in tests/training/test_arguments.py)."""
    from megatron_dga.errors import ConfigError
    from megatron_dga.model import transformer_engine_available
    from megatron_dga.training.arguments import parse_args

    with pytest.raises(ConfigError) as exc:
        parse_args(["--data-path", "a_text_document", "--context-parallel-size", "2"])
    message = str(exc.value)
    assert "does not split sequences over context-parallel ranks yet" in message
    assert ("needs Transformer Engine's attention" in message) != transformer_engine_available()
