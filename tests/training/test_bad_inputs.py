"""Bad inputs stop the trainer before work is lost (issue 11): exit code 2, one ``error`` line
naming the file, the value and the fix, no traceback, and the files it read left as they were.

Each case runs ``python -m megatron_dga.pretrain_gpt`` in a subprocess (stderr is what a user
sees); the per-file checks themselves are tested directly in test_domains.py,
test_tokenizers.py and test_weights_io.py.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.synthetic import EOD, run_argv, write_shard

DGA = ["--mixing", "dga", "--dga-interval", "2", "--dga-specific-batch-size", "4"]


def _argv(domains, specific, run_dir, extra=()):
    data = ["--data-path", *domains, "--specific-data-path", specific]
    return run_argv(run_dir, [*DGA, *extra], data=data, global_batch=4, iters=2, lr="1e-3")


def _pretrain(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dga.pretrain_gpt", *argv], capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stderr


def _contents(root):
    """{relative path: bytes} of every file under root (or of one file)."""
    if os.path.isfile(root):
        return {root: open(root, "rb").read()}
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def _copy_shard(prefix, directory):
    os.makedirs(directory, exist_ok=True)
    dst = os.path.join(directory, os.path.basename(prefix))
    for ext in (".bin", ".idx", ".json"):
        shutil.copyfile(prefix + ext, dst + ext)
    return dst


def _assert_clean_exit_2(rc, err, *patterns):
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err[-3000:]
    for pattern in patterns:
        assert pattern in lines[0], (pattern, lines[0])


def test_garbled_index_fails_at_startup(shards, tmp_path):
    prefix = _copy_shard(shards["domains"][1], str(tmp_path / "data"))
    with open(prefix + ".idx", "r+b") as f:  # the header stays intact; sequence 5's pointer moves
        num_seq = struct.unpack("<Q", (f.read(34))[18:26])[0]
        f.seek(34 + 4 * num_seq + 8 * 5)
        (pointer,) = struct.unpack("<q", f.read(8))
        f.seek(-8, os.SEEK_CUR)
        f.write(struct.pack("<q", pointer + 3))
    before = _contents(str(tmp_path / "data"))
    domains = [shards["domains"][0], prefix, shards["domains"][2]]
    rc, err = _pretrain(_argv(domains, shards["specific"], tmp_path / "run"))
    _assert_clean_exit_2(rc, err, f"{prefix}.idx: sequence 5 starts at byte {pointer + 3}", "re-run preprocessing")
    assert _contents(str(tmp_path / "data")) == before


def test_token_id_beyond_the_vocab_fails_in_its_batch(shards, tmp_path):
    # The sidecar vouches for the vocabulary (so start-up does not scan), but every document holds id 200,
    # beyond the 128 of --vocab-size 127 (+ eod): the first collated batch names its domain and sample.
    docs = [np.append(np.full(64, 200), EOD) for _ in range(48)]
    prefix = write_shard(str(tmp_path / "data" / "foreign_text_document"), docs)
    before = _contents(str(tmp_path / "data"))
    rc, err = _pretrain(_argv([prefix], shards["specific"], tmp_path / "run", ["--num-workers", "1"]))
    _assert_clean_exit_2(
        rc,
        err,
        f"domain 'foreign' ({prefix}.bin), sample",
        "hold id 200, outside the vocabulary [0, 128)",
        "--vocab-size",
    )
    assert _contents(str(tmp_path / "data")) == before


def test_checkpoint_with_non_finite_mixing_weights_is_refused(shards, tmp_path):
    import torch

    from megatron_dga.training.checkpoint import file_record

    ckpt = str(tmp_path / "ckpt")
    argv = _argv(shards["domains"], shards["specific"], tmp_path / "run")
    rc, err = _pretrain(argv + ["--save", ckpt, "--save-interval", "2"])
    assert rc == 0, err[-3000:]
    # A checkpoint whose saved DGA weights are NaN, with matching checksums (written that way, not damaged
    # on disk): only the validation of the numbers can catch it.
    it_dir = os.path.join(ckpt, "iter_0000002")
    common = torch.load(os.path.join(it_dir, "common.pt"), weights_only=False)
    common["megatron_dga"]["mixing"]["weights"][0] = float("nan")
    torch.save(common, os.path.join(it_dir, "common.pt"))
    meta_path = os.path.join(it_dir, "megatron_dga.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["files"]["common.pt"] = file_record(os.path.join(it_dir, "common.pt"))
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    before = _contents(ckpt)
    rc, err = _pretrain(
        argv + ["--load", ckpt, "--save", ckpt, "--train-iters", "4", "--use-checkpoint-opt_param-scheduler"]
    )
    _assert_clean_exit_2(
        rc,
        err,
        f"checkpoint {it_dir}: mixing weights has non-finite entries at positions [0]",
        "--ckpt-step",
        "--reset-mixing-state",
    )
    assert _contents(ckpt) == before


def _fake_trainer(reset=False):
    """The parts check_common_state asks: a real sampler and a real strategy over three domains."""
    from types import SimpleNamespace as NS

    from megatron_dga.data.sampler import DynamicMixtureSampler, MixtureSamplerConfig
    from megatron_dga.mixing.base import DomainInfo, build_mixing
    from megatron_dga.mixing.config import MixingConfig

    sampler = DynamicMixtureSampler([10, 10, 10], MixtureSamplerConfig(global_batch_size=8, micro_batch_size=2, seed=1))
    mixing = build_mixing(MixingConfig(strategy="dga"), DomainInfo(["a", "b", "c"], np.ones(3), np.ones(3)))
    return NS(cfg=NS(checkpoint=NS(reset_mixing_state=reset)), data=NS(check_state=sampler.check_state), mixing=mixing)


GOOD_STATE = {
    "iteration": 4,
    "consumed_samples": 32,
    "consumed_tokens": 1024,
    "data": {
        "format": "megatron-dga/mixture-sampler-v2",
        "batches_drawn": 4,
        "carry": [0.1, -0.1, 0.0],
        "consumed": {"index": [0, 2], "value": [5, 3]},
        "reported": {"index": [], "value": []},
        "probe_consumed": {"index": [3], "value": [8]},
        "weights": [0.2, 0.3, 0.5],
        "basis_weights": None,
    },
    "mixing": {"weights": [0.2, 0.3, 0.5], "updates": 2},
}
BAD_STATES = {  # name: (change to GOOD_STATE, message)
    "iteration": (lambda s: s.update(iteration=5), "its state is for iteration 5, its metadata says 4"),
    "counter": (lambda s: s.update(consumed_tokens=-1), "consumed_tokens is -1, expected an integer >= 0"),
    "carry": (lambda s: s["data"].update(carry=[0.0, float("nan"), 0.0]), "sampler carry holds non-finite values"),
    "carry-shape": (lambda s: s["data"].update(carry=[0.0, 0.0]), "sampler carry is [0.0, 0.0], expected 3 numbers"),
    "sparse": (lambda s: s["data"]["consumed"].update(value=[5, -3]), "sampler consumed count is -3"),
    "sampler-weights": (lambda s: s["data"].update(weights=[0.5, 0.5, 0.5]), "sampler weights sums to 1.5, not 1"),
    "mixing-length": (lambda s: s["mixing"].update(weights=[0.5, 0.5]), "mixing weights is [0.5, 0.5], expected 3"),
    "mixing-text": (lambda s: s["mixing"].update(weights=["x", 1, 0]), "mixing weights is ['x', 1, 0], expected 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_checkpoint_state_numbers_are_validated(case):
    import copy

    from megatron_dga.errors import CheckpointError
    from megatron_dga.training.resume import check_common_state

    check_common_state(GOOD_STATE, _fake_trainer(), "/ckpt/iter_0000004", 4)
    change, message = BAD_STATES[case]
    state = copy.deepcopy(GOOD_STATE)
    change(state)
    with pytest.raises(CheckpointError, match="^checkpoint /ckpt/iter_0000004: ") as e:
        check_common_state(state, _fake_trainer(), "/ckpt/iter_0000004", 4)
    assert message in str(e.value) and "--ckpt-step" in str(e.value)
    if "weights" in case:
        assert "--reset-mixing-state" in str(e.value)
        if case.startswith("mixing"):  # --reset-mixing-state replaces the mixing weights: not checked then
            check_common_state(state, _fake_trainer(reset=True), "/ckpt/iter_0000004", 4)
