"""speedrun.sh end to end on the CPU path, made tiny by its environment variables.

One run is stopped after tok_train (as an interrupted run would be), then re-run: the data steps must be
skipped, the rest must run, and the report card must hold the numbers the steps wrote. A step that fails
must stop the run with its message and leave the finished steps alone. A resume keeps the run's settings.
Every variable is checked before the first step (fast: no Python runs). The end-to-end runs are slow.
"""

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["prepare_dataset", "tok_train", "tok_eval", "base_train", "test_inference", "generate_report"]


def speedrun(tmp: Path, **env) -> subprocess.CompletedProcess:
    base = {
        "ECHOVLM_PYTHON": sys.executable, "ECHOVLM_RUNS": str(tmp / "runs"), "ECHOVLM_DATA": str(tmp / "data"),
        "ECHOVLM_SOURCE": "synthetic", "NGPU": "0", "N_STUDIES": "400", "VOCAB_SIZE": "400", "DEPTH": "1",
        "NUM_STEPS": "6", "DEVICE_BATCH": "8", "TOTAL_BATCH": "16", "EVAL_STUDIES": "12", "EVAL_SAMPLES": "2",
        "OMP_NUM_THREADS": "1", "RL_STEPS": "0",  # the RL stage has its own tests (tests/test_rl.py)
    }
    full = {**os.environ, **base, **env}
    return subprocess.run(["bash", str(ROOT / "speedrun.sh")], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def check(proc: subprocess.CompletedProcess, rc: int = 0):
    assert proc.returncode == rc, proc.stdout[-4000:] + proc.stderr[-4000:]


def tokenizer_stats(run_dir: Path) -> dict:
    tok_dir = Path(json.loads((run_dir / "model" / "config.json").read_text())["tokenizer_dir"])
    return json.loads((tok_dir / "tok_stats.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speedrun")
    first = speedrun(tmp, ECHOVLM_STOP_AFTER="tok_train")
    check(first)
    run_dir = Path((tmp / "runs" / "LATEST").read_text().strip())
    done = sorted(p.stem for p in (run_dir / "steps").glob("*.done"))
    assert done == ["prepare_dataset", "tok_train"], done
    assert "stopping after tok_train" in first.stdout

    second = speedrun(tmp)
    check(second)
    return tmp, run_dir, first, second


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_redoing_finished_steps(run):
    tmp, run_dir, first, second = run
    assert f"resuming {run_dir}" in second.stdout
    for name in ("prepare_dataset", "tok_train"):
        assert f"step {name}: already done, skipping" in second.stdout
    for name in STEPS[2:]:
        assert f"step {name}: done in" in second.stdout
    with open(run_dir / "steps.tsv") as f:
        timed = [row[0] for row in csv.reader(f, delimiter="\t")]
    assert timed == STEPS  # each step ran exactly once across the two invocations
    assert sorted(p.stem for p in (run_dir / "steps").glob("*.done")) == sorted(STEPS)
    assert (run_dir / "source").read_text().strip() == "synthetic"


@pytest.mark.slow
def test_each_step_leaves_well_formed_outputs(run):
    _, run_dir, _, _ = run
    dataset = Path((run_dir / "dataset").read_text().strip())
    meta = json.loads((dataset / "meta.json").read_text())
    assert sum(meta["counts"].values()) == 400
    tok = tokenizer_stats(run_dir)
    assert 259 <= tok["vocab_size"] <= 400 and tok["settings"]["vocab_size"] == 400
    assert json.loads((run_dir / "tok_eval" / "tok_eval.json").read_text())["ours"]
    model = run_dir / "model"
    summary = json.loads((model / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["params"] > 0 and summary["best_val_bpb"] > 0
    for name in ("train.csv", "val.csv", "train.png", "val.png", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (model / name).is_file(), name
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["summary"]["core_metric"]) == {"model", "free", "head", "prior", "retrieval", "probe", "knn50"}
    assert metrics["summary"]["n_studies"] == 12 and metrics["summary"]["fidelity"]["findings"]["pairs"] > 0
    for name in ("metrics.csv", "metrics.md", "samples.md", "traits.png", "calibration.png", "language.json"):
        assert (run_dir / "eval" / name).is_file(), name
    report = json.loads((run_dir / "generate" / "report.json").read_text())
    assert report["report"].strip() and set(report["findings"]) and report["reference_report"]
    assert {r["source"] for r in report["findings_prompt"]} == {"head"}  # the run's head decided every finding


@pytest.mark.slow
def test_the_report_card_holds_the_numbers_the_steps_wrote(run):
    _, run_dir, _, _ = run
    card = (run_dir / "report.md").read_text()
    tok = tokenizer_stats(run_dir)
    summary = json.loads((run_dir / "model" / "train_summary.json").read_text())
    assert f"vocab {tok['vocab_size']:,}" in card
    assert f"{tok['bytes_per_token']:.2f} bytes/token" in card
    assert f"parameters: {summary['params']:,}" in card
    assert f"best {summary['best_val_bpb']:.4f}" in card and f"final {summary['final_val_bpb']:.4f}" in card
    assert (run_dir / "eval" / "metrics.md").read_text().strip() in card
    assert json.loads((run_dir / "generate" / "report.json").read_text())["report"] in card
    for png in ("model/train.png", "model/val.png", "eval/traits.png", "eval/calibration.png"):
        assert f"]({png})" in card
    with open(run_dir / "steps.tsv") as f:
        for name, seconds in csv.reader(f, delimiter="\t"):
            assert f"| {name} | {int(seconds):,} |" in card
    assert "synthetic" in card and "CPU run" in card


@pytest.mark.slow
def test_a_failing_step_stops_the_run_and_keeps_finished_steps(tmp_path):
    # a dataset too small to split into train/val/test: prepare_dataset refuses it
    proc = speedrun(tmp_path, N_STUDIES="2", ECHOVLM_STOP_AFTER="tok_train")
    assert proc.returncode != 0
    assert "step prepare_dataset FAILED" in proc.stdout
    run_dir = Path((tmp_path / "runs" / "LATEST").read_text().strip())
    assert not list((run_dir / "steps").glob("*.done"))
    # --fresh starts a new run directory; the failed one is kept
    again = speedrun(tmp_path, ECHOVLM_STOP_AFTER="prepare_dataset", ECHOVLM_FRESH="1")
    check(again)
    new_dir = Path((tmp_path / "runs" / "LATEST").read_text().strip())
    assert new_dir != run_dir and run_dir.is_dir() and (new_dir / "steps" / "prepare_dataset.done").is_file()


@pytest.mark.slow
def test_a_dataset_of_your_own_is_used_as_is(run, tmp_path):
    _, run_dir, _, _ = run
    mine = Path((run_dir / "dataset").read_text().strip())
    before = {p.name: p.stat().st_mtime_ns for p in mine.iterdir()}
    proc = speedrun(tmp_path, ECHOVLM_DATASET=str(mine), ECHOVLM_STOP_AFTER="tok_train", ECHOVLM_SOURCE="echoprime")
    check(proc)
    new_dir = Path((tmp_path / "runs" / "LATEST").read_text().strip())
    assert (new_dir / "source").read_text().strip() == "own"
    assert Path((new_dir / "dataset").read_text().strip()) == mine
    assert "PreparedDataset(" in proc.stdout and "up to date" in proc.stdout  # checked, tokenizer reused
    assert {p.name: p.stat().st_mtime_ns for p in mine.iterdir()} == before  # nothing rewritten
    # resumed without the env var: the run remembers its dataset
    again = speedrun(tmp_path, ECHOVLM_STOP_AFTER="tok_eval")
    check(again)
    assert "step tok_eval: done in" in again.stdout
    assert Path((new_dir / "dataset").read_text().strip()) == mine


@pytest.mark.parametrize("env, message", [
    ({"NUM_STEPS": "-1"}, "NUM_STEPS=-1: expected a whole number >= 1"), ({"NUM_STEPS": "0"}, "NUM_STEPS=0: expected"),
    ({"DEPTH": "abc"}, "DEPTH=abc: expected a whole number"), ({"NGPU": "abc"}, "NGPU=abc: expected a whole number"),
    ({"EPOCHS": "0"}, "EPOCHS=0: expected a number > 0"), ({"VOCAB_SIZE": "100"}, "VOCAB_SIZE=100: expected"),
    ({"ECHOVLM_SOURCE": "echopime"}, "ECHOVLM_SOURCE=echopime: expected auto, echoprime or synthetic"),
    ({"STUDY_DIR": "/nonexistent"}, "STUDY_DIR=/nonexistent does not exist"),
    ({"ECHOVLM_STOP_AFTER": "tok_trian"}, "ECHOVLM_STOP_AFTER=tok_trian: expected one of the steps"),
    ({"ECHOVLM_DATASET": "RAW"}, "holds raw input files, not a prepared dataset: prepare them first with python -m "
                                 "scripts.prepare_dataset --source files"),
    ({"ECHOVLM_DATASET": "EMPTY"}, "is not a prepared dataset (no meta.json)"),
])
def test_every_variable_is_checked_before_the_first_step(tmp_path, env, message):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "reports.jsonl").write_text('{"study": "a", "report": "x"}\n')
    (tmp_path / "empty").mkdir()
    env = {k: {"RAW": str(tmp_path / "raw"), "EMPTY": str(tmp_path / "empty")}.get(v, v) for k, v in env.items()}
    proc = speedrun(tmp_path, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("speedrun.sh: ") and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "runs").exists() and not proc.stdout  # nothing ran, nothing was made


@pytest.mark.slow
def test_a_resumed_run_keeps_its_settings_and_its_stop_point(tmp_path):
    runs = tmp_path / "it's runs"  # a quote in the path: passed to Python as an argument, never pasted into code
    first = speedrun(tmp_path, ECHOVLM_RUNS=str(runs), ECHOVLM_STOP_AFTER="prepare_dataset")
    check(first)
    run_dir = Path((runs / "LATEST").read_text().strip())
    assert run_dir.parent == runs and (run_dir / "steps" / "prepare_dataset.done").is_file()
    dataset = (run_dir / "dataset").read_text()

    # the step is done: the stop still applies, and nothing after it runs
    again = speedrun(tmp_path, ECHOVLM_RUNS=str(runs), ECHOVLM_STOP_AFTER="prepare_dataset")
    check(again)
    assert "step prepare_dataset: already done, skipping" in again.stdout
    assert "stopping after prepare_dataset" in again.stdout and "step tok_train" not in again.stdout

    # other settings on a resume: refused before anything runs, naming each
    other = speedrun(tmp_path, ECHOVLM_RUNS=str(runs), N_STUDIES="500", SEED="7", ECHOVLM_STOP_AFTER="tok_train")
    assert other.returncode == 2 and "step " not in other.stdout, other.stdout + other.stderr
    assert "N_STUDIES=500 (the run has 400); SEED=7 (the run has 0)" in other.stderr
    assert "--fresh" in other.stderr and other.stderr.count("\n") == 1
    assert (run_dir / "dataset").read_text() == dataset and not (run_dir / "steps" / "tok_train.done").exists()

    # left unset, a setting is the run's own
    unset = speedrun(tmp_path, ECHOVLM_RUNS=str(runs), N_STUDIES="", ECHOVLM_STOP_AFTER="prepare_dataset")
    check(unset)
    assert (run_dir / "dataset").read_text() == dataset


def stub_python(tmp: Path) -> Path:
    """An ECHOVLM_PYTHON that runs speedrun's own `-c` snippets (new_run_dir, the rules check) with this Python
    and, for everything else (every step, the report card), only writes the command to tmp/calls.log: the
    pipeline's plumbing in a second, without training anything."""
    stub = tmp / "python-stub"
    stub.write_text(f"""#!/usr/bin/env bash
if [[ "$1" == -c ]]; then exec {shlex.quote(sys.executable)} "$@"; fi
printf '%s\\n' "$*" >> {shlex.quote(str(tmp / "calls.log"))}
""")
    stub.chmod(0o755)
    return stub


def calls(tmp: Path) -> list[str]:
    return (tmp / "calls.log").read_text().splitlines()


@pytest.mark.parametrize("given, expected, unexpected", [
    # "00" is 0: no fine-tuning stage (compared as text, it ran rl_train --num-steps 00, which refuses it)
    ({"RL_STEPS": "00"}, ["scripts.test_inference --run RUN/model "], ["scripts.rl_train"]),
    pytest.param({"RL_STEPS": "007"}, ["scripts.rl_train --base RUN/model --run-dir RUN --run-name rl --seed 0 "
                                       "--num-steps 7"], [], marks=pytest.mark.slow),
    # the same seed and size name the same dataset, whatever zeros lead them
    pytest.param({"SEED": "007", "N_STUDIES": "0400"}, ["--n-studies 400 --seed 7 --out DATA/synthetic_n400_s7"], [],
                 marks=pytest.mark.slow),
    # 08 is not octal here: 8 GPUs, not a bash error that fell back to the CPU path
    pytest.param({"NGPU": "08"}, ["torch.distributed.run --standalone --nproc_per_node=8 -m scripts.base_train"], [],
                 marks=pytest.mark.slow),
])
def test_numbers_with_leading_zeros_are_numbers(tmp_path, given, expected, unexpected):
    env = {"ECHOVLM_PYTHON": str(stub_python(tmp_path)), "RL_STEPS": "", **given}
    proc = speedrun(tmp_path, **env)
    check(proc)
    run_dir = Path((tmp_path / "runs" / "LATEST").read_text().strip())
    log = "\n".join(calls(tmp_path)).replace(str(run_dir), "RUN").replace(str(tmp_path / "data"), "DATA")
    for text in expected:
        assert text in log, log
    for text in unexpected:
        assert text not in log, log
    settings = dict(line.split("\t") for line in (run_dir / "settings.tsv").read_text().splitlines())
    for name, value in given.items():
        if name in settings:
            assert settings[name] == str(int(value)), settings  # recorded as a number: a resume compares equal
    again = speedrun(tmp_path, **env)
    check(again)
    assert "already done" in again.stdout


RULES = {"ejection_fraction": {"mode": "regression", "label_sources": ["EF is <#>%"], "range": [0, 100]}}


def test_a_malformed_rules_file_is_refused_before_the_first_step(tmp_path):
    rules = tmp_path / "per_section.json"
    rules.write_text("{}")
    proc = speedrun(tmp_path, ECHOPRIME_RULES=str(rules))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"speedrun.sh: ECHOPRIME_RULES={rules}: ") and proc.stderr.count("\n") == 1
    assert "none of the traits echovlm scores" in proc.stderr
    assert not (tmp_path / "runs").exists() and not proc.stdout  # nothing ran, nothing was made


@pytest.mark.slow
def test_a_resume_checks_the_rules_file_the_run_recorded(tmp_path):
    rules = tmp_path / "per_section.json"
    rules.write_text(json.dumps(RULES))
    stub = str(stub_python(tmp_path))
    check(speedrun(tmp_path, ECHOVLM_PYTHON=stub, ECHOPRIME_RULES=str(rules), ECHOVLM_STOP_AFTER="prepare_dataset"))
    rules.write_text(json.dumps({"ejection_fraction": {**RULES["ejection_fraction"], "range": [float("nan"), 100]}}))
    proc = speedrun(tmp_path, ECHOVLM_PYTHON=stub)  # ECHOPRIME_RULES unset: the run's own, now damaged
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "speedrun.sh: ECHOPRIME_RULES=" in proc.stderr and "'range'" in proc.stderr
    assert "step tok_train" not in proc.stdout


def test_the_release_paths_speedrun_types_are_echoprimes():
    """speedrun.sh cannot import echovlm.echoprime, so its copies of the release layout are checked here."""
    from echovlm.echoprime import ENCODER_WEIGHTS, EXAMPLE_STUDY

    text = (ROOT / "speedrun.sh").read_text()
    for path in (EXAMPLE_STUDY, ENCODER_WEIGHTS):
        assert f'"$ECHOPRIME_DIR/{path.as_posix()}"' in text, path
