"""Loader, checkpoints and scripts.base_train end to end on a tiny prepared dataset (CPU, offline).

The dataset is made through the public CLIs (prepare_dataset --source files, tok_train), with short reports
whose words depend on the study embeddings (one or two per study), so a few steps of a depth-1 model show
real learning while the suite stays fast.
"""

import csv
import json
import os
import re
import signal
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
from echovlm.train import HARDWARE_DEFAULTS, OPTIM_DEFAULTS, find_tokenizer, read_split_tokens
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE
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
            "--eval-studies", "16", "--log-every", "2", "--device", "cpu", "--dtype", "fp32", "--seed", "3", *extra]


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


# ------------------------------------------------------------------------------------------------ bad input
def stopped(capsys, argv, code=2) -> str:
    with pytest.raises(SystemExit) as stop:
        base_train.main(argv)
    assert stop.value.code == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("base_train: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--num-steps", "-1"], "--num-steps must be >= 1"), (["--num-steps", "0"], "--num-steps must be >= 1"),
    (["--epochs", "0"], "--epochs must be a number > 0"), (["--epochs", "nan"], "--epochs must be a number > 0"),
    (["--final-lr-frac", "2"], "--final-lr-frac must be in [0, 1]"), (["--matrix-lr", "-1"], "--matrix-lr must be"),
    (["--balance-findings", "-1"], "--balance-findings must be in [0, 1]"),
    (["--prompt-dropout", "nan"], "--prompt-dropout must be in [0, 1]"),
])
def test_a_training_length_below_one_step_is_refused(dataset, tmp_path, capsys, flags, message):
    argv = train_flags(dataset, tmp_path, "bad")
    argv = [a for i, a in enumerate(argv) if "--num-steps" not in argv[max(i - 1, 0):i + 1]] + flags
    assert message in stopped(capsys, argv)
    assert not list(tmp_path.iterdir())  # no run dir left behind


def damage(dataset: Path, tmp: Path, fault: str) -> Path:
    """A copy of the dataset with one fault (the copy's tokenizer directory keeps its name)."""
    import shutil
    copy = tmp / "data"
    shutil.copytree(dataset, copy)
    tok = find_tokenizer(copy, None)
    if fault == "truncated tokens":
        raw = (tok / "train_tokens.npy").read_bytes()
        (tok / "train_tokens.npy").write_bytes(raw[:len(raw) // 2])
    elif fault == "missing offsets":
        (tok / "val_offsets.npy").unlink()
    elif fault == "pickled tokens":
        np.save(tok / "train_tokens.npy", np.array([[1, 2], "x"], dtype=object), allow_pickle=True)
    elif fault == "truncated offsets":
        np.save(tok / "train_offsets.npy", np.load(tok / "train_offsets.npy")[:-5])
    elif fault == "swapped splits":
        for kind in ("tokens", "offsets"):
            a, b = tok / f"train_{kind}.npy", tok / f"val_{kind}.npy"
            a.rename(tok / "tmp.npy")
            b.rename(a)
            (tok / "tmp.npy").rename(b)
    elif fault == "edited tokenizer":
        ranks = tok / "tokenizer.tiktoken"
        ranks.write_text(ranks.read_text().replace(" 0\n", " 1\n", 1))
    elif fault == "edited reports":
        lines = (copy / "reports.jsonl").read_text().splitlines()
        rec = json.loads(lines[3])
        lines[3] = json.dumps({**rec, "report": rec["report"] + " Edited."})
        (copy / "reports.jsonl").write_text("\n".join(lines) + "\n")
    elif fault == "no tokenizer":
        shutil.rmtree(tok)
    return copy


@pytest.mark.parametrize("fault, message", [
    ("truncated tokens", "train_tokens.npy cannot be read"), ("missing offsets", "val_offsets.npy is missing"),
    ("pickled tokens", "train_tokens.npy cannot be read"), ("truncated offsets", "covers"),
    ("swapped splits", "but the dataset's train split has"), ("edited tokenizer", "does not match the checksum"),
    ("edited reports", "made from other reports"), ("no tokenizer", "no tokenizer in"),
])
def test_each_damaged_input_is_one_line_and_leaves_no_run_dir(dataset, tmp_path, capsys, fault, message):
    copy = damage(dataset, tmp_path, fault)
    runs = tmp_path / "runs"
    err = stopped(capsys, train_flags(copy, runs, "bad"))
    assert message in err and "Traceback" not in err, err
    if fault not in ("edited tokenizer", "no tokenizer"):  # tok_train can mend these
        assert f"--vocab-size 300 --out {find_tokenizer(copy, None)} --force" in err or "tok_train" in err, err
    assert not runs.exists() or not list(runs.iterdir())


def test_a_batch_that_does_not_divide_is_one_line(dataset, tmp_path, capsys):
    argv = train_flags(dataset, tmp_path, "bad") + ["--total-batch-size", "10"]
    assert "must be a multiple of --device-batch-size" in stopped(capsys, argv)
    assert not list(tmp_path.iterdir())


def test_help_states_the_defaults_the_code_uses():
    parser = base_train.build_parser()
    helps = {a.dest: a.help or "" for a in parser._actions}
    for name, value in OPTIM_DEFAULTS.items():
        assert parser.get_default(name) == value and f"default {value:g}" in helps[name], name
    for device, label in (("cuda", "CUDA"), ("cpu", "CPU")):
        for name, value in HARDWARE_DEFAULTS[device].items():
            if value is not None:
                assert re.search(rf"\b{value:g}\b[^,)]*{label}|{label} default {value:g}\b", helps[name]), (name, helps[name])


# ------------------------------------------------------------------------------------------------ resume
def test_a_finished_run_resumed_does_nothing_and_says_so(full_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    summary = (run / "train_summary.json").read_bytes()
    assert base_train.main(["--resume", str(run)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (run / "train_summary.json").read_bytes() == summary
    # killed after its last checkpoint but before the summary: the summary is written from the run's own rows
    (run / "train_summary.json").unlink()
    assert base_train.main(["--resume", str(run)]) == 0
    rebuilt = json.loads((run / "train_summary.json").read_text())
    assert rebuilt["tokens_per_sec"] > 0 and rebuilt["padding_fraction"] is not None
    assert rebuilt["best_val_bpb"] == json.loads(summary)["best_val_bpb"]


def test_a_resume_with_other_settings_stops_and_names_them(full_run, dataset, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    before = sorted(p.name for p in run.rglob("*"))
    err = stopped(capsys, ["--resume", str(run), "--depth", "2", "--seed", "3", "--num-steps", "20"])
    assert "--depth 2 (the run has 1)" in err and "--num-steps 20 (the run has 12)" in err and "--seed" not in err
    assert "start a new run without --resume" in err
    assert sorted(p.name for p in run.rglob("*")) == before
    # the same settings again (as speedrun.sh passes them) are no difference
    assert base_train.main(["--resume", str(run), *train_flags(dataset, tmp_path, "full", steps=12)]) == 0


def test_train_csv_keeps_every_row_when_saves_fall_between_log_lines(dataset, tmp_path, monkeypatch):
    real_next = TrainLoader.next
    calls = {"n": 0}

    def killed_after_7_steps(self):
        if calls["n"] == 7:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_next(self)

    flags = train_flags(dataset, tmp_path, "gaps", steps=8,
                        extra=["--save-every", "3", "--log-every", "4", "--eval-every", "100"])
    monkeypatch.setattr(TrainLoader, "next", killed_after_7_steps)
    with pytest.raises(KeyboardInterrupt):
        base_train.main(flags)
    monkeypatch.setattr(TrainLoader, "next", real_next)
    assert read_checkpoint(tmp_path / "gaps" / "checkpoints" / "last.pt")["step"] == 6
    assert base_train.main(["--resume", str(tmp_path / "gaps")]) == 0
    assert [int(r["step"]) for r in read_rows(tmp_path / "gaps" / "train.csv")] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_and_the_run_resumes(dataset, tmp_path, sig, code):
    """A real signal to a real training process: it finishes the step, saves last.pt there, says how to resume,
    exits 128 + the signal; the resume then completes the run with every step's row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    flags = train_flags(dataset, tmp_path, "sig", steps=100, extra=["--eval-every", "1000", "--log-every", "1"])
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("step ") and "| loss" in line:
            proc.send_signal(sig)
            break
    out.append(proc.stdout.read())
    assert proc.wait(timeout=120) == code, "".join(out)
    text = "".join(out)
    assert "Traceback" not in text and f"continue with: python -m scripts.base_train --resume {tmp_path / 'sig'}" in text
    step = read_checkpoint(tmp_path / "sig" / "checkpoints" / "last.pt")["step"]
    assert 1 <= step < 100 and f"stopped by {sig.name} at step {step}/100" in text
    assert [int(r["step"]) for r in read_rows(tmp_path / "sig" / "train.csv")] == list(range(1, step + 1))
    if sig == signal.SIGINT:
        again = subprocess.run([sys.executable, "-m", "scripts.base_train", "--resume", str(tmp_path / "sig")],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert [int(r["step"]) for r in read_rows(tmp_path / "sig" / "train.csv")] == list(range(1, 101))


def test_the_tokenizer_is_the_only_one_or_the_default_size(tmp_path):
    def make(name):
        (tmp_path / name).mkdir()
        for f in ("tokenizer.json", "tok_stats.json"):
            (tmp_path / name / f).write_text("{}")

    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        find_tokenizer(tmp_path, None)
    make("tokenizer_v300")
    assert find_tokenizer(tmp_path, None) == tmp_path / "tokenizer_v300"
    make("tokenizer_v400")
    with pytest.raises(ValueError, match="several tokenizers .*tokenizer_v300, tokenizer_v400.* --vocab-size"):
        find_tokenizer(tmp_path, None)
    assert find_tokenizer(tmp_path, 400) == tmp_path / "tokenizer_v400"
    make(f"tokenizer_v{DEFAULT_VOCAB_SIZE}")  # what tok_train makes when not told a size
    assert find_tokenizer(tmp_path, None) == tmp_path / f"tokenizer_v{DEFAULT_VOCAB_SIZE}"
    with pytest.raises(FileNotFoundError, match="run `python -m scripts.tok_train .* --vocab-size 500`"):
        find_tokenizer(tmp_path, 500)
