"""scripts.test_inference: its retrieval and label plumbing against the obvious computations, its outputs and
bad-input errors on a 2-step tiny model, and the whole pipeline (synthetic data -> tokenizer -> a briefly
trained tiny model -> evaluation) beating the prior."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from echovlm.baselines import fit_probe, from_neighbours
from echovlm.consistency import RULES
from echovlm.dataset import open_dataset
from echovlm import eval_outputs
from echovlm.eval_outputs import language_metrics
from echovlm.gpt import GPT, GPTConfig
from echovlm.report import build_card
from echovlm.retrieval import nearest_training_studies
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, TRAITS
from scripts import base_train, test_inference, tok_train
from scripts.prepare_dataset import main as prepare_main
from scripts.test_inference import from_reports


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    # 2 embeddings per study, so that means over a study's embeddings are exercised
    assert prepare_main(["--source", "synthetic", "--n-studies", "1200", "--seed", "0", "--videos-per-study", "2",
                         "--out", str(out)]) == 0
    return open_dataset(out)


def test_nearest_training_studies_is_brute_force_cosine(dataset):
    emb, offsets = dataset.embedding_block("train")
    train = np.add.reduceat(np.asarray(emb, dtype=np.float64), offsets[:-1], axis=0)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test = np.stack([e.mean(0) for e in dataset.embeddings("test")]).astype(np.float64)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    expected = np.argsort(-(test @ train.T), axis=1, kind="stable")[:, :7]
    query = torch.nn.functional.normalize(torch.from_numpy(test).float(), dim=1)
    # a chunk far smaller than the split, so that the running top-k is merged across many chunks
    got, cosines = nearest_training_studies(dataset, query, 7, torch.device("cpu"), chunk=97)
    assert got.shape == (len(test), 7)
    assert (got == expected).mean() > 0.99  # float32 vs float64 may swap a near-tie
    assert (got[:, 0] == expected[:, 0]).all()
    np.testing.assert_allclose(cosines[:, 0], (test @ train.T).max(1), rtol=1e-4)


def test_from_reports_scores_the_fraction_of_samples_stating_a_finding():
    neg = {t: 0 for t in BINARY_TRAITS} | {t: None for t in CONTINUOUS_TRAITS}
    pos = neg | {"pericardial_effusion": 1, "ejection_fraction": 35.0}
    system = from_reports([pos, neg], [[pos, neg, neg, pos], [neg, neg, neg, neg]])
    assert system["score"]["pericardial_effusion"].tolist() == [0.5, 0.0]
    assert system["predicted"]["pericardial_effusion"].tolist() == [1.0, 0.0]
    ef = system["predicted"]["ejection_fraction"]
    assert ef[0] == 35.0 and np.isnan(ef[1])
    assert from_reports([pos, neg], None)["score"] is None


def test_the_prior_is_the_model_given_to_another_study_and_rouge_l_is_rouge_scores():
    model = {"predicted": {"a": np.array([0.0, 1.0, 1.0]), "b": [5.0, np.nan, 7.0]}, "score": {"a": np.array([.1, .8, .6])}}
    prior = test_inference.permuted(model, np.array([2, 0, 1]))
    assert prior["predicted"]["a"].tolist() == [1.0, 0.0, 1.0] and prior["score"]["a"].tolist() == [.6, .1, .8]
    assert prior["predicted"]["b"][0] == 7.0 and np.isnan(prior["predicted"]["b"][2])
    assert test_inference.permuted({"predicted": {}, "score": None}, np.array([0]))["score"] is None

    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    refs = ["The LV is normal. EF 55-60%.", "No effusion.", "", "a b c d"]
    hyps = ["the lv is mildly dilated; EF 35%", "", "x", "d c b a b"]
    ours = language_metrics({"m": hyps}, refs)["m"]["rougeL_f"]
    theirs = np.mean([scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)])
    assert ours == round(float(theirs), 4) and 0 < ours < 1


def test_from_neighbours_averages_settled_labels_and_thresholds_at_the_training_prevalence():
    train = {t: np.zeros(5) for t in TRAITS}
    train["mitral_stenosis"] = np.array([1, 1, 0, np.nan, 1.0])
    train["ejection_fraction"] = np.array([50, np.nan, 60, 70, np.nan])
    neighbours = np.array([[0, 1, 2], [2, 3, 4], [1, 4, 1], [2, 2, 2]])
    prevalence = {t: 0.05 for t in BINARY_TRAITS} | {"mitral_stenosis": 0.6}
    system = from_neighbours(train, neighbours, prevalence)
    assert np.allclose(system["score"]["mitral_stenosis"], [2 / 3, 1 / 2, 1.0, 0.0])
    # a score above the prevalence is positive, not above one half
    assert system["predicted"]["mitral_stenosis"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert system["predicted"]["pericardial_effusion"].tolist() == [0.0, 0.0, 0.0, 0.0]
    ef = system["predicted"]["ejection_fraction"]
    assert ef[0] == 55 and ef[1] == 65 and np.isnan(ef[2])


def test_probe_thresholds_its_probability_at_the_prevalence_and_subsamples():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    train = {t: (x[:, 0] > 1.5).astype(float) for t in BINARY_TRAITS}  # ~7% positive, read from one feature
    train["ejection_fraction"] = 50 + 10 * x[:, 1]
    train["pulmonary_artery_pressure_continuous"] = np.full(400, np.nan)  # never stated: N/A, not a crash
    prevalence = {t: float(train[t].mean()) for t in BINARY_TRAITS}
    test = np.array([[3.0] + [0.0] * 7, [-3.0] + [0.0] * 7], dtype=np.float32)
    system, fitted = fit_probe(x, train, test, max_studies=300, seed=0, prevalence=prevalence)
    assert fitted == 300
    assert system["predicted"]["aortic_stenosis"].tolist() == [1.0, 0.0]
    assert 0.5 < system["score"]["aortic_stenosis"][0] <= 1.0
    assert np.isnan(system["predicted"]["pulmonary_artery_pressure_continuous"]).all()
    assert system["predicted"]["ejection_fraction"][0] == pytest.approx(50, abs=2)


@pytest.mark.slow
def test_briefly_trained_model_beats_the_prior(tmp_path):
    data = tmp_path / "data"
    assert prepare_main(["--source", "synthetic", "--n-studies", "3000", "--seed", "0", "--out", str(data)]) == 0
    assert tok_train.main(["--dataset", str(data), "--vocab-size", "500"]) == 0
    assert base_train.main(["--dataset", str(data), "--depth", "2", "--num-steps", "150", "--device", "cpu",
                            "--dtype", "fp32", "--run-dir", str(tmp_path / "runs"), "--run-name", "model",
                            "--eval-every", "150", "--eval-studies", "64"]) == 0
    run = tmp_path / "runs" / "model"
    # 1 draft (then 3) where a prompted report is wrong: a 150-step model's reports mostly are, and each draft
    # round is a report per study more to write and assemble
    args = ["--run", str(run), "--max-studies", "96", "--samples", "2", "--drafts", "1", "--bootstrap", "50",
            "--device", "cpu"]
    assert test_inference.main(args) == 0
    assert test_inference.main(args) == 0  # a second evaluation goes to eval1, never over the first

    out = run / "eval"
    for name in ("metrics.csv", "metrics.json", "metrics.md", "traits.png", "samples.md", "language.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (run / "eval1" / "metrics.json").is_file()
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["n_studies"] == 96 and summary["samples_k"] == 2
    core = summary["core_metric"]
    assert core["model"] > core["prior"] + 0.05, core
    assert core["free"] > core["prior"] + 0.05, core  # the GPT alone reads the embeddings too
    table = pd.read_csv(out / "metrics.csv")
    assert set(table.system) == {"model", "free", "head", "prior", "retrieval", "probe", "knn50"}
    assert (out / "calibration.png").is_file() and 0 <= summary["calibration"]["ece"] < 0.2
    assert set(table.trait) == set(TRAITS)
    language = json.loads((out / "language.json").read_text())
    assert 0 < language["model"]["bleu4"] <= 100


# ------------------------------------------------------------------ a 2-step tiny model: outputs and errors

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    data = tmp / "data"
    assert prepare_main(["--source", "synthetic", "--n-studies", "300", "--seed", "0", "--val-size", "20",
                         "--test-size", "20", "--out", str(data)]) == 0
    assert tok_train.main(["--dataset", str(data), "--vocab-size", "300"]) == 0
    assert base_train.main(["--dataset", str(data), "--run-dir", str(tmp / "runs"), "--run-name", "model",
                            "--depth", "1", "--num-steps", "2", "--total-batch-size", "4", "--device-batch-size", "4",
                            "--eval-every", "2", "--eval-studies", "4", "--device", "cpu", "--seed", "0"]) == 0
    return tmp / "runs" / "model"


def evaluate(run, *args):
    return test_inference.main(["--run", str(run), "--max-studies", "6", "--samples", "1", "--bootstrap", "10",
                                "--max-tokens", "24", "--device", "cpu", *map(str, args)])


@pytest.mark.slow
def test_knn_baseline_is_named_by_its_k_and_contradictions_are_counted(tiny_run, tmp_path):
    out = tmp_path / "eval"
    assert evaluate(tiny_run, "--knn", 7, "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    assert summary["knn"] == 7 and summary["knn_system"] == "knn7"
    systems = {"model", "free", "head", "prior", "retrieval", "probe", "knn7"}
    assert set(summary["core_metric"]) == systems
    assert set(pd.read_csv(out / "metrics.csv").system) == systems
    md = (out / "metrics.md").read_text()
    assert "knn7 AUROC" in md and "knn50" not in md and "probe hard" in md
    # fidelity of the prompted reports is measured over every prompted (study, finding) pair
    fid = summary["fidelity"]
    assert fid["findings"]["pairs"] == 6 * len(BINARY_TRAITS) and 0 <= fid["findings"]["agree"] <= 1
    assert fid["ejection_fraction"]["reports"] == 6 and "stated as prompted" in md
    # contradictions per 1,000 for the generating sources, with per-rule counts that add up to the rate
    rates, counts = summary["contradictions_per_1000"], summary["contradictions"]
    assert set(rates) == set(counts) == {"model", "free", "prior", "retrieval", "reference"}
    for source, c in counts.items():
        assert c["n_reports"] == 6 and set(c["per_rule"]) == set(RULES)
        assert rates[source] == pytest.approx(1000 * sum(c["per_rule"].values()) / 6, abs=0.01)
    assert rates["reference"] == 0.0  # the synthetic references agree with themselves
    assert counts["prior"] == counts["model"]  # the prior's reports are the model's, given to other studies
    assert "| per 1,000 reports |" in md and all(f"| {rule} |" in md for rule in RULES)
    # the report card shows the headline with the kNN by its real name and the reference's rate as the floor
    card_run = tmp_path / "card"
    assert "metrics.json missing" in build_card(card_run)
    (card_run / "eval").mkdir(parents=True)
    (card_run / "eval" / "metrics.json").write_text((out / "metrics.json").read_text())
    row = next(line for line in build_card(card_run).splitlines() if line.startswith("| model |"))
    assert "(knn7)" in row and row.endswith("| 0.0 |"), row
    # and the precision the model trained in, beside its speed
    (card_run / "model").mkdir()
    (card_run / "model" / "train_summary.json").write_text(json.dumps({"params": 10, "tokens_per_sec": 5.0}))
    (card_run / "model" / "config.json").write_text(json.dumps({"args": {"flags": {"dtype": "bf16"}}}))
    assert "- throughput: 5 real tokens/s in bf16, MFU n/a" in build_card(card_run)


@pytest.mark.slow
def test_base_of_other_data_is_refused_and_a_model_without_a_head_writes_free_reports(tiny_run, trained_run,
                                                                                      tmp_path, capsys):
    # trained_run is the same recipe on a dataset at another path: scoring it as --base would score other studies
    err = error_of(capsys, tiny_run, "--base", trained_run[0], "--out", tmp_path / "refused")
    assert "trained on other data" in err and "dataset" in err
    assert not (tmp_path / "refused").exists()
    data = Path(json.loads((tiny_run / "config.json").read_text())["dataset"])
    assert base_train.main(["--dataset", str(data), "--run-dir", str(tmp_path), "--run-name", "old", "--depth", "1",
                            "--num-steps", "2", "--total-batch-size", "4", "--device-batch-size", "4",
                            "--eval-every", "2", "--eval-studies", "4", "--device", "cpu", "--no-findings"]) == 0
    assert evaluate(tmp_path / "old", "--out", tmp_path / "eval") == 0
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]
    assert set(summary["core_metric"]) == {"model", "prior", "retrieval", "probe", "knn50"}
    assert summary["findings_head"] is False and summary["fidelity"] is None


class Payload:  # any class: weights_only refuses it before anything of it runs
    pass


def error_of(capsys, run, *args, code=2) -> str:
    """The one line a bad input ends in: on stderr, the exit status given, no traceback."""
    with pytest.raises(SystemExit) as e:
        evaluate(run, *args)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("test_inference: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_flags_are_one_line(tmp_path, capsys):
    # flags are checked before the model is loaded: no run is needed
    run = tmp_path / "run"
    assert "--knn must be >= 1" in error_of(capsys, run, "--knn", 0)
    assert "--samples must be >= 0" in error_of(capsys, run, "--samples", -1)
    assert "--temperature must be a finite number" in error_of(capsys, run, "--temperature", "nan")
    assert "--max-tokens must be >= 1" in error_of(capsys, run, "--max-tokens", -5)
    assert "--echoprime-rules" in error_of(capsys, run, "--echoprime-rules", tmp_path / "nowhere.json")
    # a rules file that labels nothing is refused before any model is loaded or report generated (issue 17 item 6)
    (tmp_path / "empty.json").write_text("{}")
    assert "--echoprime-rules" in error_of(capsys, run, "--echoprime-rules", tmp_path / "empty.json")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "cannot be created" in error_of(capsys, run, "--out", blocker / "eval")


def test_missing_hostile_and_truncated_checkpoints_are_one_line(tmp_path, capsys):
    assert "neither a checkpoint file nor a run directory" in error_of(capsys, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "holds no best.pt or last.pt" in error_of(capsys, tmp_path / "empty")
    model = GPT(GPTConfig(depth=1, vocab_size=32, embed_dim=8, sequence_len=16))
    ckpt = {"format_version": 1, "model": model.state_dict(), "config": asdict(model.config), "meta": {}}
    torch.save(ckpt, tmp_path / "good.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    assert "not a readable echovlm checkpoint" in error_of(capsys, tmp_path / "truncated.pt")
    torch.save({"format_version": 1, "model": Payload()}, tmp_path / "hostile.pt")
    err = error_of(capsys, tmp_path / "hostile.pt")
    assert "refused unread" in err and "weights_only" not in err and "Re-running" not in err
    torch.save(ckpt | {"model": {k: v[..., :1] for k, v in ckpt["model"].items()}}, tmp_path / "edited.pt")
    assert "do not match" in error_of(capsys, tmp_path / "edited.pt")


@pytest.mark.slow
def test_a_dataset_gone_is_exit_2_and_a_failed_write_is_exit_1(tiny_run, tmp_path, capsys, monkeypatch):
    assert "cannot be read" in error_of(capsys, tiny_run, "--dataset", tmp_path / "nowhere")

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eval_outputs, "atomic_write_bytes", disk_full)  # where the evaluation's files are written
    monkeypatch.setattr(eval_outputs, "atomic_write_text", lambda path, text: disk_full(path, text))
    err = error_of(capsys, tiny_run, "--out", tmp_path / "eval", code=1)
    assert "writing the evaluation failed" in err and "No space left" in err
