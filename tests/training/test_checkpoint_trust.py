"""Loading a checkpoint never runs code from it, damaged checkpoints are one line, and the Hugging Face
converter never writes outside its --output nor reads outside its input directory (issue 22).

One real torch_dist checkpoint of the tiny trainer (iterations 1 and 2) is made per module; each test
damages a copy. A pickle payload (an object whose unpickling creates a directory) is planted where torch
or megatron would unpickle it, with the checksum record rewritten to match (as whoever can edit the files
can): the directory must never appear, and the trainer's --load and the converter's to-hf must stop with
one error line naming the file.
"""

import io
import json
import os
import pickle
import pickletools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dga.errors import CheckpointError, ConfigError, DataError
from megatron_dga.training import checkpoint as ckpt
from tests.helpers import REPO
from tests.helpers.synthetic import TINY_GPT_ARGS, data_flags, run_argv, three_domain_shards

TOOL = str(Path(REPO) / "tools" / "convert_hf_checkpoint.py")


class Payload:
    """Unpickling it creates ``path`` (stands for any code a pickle can run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def _run(args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _argv(shards, run_dir, extra=()):
    return run_argv(run_dir, extra, data=data_flags(shards), global_batch=4, iters=2, lr="1e-3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    shards = three_domain_shards(str(root / "shards"))
    saved = root / "ckpt"
    rc, err = _run(
        [
            "-m",
            "megatron_dga.pretrain_gpt",
            *_argv(shards, root / "run", ["--save", str(saved), "--save-interval", "1"]),
        ]
    )
    assert rc == 0, err[-3000:]
    return shards, saved


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the trained checkpoint root, and its iteration-2 directory."""
    root = tmp_path / "ckpt"
    shutil.copytree(trained[1], root, symlinks=True)
    return root, root / "iter_0000002"


def _fix_checksums(it_dir):
    """Rewrite the completeness marker's record of every file to match the files as they are now."""
    marker = it_dir / ckpt.METADATA_FILENAME
    meta = json.loads(marker.read_text())
    meta["files"] = {rel: ckpt.file_record(it_dir / rel) for rel in meta["files"]}
    marker.write_text(json.dumps(meta))


def _assert_one_error_line(rc, err, *patterns):
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err[-3000:]
    for pattern in patterns:
        assert pattern in lines[0], (pattern, lines[0])


def _plant_object_payload(it_dir, marker):
    """Point the rng_state object of the torch_dist files at a torch.save'd payload appended to its .distcp
    file (torch.distributed.checkpoint unpickles stored objects with weights_only=False)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    with open(it_dir / ".metadata", "rb") as f:
        md = pickle.load(f)  # the test's own, trusted copy
    index = next(i for i in md.storage_data if i.fqn.startswith("rng_state"))
    info = md.storage_data[index]
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    target = it_dir / info.relative_path
    offset = target.stat().st_size
    with open(target, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[index] = _StorageInfo(info.relative_path, offset, len(buf.getvalue()))
    with open(it_dir / ".metadata", "wb") as f:
        pickle.dump(md, f)


PLANTED = {
    # where: how the payload gets there
    ".metadata": lambda it_dir, marker: (it_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker))),
    "object in a .distcp file": _plant_object_payload,
}


@pytest.mark.parametrize("where", sorted(PLANTED))
def test_load_never_runs_a_pickle_payload(trained, copy, tmp_path, where):
    shards, _ = trained
    root, it_dir = copy
    marker = tmp_path / "payload-ran"
    PLANTED[where](it_dir, marker)
    _fix_checksums(it_dir)
    rc, err = _run(["-m", "megatron_dga.pretrain_gpt", *_argv(shards, tmp_path / "run", ["--load", str(root)])])
    assert not marker.exists(), "the checkpoint ran code through --load"
    _assert_one_error_line(rc, err, f"{it_dir}/", "is refused", "never runs code", "--ckpt-step 1")


def test_to_hf_never_runs_a_pickle_payload(copy, tmp_path):
    root, it_dir = copy
    marker = tmp_path / "payload-ran"
    PLANTED[".metadata"](it_dir, marker)
    _fix_checksums(it_dir)
    rc, err = _run([TOOL, "to-hf", "--load", str(root), "--output", str(tmp_path / "hf"), *TINY_GPT_ARGS])
    assert not marker.exists(), "to-hf ran code from the checkpoint"
    _assert_one_error_line(rc, err, f"{it_dir}/.metadata is refused", "makedirs", "--ckpt-step 1")
    assert not any((tmp_path / "hf").iterdir())


def _globals(data: bytes) -> set:
    """(module, name) of every GLOBAL/STACK_GLOBAL of a pickle (strings tracked through the memo)."""
    found, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg))
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
        if op.name != "MEMOIZE" and op.name not in (
            "SHORT_BINUNICODE",
            "BINUNICODE",
            "UNICODE",
            "BINUNICODE8",
            "BINGET",
            "LONG_BINGET",
            "GET",
        ):
            strings.append(None)  # anything else on the stack between strings
    return found


def test_the_restricted_unpickler_admits_what_a_real_checkpoint_names(trained):
    _, saved = trained
    data = (saved / "iter_0000002" / ".metadata").read_bytes()
    named = _globals(data)
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in named
    admitted = {(m, n) for m, names in ckpt.DCP_METADATA_GLOBALS.items() for n in names}
    dtypes = {("torch", n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
    assert named <= admitted | dtypes, named - admitted - dtypes
    md = ckpt._DCPMetadataUnpickler(io.BytesIO(data)).load()
    assert md.state_dict_metadata.keys() == pickle.loads(data).state_dict_metadata.keys()
    # What it refuses: anything else, e.g. a builtin that runs code.
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec"):
        ckpt._DCPMetadataUnpickler(io.BytesIO(pickle.dumps(exec))).load()


def _marker_without(key):
    def damage(it_dir):
        path = it_dir / ckpt.METADATA_FILENAME
        meta = json.loads(path.read_text())
        del meta[key]
        path.write_text(json.dumps(meta))

    return damage


def _outside_path(it_dir):
    path = it_dir / ckpt.METADATA_FILENAME
    meta = json.loads(path.read_text())
    meta["files"]["../iter_0000001/common.pt"] = meta["files"]["common.pt"]
    path.write_text(json.dumps(meta))


def _corrupt_unlisted(it_dir):
    (it_dir / "__0_9.distcp").write_bytes(b"\0" * 64)


def _common_payload(it_dir):
    torch.save({"x": Payload(it_dir.parent / "payload-ran")}, it_dir / "common.pt")
    _fix_checksums(it_dir)


def _garble(name):
    def damage(it_dir):
        (it_dir / name).write_bytes(b"\x80\x04garbled" + os.urandom(32))
        _fix_checksums(it_dir)

    return damage


DAMAGED = {
    # case: (damage(it_dir), the file the error names, words of the error)
    "garbled .metadata": (_garble(".metadata"), "iter_0000002/.metadata", "is refused"),
    "garbled metadata.json": (_garble("metadata.json"), "iter_0000002/metadata.json", "is refused"),
    "pickle payload in common.pt": (_common_payload, "iter_0000002/common.pt", "weights_only=True"),
    "marker without files": (_marker_without("files"), "megatron_dga.json is malformed", "files is missing"),
    "marker without layout": (_marker_without("layout"), "megatron_dga.json is malformed", "layout is None"),
    "marker lists a path outside": (_outside_path, "megatron_dga.json is malformed", "not a relative path inside"),
    "binary tracker": (
        lambda d: (d.parent / ckpt.TRACKER_FILENAME).write_bytes(b"\xff\xfe\x00\x01"),
        ckpt.TRACKER_FILENAME,
        "not an iteration number",
    ),
    "unlisted file": (_corrupt_unlisted, "iter_0000002/__0_9.distcp is not listed", "cannot be verified"),
    "symbolic link": (lambda d: (d / "extra").symlink_to("/etc/hostname"), "symbolic link", "iter_0000002/extra"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_checkpoint_is_one_error_naming_the_file(copy, case):
    root, it_dir = copy
    damage, names, words = DAMAGED[case]
    damage(it_dir)
    with pytest.raises(CheckpointError) as info:
        ckpt_dir, meta = ckpt.resolve_checkpoint(root)  # what --load and to-hf do first
        ckpt.verify_checkpoint(ckpt_dir, meta)  # and then, before any library reads the files
    message = str(info.value)
    assert "\n" not in message and names in message and words in message, message
    assert "--ckpt-step" in message, message
    assert not (root / "payload-ran").exists()


def test_loaded_parameters_are_checked_finite(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)})
    ckpt.save_checkpoint(tmp_path, 2, {"w": torch.tensor([1.0, float("nan"), 2.0]), "opt": {"m": torch.zeros(2)}})
    with pytest.raises(
        CheckpointError,
        match=r"iter_0000002/mp_rank_00/model_optim_rng.pt: 1 loaded tensor\(s\) "
        r"hold NaN or Inf \(w\).*--ckpt-step 1",
    ):
        ckpt.load_checkpoint(tmp_path)
    assert ckpt.load_checkpoint(tmp_path, iteration=1)[1]["w"].sum() == 3


# ----------------------------------------------------------------------------- the converter's files


def test_converter_output_must_be_empty_and_is_never_written_through_a_link(tmp_path):
    from megatron_dga.convert.hf import _check_output_dir, _copy_side_files, _write_hf

    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"--output .*out is not empty \(it holds \['tokenizer.json'\]\)"):
        _check_output_dir(out, "--output")
    # The writers themselves replace a planted link instead of following it.
    (out / "model.safetensors").symlink_to(outside)
    (out / "config.json").symlink_to(outside)
    source = tmp_path / "src"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"new": 1}')
    _copy_side_files(source, out)
    _write_hf(out, {"x": 1}, {"w": torch.ones(2)})
    assert outside.read_text() == "keep"
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert not (out / name).is_symlink()
    assert (out / "tokenizer.json").read_text() == '{"new": 1}'
    assert json.loads((out / "config.json").read_text()) == {"x": 1}


@pytest.mark.parametrize("file", ["../outside/model-1.safetensors", "/tmp/model-1.safetensors"])
def test_weight_index_paths_stay_inside_the_model_directory(tmp_path, file):
    from megatron_dga.convert.hf import HFWeights

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": file}}))
    with pytest.raises(DataError, match=f"maps 'lm_head.weight' to '{file}', not a file inside"):
        HFWeights(hf)


def test_finite_check_skips_uninitialised_placeholders_but_not_states():
    """The distributed optimizer's load hands back this rank's 'step' placeholders (uninitialised memory;
    the step is restored from the param groups after), and its dp_reshardable buckets save and load the
    torch.empty padding between parameters: neither is ever reported; a NaN moment always is."""
    import torch

    from megatron_dga.training.checkpoint import check_finite

    state = {"optimizer": {"param_state": {0: {"step": torch.tensor(float("nan")), "exp_avg": torch.zeros(3)}}}}
    assert check_finite(state, "ckpt", "fix") is None
    pad = {"exp_avg": torch.tensor([float("nan")]), "exp_avg_sq": torch.tensor([float("inf")]), "padding": True}
    state["optimizer"]["param_state"][1] = [pad, {"exp_avg": torch.zeros(2), "padding": False}]
    assert check_finite(state, "ckpt", "fix") is None
    state["optimizer"]["param_state"][1][1]["exp_avg"][0] = float("nan")
    assert "param_state'][1][1]['exp_avg']" in check_finite(state, "ckpt", "fix")
    state["optimizer"]["param_state"][1][1]["exp_avg"][0] = 0.0
    state["optimizer"]["param_state"][0]["exp_avg_sq"] = torch.tensor([1.0, float("inf")])
    assert "exp_avg_sq" in check_finite(state, "ckpt", "fix")
