"""The clinical-reward stage (echovlm.rl, scripts.rl_train): advantages, the DDP property on fixed samples,
resume, a run whose val reward rises, and the bad inputs."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from echovlm import rl
from echovlm.checkpoint import read_checkpoint
from scripts import base_train, rl_train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "rl_step_worker.py"


def rl_flags(base, run_dir, name, steps=4, extra=()):
    return ["--base", str(base), "--run-dir", str(run_dir), "--run-name", name, "--num-steps", str(steps),
            "--studies-per-step", "4", "--samples", "2", "--val-every", "2", "--val-studies", "4",
            "--weight-studies", "50", "--generate-batch-size", "16", "--device-batch-size", "4", "--device", "cpu",
            "--seed", "1", *extra]


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_advantages_are_relative_to_the_study_group():
    r = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 6.0])
    np.testing.assert_allclose(rl.advantages(r, 2), [-1, 1, 0, 0, -3, 3])
    np.testing.assert_allclose(rl.advantages(r, 3).reshape(2, 3).sum(1), 0, atol=1e-12)


def test_one_process_equals_two_gloo_processes_on_fixed_samples(trained_run, tmp_path):
    """The same fixed samples, all on one process or split over 2 gloo ranks (and micro batches of 2 rows):
    the same update, up to the all-reduce's summation order (Muon's Newton-Schulz turns that fp32 rounding into
    differences of a few 1e-6 in single weights, hence atol 1e-5)."""
    run, _ = trained_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for cmd, out in (([sys.executable, str(WORKER)], one),
                     ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(WORKER)], two)):
        proc = subprocess.run([*cmd, str(run), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert np.abs(a["adv"]).sum() > 0, "the fixed samples must teach something for this test to mean anything"
    before = read_checkpoint(Path(run) / "checkpoints" / "best.pt")["model"]
    moved = sum(float((a["state"][k] - before[k]).abs().sum()) for k in before)
    assert moved > 0
    for k in a["state"]:
        torch.testing.assert_close(b["state"][k], a["state"][k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def rl_run(trained_run, tmp_path_factory):
    run, _ = trained_run
    runs = tmp_path_factory.mktemp("rl_runs")
    assert rl_train.main(rl_flags(run, runs, "full")) == 0
    return runs / "full"


def test_rl_run_writes_a_run_that_loads_like_a_base_run(rl_run, trained_run):
    for name in ("config.json", "train.csv", "val.csv", "train.png", "val.png", "train_summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (rl_run / name).is_file(), name
    from echovlm.checkpoint import load_model
    model, tok, info = load_model(rl_run, "cpu")
    base_run, ds = trained_run
    _, _, base_info = load_model(base_run, "cpu")
    # the base run's findings head and label rules travel with the fine-tuned weights (load_model needs the head)
    assert (info["findings"] is None) == (base_info["findings"] is None)
    assert (info["rules"], info["rules_key"]) == (base_info["rules"], base_info["rules_key"])
    assert Path(info["dataset"]) == Path(ds.path).resolve() or Path(info["dataset"]) == Path(ds.path)
    assert [int(r["step"]) for r in rows(rl_run / "train.csv")] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in rows(rl_run / "val.csv")] == [0, 2, 4]
    summary = json.loads((rl_run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["best_val_reward"] >= summary["start_val_reward"]


def test_resume_equals_the_uninterrupted_run(rl_run, trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    real, calls = rl.policy_gradient_step, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # after last.pt of step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rl_train, "policy_gradient_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        rl_train.main(rl_flags(run, tmp_path, "killed"))
    monkeypatch.setattr(rl_train, "policy_gradient_step", real)
    assert rl_train.main(["--resume", str(tmp_path / "killed")]) == 0
    for name, key in (("train.csv", "reward"), ("val.csv", "val_reward")):
        want, got = rows(rl_run / name), rows(tmp_path / "killed" / name)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        np.testing.assert_allclose([float(r[key]) for r in got], [float(r[key]) for r in want], rtol=1e-6)
    a = read_checkpoint(rl_run / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k])
    # a finished run resumed does nothing
    assert rl_train.main(["--resume", str(tmp_path / "killed")]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--samples", "1"], "--samples must be >= 2"),
    (["--num-steps", "0"], "--num-steps must be >= 1"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--lr-frac", "inf"], "--lr-frac must be a finite number > 0, got inf"),
    (["--penalty", "inf"], "--penalty must be a finite number >= 0, got inf"),
    (["--warmdown-frac", "2"], "--warmdown-frac must be in [0, 1], got 2"),
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),  # not "0 means --val-every"
    # more studies per step than the train split holds: refused before the run directory is made
    (["--studies-per-step", "1000"], "--studies-per-step (1000)"),
])
def test_bad_flags_are_one_line(trained_run, tmp_path, capsys, flags, message):
    run, _ = trained_run
    with pytest.raises(SystemExit) as stop:
        rl_train.main(rl_flags(run, tmp_path, "bad") + flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rl_train: ") and message in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_a_base_run_without_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        rl_train.main(rl_flags(tmp_path / "empty", tmp_path, "rl"))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load the base run" in err and "\n" not in err
    assert not (tmp_path / "rl").exists()


def test_a_nan_reward_stops_with_one_line_and_keeps_the_last_checkpoint(trained_run, tmp_path, capsys, monkeypatch):
    run, _ = trained_run
    monkeypatch.setattr(rl, "rewards", lambda preds, refs, w, c=None: np.full(len(preds), np.nan))
    with pytest.raises(SystemExit) as stop:
        rl_train.main(rl_flags(run, tmp_path, "nan"))
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "reward of a sampled report is not finite" in err and "\n" not in err
    assert (tmp_path / "nan" / "checkpoints" / "last.pt").is_file()  # step 0: the base weights, kept


def test_an_unusable_rules_file_is_one_line(trained_run, tmp_path, capsys):
    run, _ = trained_run
    rules = tmp_path / "per_section.json"
    rules.write_text("{}")
    with pytest.raises(SystemExit) as stop:
        rl_train.main(rl_flags(run, tmp_path, "rl", extra=["--echoprime-rules", str(rules)]))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rl_train: --echoprime-rules") and "none of the traits" in err and "\n" not in err
    assert not (tmp_path / "rl").exists()


def good_flags() -> dict:
    """The flags a fresh run records in its config.json."""
    args = rl_train.parse_args(["--base", "runs/base", "--device", "cpu"])
    rl_train.apply_defaults(args, "cpu", 1)
    return vars(args)


@pytest.mark.parametrize("flags, message", [
    ({}, "lacks --base"),
    ([1, 2], "not an rl_train config"),
    ({**good_flags(), "num_steps": "30"}, "num_steps is '30'"),
    ({**good_flags(), "lr_frac": None}, "lr_frac is None"),
    ({**good_flags(), "samples": True}, "samples is True"),
    ({**good_flags(), "num_steps": 0}, "--num-steps must be >= 1"),
    ({**good_flags(), "dtype": "fp8"}, "dtype is 'fp8'"),
])
def test_resume_with_a_damaged_config_is_one_line(tmp_path, capsys, flags, message):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"args": {"flags": flags, "world_size": 1}}))
    with pytest.raises(SystemExit) as stop:
        rl_train.main(["--resume", str(tmp_path / "run")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rl_train: {tmp_path / 'run' / 'config.json'}") and message in err and "\n" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_and_exits_128_plus_it(rl_run, trained_run, tmp_path, monkeypatch, capsys, sig):
    """Ctrl-C / SIGTERM during step 3 (of 4, saves every 2): step 3 finishes, is saved, and the run exits 130 / 143
    with the command that resumes it; the resumed run ends as the uninterrupted one did."""
    run, _ = trained_run
    real, calls = rl.policy_gradient_step, []

    def signalled_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(rl_train, "policy_gradient_step", signalled_in_step_3)
    # were rl_train to leave SIGTERM to its default action, it would end pytest itself: fail the test instead
    previous = signal.signal(signal.SIGTERM, lambda *_: pytest.fail("rl_train did not handle SIGTERM"))
    try:
        code = rl_train.main(rl_flags(run, tmp_path, "stopped"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + sig
    out = capsys.readouterr()
    assert f"--resume {tmp_path / 'stopped'}" in out.out and "Traceback" not in out.err
    assert read_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["step"] == 3
    assert [int(r["step"]) for r in rows(tmp_path / "stopped" / "train.csv")] == [1, 2, 3]
    if sig == signal.SIGTERM:
        return  # the resume is the same for both: checked once
    monkeypatch.setattr(rl_train, "policy_gradient_step", real)
    assert rl_train.main(["--resume", str(tmp_path / "stopped")]) == 0
    for name, key in (("train.csv", "reward"), ("val.csv", "val_reward")):
        want, got = rows(rl_run / name), rows(tmp_path / "stopped" / name)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        np.testing.assert_allclose([float(r[key]) for r in got], [float(r[key]) for r in want], rtol=1e-6)


def test_resuming_a_finished_run_writes_its_missing_outputs(rl_run, tmp_path, capsys):
    """Killed right after its final last.pt: the summary and train.png are written by a resume, not skipped."""
    run = tmp_path / "rl"
    shutil.copytree(rl_run, run)
    (run / "train_summary.json").unlink()
    (run / "train.png").unlink()
    assert rl_train.main(["--resume", str(run)]) == 0
    assert (run / "train.png").is_file()
    want, got = (json.loads((d / "train_summary.json").read_text()) for d in (rl_run, run))
    assert set(got) == set(want)
    for key in ("steps", "start_val_reward", "final_val_reward", "best_val_reward", "first_reward", "last_reward"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    capsys.readouterr()
    assert rl_train.main(["--resume", str(run)]) == 0  # now complete: nothing to do
    assert "nothing to do" in capsys.readouterr().out


def test_a_resume_removes_the_temp_files_a_killed_save_left(rl_run, tmp_path):
    run = tmp_path / "rl"
    shutil.copytree(rl_run, run)
    stale = [run / "checkpoints" / ".last.pt.k2x9_abc.tmp", run / "checkpoints" / ".best.pt.0q1w2e3r.tmp",
             run / ".train.csv.zz81mmq0.tmp"]
    theirs = [run / "checkpoints" / ".notes.txt.abc.tmp", run / ".last.pt.elsewhere.tmp"]
    for f in stale + theirs:
        f.write_bytes(b"")
    assert rl_train.main(["--resume", str(run)]) == 0
    assert not any(f.exists() for f in stale) and all(f.exists() for f in theirs)


@pytest.mark.slow
def test_the_val_reward_rises(tmp_path_factory):
    """A base model trained briefly writes repetitive reports full of contradictions and misses findings; a
    short RL stage on the clinical reward must raise the greedy reports' reward on the fixed val subset well
    beyond what two seeds of the same stage differ by (measured: see the margin below)."""
    from scripts import prepare_dataset, tok_train
    tmp = tmp_path_factory.mktemp("rises")
    data = tmp / "data"
    assert prepare_dataset.main(["--source", "synthetic", "--n-studies", "400", "--seed", "2", "--val-size", "32",
                                 "--test-size", "32", "--out", str(data)]) == 0
    assert tok_train.main(["--dataset", str(data), "--vocab-size", "400"]) == 0
    assert base_train.main(["--dataset", str(data), "--run-dir", str(tmp), "--run-name", "base", "--depth", "2",
                            "--num-steps", "40", "--total-batch-size", "16", "--device-batch-size", "16",
                            "--eval-every", "40", "--eval-studies", "16", "--device", "cpu", "--seed", "0",
                            # the stage fine-tunes free reports; a GPT trained on them alone (no findings prompt,
                            # whose dropout would halve its free-report training) is what the margin was measured on
                            "--no-findings"]) == 0
    assert rl_train.main(["--base", str(tmp / "base"), "--run-dir", str(tmp), "--run-name", "rl", "--num-steps", "12",
                          "--studies-per-step", "8", "--samples", "4", "--val-every", "12", "--val-studies", "32",
                          "--weight-studies", "200", "--lr-frac", "0.2", "--device", "cpu", "--seed", "0"]) == 0
    val = [float(r["val_reward"]) for r in rows(tmp / "rl" / "val.csv")]
    assert val[-1] > val[0] + 0.1, val
