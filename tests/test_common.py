import json
import os

import pytest
import torch

from echovlm import common


def test_new_run_dir_never_reuses_a_name(tmp_path):
    a = common.new_run_dir(tmp_path, "run")
    (a / "keep.txt").write_text("user data")
    b = common.new_run_dir(tmp_path, "run")
    c = common.new_run_dir(tmp_path, "run")
    assert [a.name, b.name, c.name] == ["run", "run1", "run2"]
    assert (a / "keep.txt").read_text() == "user data"


def test_atomic_writes_leave_no_temp_files(tmp_path):
    common.atomic_write_json(tmp_path / "x.json", {"a": 1})
    common.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "ck.pt")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["w"].sum() == 2
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "x.json"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    common.atomic_write_text(tmp_path / "f.txt", "old")
    with pytest.raises(TypeError):
        common.atomic_write_json(tmp_path / "f.txt", {"bad": object()})
    assert (tmp_path / "f.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_device_and_single_process_init(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert common.autodetect_device("cpu") == "cpu"
    assert common.autodetect_device() in ("cuda", "mps", "cpu")
    ddp, rank, local_rank, world, device = common.compute_init("cpu")
    assert (ddp, rank, local_rank, world, device.type) == (False, 0, 0, 1, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            common.autodetect_device("cuda")


@pytest.mark.parametrize("features, expected", [({"_is_avx512_bf16_supported": True}, "bf16"),
                                                 ({"_is_amx_tile_supported": True}, "bf16"),
                                                 ({}, "fp32")], ids=["avx512-bf16", "amx", "neither-or-unknown"])
def test_auto_precision_is_bf16_only_where_the_device_multiplies_it_natively(monkeypatch, features, expected):
    # a CPU without the instructions (or a torch without the helpers) emulates bf16, slower than fp32
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if name in features:
            monkeypatch.setattr(torch.cpu, name, lambda v=features[name]: v, raising=False)
        else:
            monkeypatch.delattr(torch.cpu, name, raising=False)
    assert common.resolve_dtype("auto", "cpu") == expected
    assert common.resolve_dtype("auto", "cuda") == "bf16" and common.resolve_dtype("auto", "mps") == "fp32"
    # an explicit choice is kept whatever the hardware
    assert common.resolve_dtype("fp32", "cuda") == "fp32" and common.resolve_dtype("bf16", "mps") == "bf16"


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_writes_and_temp_dirs_respect_the_umask(tmp_path, umask):
    # mkstemp/mkdtemp make 0600/0700 whatever the umask, and the rename keeps it: a shared data/ was unreadable
    common.atomic_write_json(tmp_path / "x.json", {"a": 1})
    common.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "ck.pt")
    d = common.make_temp_dir(tmp_path / "ds", "partial")
    assert common.current_umask() == umask
    assert oct(os.stat(tmp_path / "x.json").st_mode & 0o777) == oct(0o666 & ~umask)
    assert oct(os.stat(tmp_path / "ck.pt").st_mode & 0o777) == oct(0o666 & ~umask)
    assert oct(os.stat(d).st_mode & 0o777) == oct(0o777 & ~umask) and d.name.startswith(".ds.partial-")


def test_replace_dir_keeps_what_it_did_not_write(tmp_path):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    new.mkdir()
    for name, text in (("a.txt", "old a"), ("b.txt", "old b"), ("notes.txt", "mine")):
        (out / name).write_text(text)
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "t.json").write_text("later step")
    (new / "a.txt").write_text("new a")
    common.replace_dir(new, out, ours=["a.txt", "b.txt"])
    assert sorted(os.listdir(out)) == ["a.txt", "notes.txt", "tokenizer"]  # old b.txt was ours: gone
    assert (out / "a.txt").read_text() == "new a" and (out / "notes.txt").read_text() == "mine"
    assert (out / "tokenizer" / "t.json").read_text() == "later step"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing left aside
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    common.replace_dir(fresh, tmp_path / "target", ours=[])
    assert sorted(os.listdir(tmp_path)) == ["out", "target"]
