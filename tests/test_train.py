"""Loader, checkpoints and scripts.base_train end to end on a tiny prepared dataset (CPU, offline).

The dataset is made through the public CLIs (prepare_dataset --source files, tok_train), with short reports
whose words depend on the study embeddings (one or two per study), so a few steps of a depth-1 model show
real learning while the suite stays fast.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echovlm.checkpoint import load_model, read_checkpoint
from echovlm.dataset import open_dataset
from echovlm.gpt import GPT
from echovlm.loader import DeviceSplit, TrainLoader
from echovlm.tokenizer import Tokenizer
from echovlm.train import find_tokenizer, read_split_tokens
from scripts import base_train, prepare_dataset, tok_train

ROOT = Path(__file__).resolve().parents[1]
D = 16
SIZES = ["normal", "mildly dilated", "moderately dilated", "severely dilated"]
GRADES = ["no", "trace", "mild", "moderate", "severe"]


def write_source(tmp: Path, n: int = 320):
    g = np.random.default_rng(0)
    directions = g.standard_normal((3, D))
    rows, offsets, lines = [], [0], []
    for i in range(n):
        ef, size, mr = int(g.integers(20, 75)), int(g.integers(0, 4)), int(g.integers(0, 5))
        state = np.array([(ef - 50) / 15, size - 1.5, mr - 2.0])
        k = 1 + int(i % 3 == 0)  # every third study has two views
        for _ in range(k):
            rows.append(state @ directions + 0.2 * g.standard_normal(D))
        offsets.append(len(rows))
        extra = " The aortic root is normal." * int(g.integers(0, 3))  # varied lengths for the length grouping
        report = (f"Left Ventricle: LVEF {ef}%. The left ventricle is {SIZES[size]}.{extra}\n"
                  f"Mitral Valve: There is {GRADES[mr]} mitral regurgitation.")
        lines.append(json.dumps({"study": f"S{i:04d}", "report": report}))
    (tmp / "reports.jsonl").write_text("\n".join(lines) + "\n")
    np.save(tmp / "emb.npy", np.array(rows, dtype=np.float32))
    np.save(tmp / "offsets.npy", np.array(offsets, dtype=np.int64))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    write_source(tmp)
    out = tmp / "prepared"
    assert prepare_dataset.main(["--source", "files", "--reports", str(tmp / "reports.jsonl"), "--embeddings",
                                 str(tmp / "emb.npy"), "--offsets", str(tmp / "offsets.npy"), "--val-size", "32",
                                 "--test-size", "32", "--out", str(out)]) in (0, None)
    assert tok_train.main(["--dataset", str(out), "--vocab-size", "300"]) in (0, None)
    return out


def train_flags(dataset, run_dir, name, steps=8, extra=()):
    return ["--dataset", str(dataset), "--run-dir", str(run_dir), "--run-name", name, "--depth", "1",
            "--num-steps", str(steps), "--total-batch-size", "8", "--device-batch-size", "4", "--eval-every", "4",
            "--eval-studies", "16", "--log-every", "2", "--device", "cpu", "--seed", "3", *extra]


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def split(dataset):
    ds = open_dataset(dataset)
    tok_dir = find_tokenizer(ds.path, None)
    tok = Tokenizer.load(tok_dir)
    emb, emb_offsets = ds.embedding_block("train")
    tokens, offsets = read_split_tokens(tok_dir, "train", len(emb_offsets) - 1, tok.vocab_size)
    return DeviceSplit(tokens, offsets, emb, emb_offsets, tok.bos_id, tok.eos_id, tok.pad_id, None, "cpu", "train")


# ------------------------------------------------------------------------------------------------ loader
def test_every_split_of_the_global_batch_sees_the_same_studies(dataset):
    s = split(dataset)
    seen = {}
    for world, micro in ((1, 8), (1, 2), (2, 4), (4, 1)):
        steps = []
        loaders = [TrainLoader(s, 8, micro, rank=r, world_size=world, seed=1) for r in range(world)]
        for _ in range(5):
            micro_batches = [b for ld in loaders for b in ld.next()]
            reports = sorted(tuple(t[t >= 0].tolist()) for b in micro_batches for t in b.targets)
            prefixes = torch.cat([b.prefix for b in micro_batches]).float()
            targets = sum(b.num_targets for b in micro_batches)
            assert all(ld.global_stats["targets"] == targets for ld in loaders)  # known on every rank, no messages
            steps.append((round(prefixes.sum().item(), 2), round(prefixes.abs().sum().item(), 2), targets, reports))
        seen[(world, micro)] = steps
    assert all(v == seen[(1, 8)] for v in seen.values())


def test_epochs_are_seeded_permutations_and_resume_where_they_stopped(dataset):
    s = split(dataset)
    ld = TrainLoader(s, 8, 8, seed=5)
    per_epoch = ld.batches_per_epoch
    first = [ld._epoch_order(0)]
    seen = np.concatenate(first[0])
    assert len(np.unique(seen)) == len(seen) == per_epoch * 8  # no study twice within an epoch
    assert not np.array_equal(ld._epoch_order(0), ld._epoch_order(1))
    assert np.array_equal(ld._epoch_order(1), TrainLoader(s, 8, 8, seed=5)._epoch_order(1))
    for _ in range(per_epoch + 3):  # across an epoch boundary
        ld.next()
    state = ld.state_dict()
    assert state == {"epoch": 1, "pos": 3}
    again = TrainLoader(s, 8, 8, seed=5)
    again.load_state_dict(state)
    a, b = ld.next()[0], again.next()[0]
    assert torch.equal(a.ids, b.ids) and torch.equal(a.prefix, b.prefix)


def test_length_grouping_cuts_padding(dataset):
    s = split(dataset)

    def padding(grouping):
        ld = TrainLoader(s, 8, 4, seed=0, group_batches=100, length_grouping=grouping)
        pad = pos = 0
        for _ in range(ld.batches_per_epoch):
            ld.next()
            pad += ld.global_stats["padding"]
            pos += ld.global_stats["positions"]
        return pad / pos

    grouped, plain = padding(True), padding(False)
    assert grouped < 0.5 * plain, (grouped, plain)


def test_loader_refuses_batches_that_do_not_divide(dataset):
    s = split(dataset)
    with pytest.raises(ValueError, match="multiple of --device-batch-size"):
        TrainLoader(s, 10, 4, world_size=1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainLoader(s, 4096, 4)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    assert base_train.main(train_flags(dataset, runs, "full", steps=12)) == 0
    return runs / "full"


def test_training_writes_its_outputs_and_learns(full_run, dataset):
    for name in ("config.json", "train.csv", "val.csv", "train.png", "val.png", "train_summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (full_run / name).is_file(), name
    val = read_rows(full_run / "val.csv")
    assert [int(r["step"]) for r in val] == [0, 4, 8, 12]
    assert float(val[-1]["val_loss"]) < 0.5 * float(val[0]["val_loss"])
    summary = json.loads((full_run / "train_summary.json").read_text())
    assert summary["steps"] == 12 and summary["mfu"] is None  # CPU: no peak FLOPs to compare against
    assert summary["best_val_bpb"] == pytest.approx(min(float(r["val_bpb"]) for r in val), rel=1e-8)
    assert 0 <= summary["padding_fraction"] < 0.5 and summary["tokens_per_sec"] > 0
    config = json.loads((full_run / "config.json").read_text())
    assert config["model"]["depth"] == 1 and config["accumulation_steps"] == 2 and config["world_size"] == 1

    model, tok, info = load_model(full_run, "cpu")
    assert info["step"] == int(val[-1]["step"]) and info["dataset"] == str(Path(dataset).resolve())
    assert info["val_bpb"] == pytest.approx(summary["best_val_bpb"])
    assert tok.vocab_size == model.config.vocab_size and not model.training


def test_resume_reproduces_the_uninterrupted_run(full_run, dataset, tmp_path, monkeypatch):
    real_next = TrainLoader.next
    calls = {"n": 0}

    def killed_after_6_steps(self):
        if calls["n"] == 6:
            raise KeyboardInterrupt  # as if the job were killed between steps 6 and 7
        calls["n"] += 1
        return real_next(self)

    monkeypatch.setattr(TrainLoader, "next", killed_after_6_steps)
    with pytest.raises(KeyboardInterrupt):
        base_train.main(train_flags(dataset, tmp_path, "killed", steps=12))
    run = tmp_path / "killed"
    assert read_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4  # the last checkpoint before the kill
    monkeypatch.setattr(TrainLoader, "next", real_next)
    assert base_train.main(["--resume", str(run)]) == 0

    for name, key in (("train.csv", "loss"), ("val.csv", "val_loss")):
        want, got = read_rows(full_run / name), read_rows(run / name)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        # same arithmetic in the same order on the same CPU: equal up to the 9 digits the CSV keeps
        np.testing.assert_allclose([float(r[key]) for r in got], [float(r[key]) for r in want], rtol=1e-5)
    a = read_checkpoint(full_run / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_two_gloo_processes_match_one_process_with_accumulation(full_run, dataset, tmp_path):
    """torchrun x2 (1 micro batch each) vs 1 process (2 accumulated): the same global batches and the same
    loss normalisation, so the same curve. Tolerance rtol 1e-4: the all-reduce sums gradients in another
    order than accumulation does (fp32 rounding), and Muon's normalisation keeps that from growing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.base_train", *train_flags(dataset, tmp_path, "ddp", steps=12)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2 and config["accumulation_steps"] == 1
    for name, key in (("train.csv", "loss"), ("val.csv", "val_loss")):
        want, got = read_rows(full_run / name), read_rows(tmp_path / "ddp" / name)
        np.testing.assert_allclose([float(r[key]) for r in got], [float(r[key]) for r in want], rtol=1e-4)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch, capsys):
    real_forward = GPT.forward
    calls = {"n": 0}

    def nan_from_step_6(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 5:  # 2 micro batches per step: steps 1-5 are fine
                out = out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", nan_from_step_6)
    assert base_train.main(train_flags(dataset, tmp_path, "nan", steps=12)) == 1
    out = capsys.readouterr().out
    assert "became nan at step 6" in out and "last val bpb" in out
    assert read_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")["step"] == 4
    assert not (tmp_path / "nan" / "train_summary.json").exists()


def test_load_model_errors_are_clear(full_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a run directory"):
        load_model(tmp_path / "nowhere", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no best.pt or last.pt"):
        load_model(tmp_path / "empty", "cpu")
    broken = tmp_path / "broken.pt"
    broken.write_bytes((full_run / "checkpoints" / "last.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable echovlm checkpoint"):
        load_model(broken, "cpu")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an echovlm checkpoint"):
        load_model(other, "cpu")
    ckpt = read_checkpoint(full_run / "checkpoints" / "best.pt")
    ckpt["config"]["depth"] = 2
    mismatched = tmp_path / "mismatched.pt"
    torch.save(ckpt, mismatched)
    with pytest.raises(ValueError, match="do not match"):
        load_model(mismatched, "cpu")


def test_resume_refuses_a_run_without_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        base_train.main(["--resume", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("base_train: ") and "before its first checkpoint" in err and "\n" not in err
