"""Checkpoint save/load: round trips, retention, crash safety, layouts, errors, RNG."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
import torch

from megatron_dga.errors import CheckpointError, ConfigError
from megatron_dga.training import checkpoint as ckpt
from megatron_dga.training.checkpoint import (
    CheckpointLayout,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from megatron_dga.training.rng import capture_rng_state, restore_rng_state
from tests.helpers.dist_utils import run_distributed


def _draws():
    python = [random.gauss(0, 1)] + [random.random() for _ in range(4)]
    return torch.rand(4), np.random.rand(4), python, np.random.randn(3)


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def _train_step(model, opt, x, y):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _tiny_state(value):
    return {"w": torch.full((3,), float(value)), "step": int(value)}


def test_round_trip_model_optimizer_rng(tmp_path):
    model, opt = _model_and_optimizer(0)
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    for _ in range(3):
        _train_step(model, opt, x, y)
    np.random.randn()  # leaves a cached Gaussian in NumPy's legacy state
    random.seed(7)
    random.gauss(0, 1)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng_state()}
    expected = _draws()
    save_checkpoint(tmp_path, 3, state, common_state={"consumed": 15}, metadata={"args": {"lr": 1e-2}})

    # Scramble every stream, then resume into a fresh model/optimizer.
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    iteration, loaded, common = load_checkpoint(tmp_path)
    assert iteration == 3 and common == {"consumed": 15}
    model2, opt2 = _model_and_optimizer(1)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    restore_rng_state(loaded["rng"])
    got = _draws()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The resumed optimizer continues exactly like the original one.
    _train_step(model, opt, x, y)
    _train_step(model2, opt2, x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    meta = ckpt.read_checkpoint_metadata(tmp_path / "iter_0000003")
    assert meta["layout"] == {"tp_size": 1, "pp_size": 1, "dp_size": 1}
    assert meta["extra"] == {"args": {"lr": 1e-2}}
    assert sorted(p.name for p in (tmp_path / "iter_0000003").iterdir()) == [
        "common.pt",
        "megatron_dga.json",
        "mp_rank_00",
    ]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_megatron_tracker_states_restored(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    # Use a private tracker; monkeypatch puts megatron's module globals back afterwards.
    tracker = mrandom.CudaRNGStatesTracker()
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker)
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    tracker.set_states({"model-parallel-rng": torch.get_rng_state(), "graph-safe": gen})
    saved = capture_rng_state()
    ref_gen = torch.rand(3, generator=gen)
    ref_tensor_state = tracker.get_states()["model-parallel-rng"].clone()

    torch.manual_seed(12)
    tracker.set_states({"model-parallel-rng": torch.get_rng_state(), "graph-safe": gen})
    restore_rng_state(saved)
    states = tracker.get_states()
    assert torch.equal(states["model-parallel-rng"], ref_tensor_state)
    assert states["graph-safe"] is gen
    assert torch.equal(torch.rand(3, generator=gen), ref_gen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_round_trip(tmp_path):
    torch.cuda.manual_seed_all(3)
    torch.rand(2, device="cuda")
    save_checkpoint(tmp_path, 1, {"rng": capture_rng_state()})
    expected = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(9)
    restore_rng_state(load_checkpoint(tmp_path)[1]["rng"])
    got = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_rng_rejects_foreign_state():
    with pytest.raises(CheckpointError, match="format"):
        restore_rng_state({"torch": torch.get_rng_state()})


def test_keep_last_deletes_oldest_and_never_newer_runs(tmp_path):
    for it in (10, 20, 30, 40):
        save_checkpoint(tmp_path, it, _tiny_state(it), keep_last=2)
    assert ckpt._list_iterations(tmp_path) == [30, 40]
    # Resumed from an older checkpoint: the just-written one stays, higher ones are not ours to delete.
    save_checkpoint(tmp_path, 5, _tiny_state(5), keep_last=1)
    assert ckpt._list_iterations(tmp_path) == [5, 30, 40]
    assert latest_iteration(tmp_path) == 5
    save_checkpoint(tmp_path, 35, _tiny_state(35), keep_last=2)
    assert ckpt._list_iterations(tmp_path) == [30, 35, 40]
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000030",
        "iter_0000035",
        "iter_0000040",
        "latest_checkpointed_iteration.txt",
    ]


def _fail_on(monkeypatch, predicate):
    real = os.replace

    def replace(src, dst):
        if predicate(str(src), str(dst)):
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)


def test_crash_before_directory_rename_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, _tiny_state(10))
    _fail_on(monkeypatch, lambda src, dst: ".tmp-" in os.path.basename(src) and os.path.isdir(src))
    with pytest.raises(CheckpointError, match="simulated crash"):
        save_checkpoint(tmp_path, 20, _tiny_state(20))
    monkeypatch.undo()
    assert latest_iteration(tmp_path) == 10
    assert not (tmp_path / "iter_0000020").exists()
    leftovers = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert len(leftovers) == 1  # a real crash leaves it too; the next save cleans it
    it, state, _ = load_checkpoint(tmp_path)
    assert it == 10 and state["step"] == 10
    save_checkpoint(tmp_path, 30, _tiny_state(30))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert load_checkpoint(tmp_path)[1]["step"] == 30


def test_crash_before_tracker_update_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, _tiny_state(10))
    _fail_on(monkeypatch, lambda src, dst: os.path.basename(dst) == ckpt.TRACKER_FILENAME)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 20, _tiny_state(20))
    monkeypatch.undo()
    assert latest_iteration(tmp_path) == 10
    assert load_checkpoint(tmp_path)[1]["step"] == 10
    # The new directory is complete and loadable explicitly.
    assert load_checkpoint(tmp_path, iteration=20)[1]["step"] == 20


def test_crash_while_replacing_same_iteration_recovers(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, _tiny_state(10))
    save_checkpoint(tmp_path, 20, _tiny_state(20))
    # Re-save 20: the old copy is moved aside, then the crash hits before the new one lands.
    _fail_on(monkeypatch, lambda src, dst: ".tmp-" in os.path.basename(src) and os.path.isdir(src))
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 20, _tiny_state(21))
    monkeypatch.undo()
    assert latest_iteration(tmp_path) == 20
    assert not (tmp_path / "iter_0000020").exists()
    it, state, _ = load_checkpoint(tmp_path)
    assert it == 20 and state["step"] == 20
    # A successful re-save replaces it and clears the scratch copies.
    save_checkpoint(tmp_path, 20, _tiny_state(22))
    assert load_checkpoint(tmp_path)[1]["step"] == 22
    assert sorted(os.listdir(tmp_path)) == ["iter_0000010", "iter_0000020", "latest_checkpointed_iteration.txt"]


def test_background_save_publishes_only_on_finish(tmp_path):
    save_checkpoint(tmp_path, 10, _tiny_state(10))
    pending = save_checkpoint(tmp_path, 20, _tiny_state(20), background=True)
    # Written, being checksummed: nothing a resume reads has changed yet.
    assert latest_iteration(tmp_path) == 10 and not (tmp_path / "iter_0000020").exists()
    assert pending.iteration == 20
    pending._thread.join(timeout=120)  # ready() polls without waiting: once this rank's checksums are done, it says so
    assert pending.ready()
    assert pending.finish() == tmp_path / "iter_0000020"
    assert latest_iteration(tmp_path) == 20
    it, state, _ = load_checkpoint(tmp_path)  # verifies the background CRC-32s
    assert it == 20 and state["step"] == 20
    meta = ckpt.read_checkpoint_metadata(tmp_path / "iter_0000020")
    assert meta["files"]["mp_rank_00/model_optim_rng.pt"] == ckpt.file_record(
        tmp_path / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt"
    )


def test_background_save_that_fails_its_checksums_keeps_previous(tmp_path):
    save_checkpoint(tmp_path, 10, _tiny_state(10))
    pending = save_checkpoint(tmp_path, 20, _tiny_state(20), background=True)
    pending._thread.join(timeout=120)
    assert not pending._thread.is_alive()
    pending._records, pending._error = {}, "OSError: simulated read failure"
    with pytest.raises(CheckpointError, match="checksumming .*simulated read failure"):
        pending.finish()
    assert latest_iteration(tmp_path) == 10 and load_checkpoint(tmp_path)[1]["step"] == 10


def test_parameter_check_refuses_nan_and_inf_but_not_huge_finite_values():
    from types import SimpleNamespace

    from megatron_dga.errors import NumericalError
    from megatron_dga.training.resume import check_parameters_finite

    huge = torch.full((64,), 3e38)  # finite, but its sum overflows to inf
    trainer = SimpleNamespace(params=[torch.randn(5), huge], ctx=SimpleNamespace(device="cpu"), iteration=7)
    check_parameters_finite(trainer)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = torch.randn(5)
        broken[2] = bad
        trainer.params = [huge, broken, torch.randn(3).bfloat16()]
        with pytest.raises(NumericalError, match="iteration 7: 1 parameter tensor"):
            check_parameters_finite(trainer)


def test_failed_shard_write_leaves_tracker(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, _tiny_state(10))

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(tmp_path, 20, _tiny_state(20))
    monkeypatch.undo()
    assert latest_iteration(tmp_path) == 10
    assert load_checkpoint(tmp_path)[1]["step"] == 10


def test_non_weights_only_state_rejected_at_save(tmp_path):
    state = {"sampler": {"counts": np.arange(3)}}
    with pytest.raises(CheckpointError, match=r"state\['sampler'\]\['counts'\].*numpy"):
        save_checkpoint(tmp_path, 1, state)
    with pytest.raises(CheckpointError, match=r"common_state\['x'\].*numpy"):
        save_checkpoint(tmp_path, 1, {}, common_state={"x": np.float64(1.0)})  # float subclass
    assert latest_iteration(tmp_path) is None
    save_checkpoint(tmp_path, 2, state, weights_only=False)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(tmp_path)
    _, loaded, _ = load_checkpoint(tmp_path, weights_only=False)
    np.testing.assert_array_equal(loaded["sampler"]["counts"], np.arange(3))


def test_layout_mismatch_and_dp_change(tmp_path):
    save_checkpoint(tmp_path, 7, _tiny_state(7))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, layout=CheckpointLayout(tp_size=2, tp_rank=1))
    msg = str(info.value)
    assert "TP=1 PP=1" in msg and "TP=2 PP=1" in msg and "--tensor-model-parallel-size 1" in msg
    # DP may change: every DP rank reads the model-parallel file.
    it, state, _ = load_checkpoint(tmp_path, layout=CheckpointLayout(dp_size=4, dp_rank=3))
    assert it == 7 and torch.equal(state["w"], torch.full((3,), 7.0))


def test_layout_validation_and_names():
    with pytest.raises(ConfigError, match="tp_rank"):
        CheckpointLayout(tp_size=2, tp_rank=2)
    with pytest.raises(ConfigError, match="pp_size"):
        CheckpointLayout(pp_size=0)
    assert CheckpointLayout(tp_size=4, tp_rank=3).shard_dirname() == "mp_rank_03"
    layout = CheckpointLayout(tp_size=2, pp_size=3, tp_rank=1, pp_rank=2)
    assert layout.shard_dirname() == "mp_rank_01_002"
    assert len(set(layout.all_shard_files())) == 6


def test_clear_errors_for_bad_load_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 3, _tiny_state(3))
    save_checkpoint(tmp_path, 6, _tiny_state(6))
    (tmp_path / ckpt.TRACKER_FILENAME).unlink()
    with pytest.raises(CheckpointError, match=r"iteration directories \[3, 6\]"):
        load_checkpoint(tmp_path)
    assert latest_iteration(tmp_path) is None
    (tmp_path / ckpt.TRACKER_FILENAME).write_text("9\n")
    with pytest.raises(CheckpointError, match=r"iter_0000009 does not exist.*\[3, 6\]"):
        load_checkpoint(tmp_path)
    (tmp_path / ckpt.TRACKER_FILENAME).write_text("release\n")
    with pytest.raises(CheckpointError, match="not an iteration number"):
        latest_iteration(tmp_path)
    (tmp_path / ckpt.TRACKER_FILENAME).write_text("6\n")

    shard = tmp_path / "iter_0000006" / "mp_rank_00" / "model_optim_rng.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path)
    shard.write_bytes(b"\0" * len(data))
    # Same size, other bytes: the CRC-32 recorded at save time names the file and the fallback.
    with pytest.raises(CheckpointError, match=r"model_optim_rng.pt is corrupt: CRC-32 .*--ckpt-step 3"):
        load_checkpoint(tmp_path)
    (tmp_path / "iter_0000003" / "megatron_dga.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path, iteration=3)
    shutil.rmtree(tmp_path / "iter_0000006" / "mp_rank_00")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="iteration"):
        save_checkpoint(tmp_path, -1, {})
    with pytest.raises(ConfigError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, keep_last=0)


# ----------------------------------------------------------------------------- 2 gloo ranks


def _dist_worker(rank, world_size, root):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = {}
        # DP=2: only dp_rank 0 writes; both read it back.
        dp_layout = CheckpointLayout(dp_size=2, dp_rank=rank)
        save_checkpoint(f"{root}/dp", 4, _tiny_state(100 + rank), layout=dp_layout, common_state={"c": 1})
        dist.barrier()
        it, state, common = load_checkpoint(f"{root}/dp", layout=dp_layout)
        out["dp"] = (it, state["step"], common["c"], sorted(os.listdir(f"{root}/dp/iter_0000004")))

        # TP=2: one file per tensor-parallel rank, each rank reads its own.
        tp_layout = CheckpointLayout(tp_size=2, tp_rank=rank)
        for it in (1, 2, 3):
            save_checkpoint(f"{root}/tp", it, _tiny_state(10 * it + rank), layout=tp_layout, keep_last=2)
        dist.barrier()
        it, state, _ = load_checkpoint(f"{root}/tp", layout=tp_layout)
        out["tp"] = (it, state["step"], sorted(os.listdir(f"{root}/tp")))

        # PP=2 naming.
        pp_layout = CheckpointLayout(pp_size=2, pp_rank=rank)
        save_checkpoint(f"{root}/pp", 1, _tiny_state(rank), layout=pp_layout)
        out["pp"] = (
            load_checkpoint(f"{root}/pp", layout=pp_layout)[1]["step"],
            sorted(os.listdir(f"{root}/pp/iter_0000001")),
        )

        # A failure on one rank raises on both (no hang) and publishes nothing.
        bad = {"x": np.zeros(2)} if rank == 1 else _tiny_state(0)
        try:
            save_checkpoint(f"{root}/tp", 9, bad, layout=tp_layout)
            out["error"] = None
        except CheckpointError as exc:
            out["error"] = str(exc)
        out["after_error"] = latest_iteration(f"{root}/tp")
        return out
    finally:
        dist.destroy_process_group()


def test_two_rank_dp_tp_pp(tmp_path):
    r0, r1 = run_distributed(_dist_worker, 2, (str(tmp_path),))
    for rank, out in enumerate((r0, r1)):
        assert out["dp"] == (4, 100, 1, ["common.pt", "megatron_dga.json", "mp_rank_00"])
        assert out["tp"] == (3, 30 + rank, ["iter_0000002", "iter_0000003", ckpt.TRACKER_FILENAME])
        assert out["pp"] == (rank, ["common.pt", "megatron_dga.json", "mp_rank_00_000", "mp_rank_00_001"])
        assert "rank 1" in out["error"] and "numpy" in out["error"]
        assert out["after_error"] == 3
    assert sorted(os.listdir(tmp_path / "tp" / "iter_0000003")) == [
        "common.pt",
        "megatron_dga.json",
        "mp_rank_00",
        "mp_rank_01",
    ]
