"""scripts.generate_report on a tiny trained model (CPU, offline): a test-split study, a precomputed embedding,
and a folder of synthetic videos, with every kind of bad input ending in one clear line, never a traceback.

The EchoPrime encoder and view classifier are replaced on the video path by stand-ins that answer with a
known embedding (the real builders are tested in tests/test_video.py); only the missing / mismatched
weights tests use the real builders, which check the file before building anything.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echovlm import study_report, video
from echovlm.checkpoint import load_model
from echovlm.clinical import TRAITS, extract_labels
from echovlm.engine import Engine
from scripts import generate_report

SNAP_TARGET = 5  # the training study whose embedding the stand-in encoder returns
JSON_KEYS = {"report", "findings", "findings_prompt", "videos", "skipped", "conditioning", "snapped_to", "reference_report", "warnings",
             "provenance", "seconds"}


@pytest.fixture
def run(trained_run):
    return trained_run


def generate(run_dir, *args):
    # the test's flags last, so they override these defaults
    return generate_report.main(["--run", str(run_dir), "--max-tokens", "24", "--device", "cpu", *map(str, args)])


def error_of(run_dir, *args) -> str:
    """The one line a bad input ends in: on stderr, exit status 2, no traceback."""
    with pytest.raises(SystemExit) as e:
        generate(run_dir, *args)
    assert e.value.code == 2
    err = error_of.capsys.readouterr().err
    message = err.rstrip("\n").split("\n")[-1]  # after any progress bar's line
    assert message.startswith("generate_report: ") and "Traceback" not in err, err
    return message


@pytest.fixture(autouse=True)
def _stderr(capsys):
    error_of.capsys = capsys


@pytest.fixture
def captured_prefix(monkeypatch):
    """The study embeddings Engine.generate was called with."""
    seen = []
    original = Engine.generate

    def spy(self, embeddings, **kwargs):
        seen.extend(np.asarray(e) for e in embeddings)
        return original(self, embeddings, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    return seen


# ------------------------------------------------------------------------------------------------ --study
def test_study_writes_json_and_markdown_and_never_overwrites(run, tmp_path, capsys):
    run_dir, ds = run
    out = tmp_path / "report"
    assert generate(run_dir, "--study", 0, "--out", out) == 0
    result = json.loads((out / "report.json").read_text())
    assert set(result) == JSON_KEYS
    assert result["reference_report"] == ds.reports("test")[0]
    assert set(result["findings"]) == set(TRAITS) and result["findings"] == extract_labels(result["report"])
    prov = result["provenance"]
    assert prov["input"]["test_study"] == ds.studies("test")[0]
    assert Path(prov["dataset"]) == ds.path and prov["dataset_source"] == "synthetic"
    assert Path(prov["checkpoint"]).name == "best.pt" and prov["step"] == 2 and prov["model_config"]["depth"] == 1
    md = (out / "report.md").read_text()
    assert result["report"] in md and ds.reports("test")[0] in md and "| ejection_fraction |" in md
    assert (out / "report.txt").read_text() == result["report"] + "\n"
    printed = capsys.readouterr().out
    assert printed.startswith(result["report"] + "\n") and "ejection_fraction" in printed
    decided = next(line.split() for line in printed.splitlines() if line.strip().startswith("ejection_fraction")
                   and line.endswith("head"))
    assert decided[-2] == f"{result['findings_prompt'][-2]['used']:.1f}"  # the decided LVEF, as a report states it

    first = (out / "report.json").read_bytes()
    assert generate(run_dir, "--study", 1, "--out", out) == 0
    assert (out / "report.json").read_bytes() == first  # untouched: the second report went elsewhere
    again = json.loads((tmp_path / "report1" / "report.json").read_text())
    assert again["provenance"]["input"]["test_study"] == ds.studies("test")[1]
    assert str(tmp_path / "report1" / "report.json") in capsys.readouterr().out


def test_printed_report_has_one_section_per_line(run, monkeypatch, capsys):
    run_dir, _ = run
    tok = load_model(run[0], "cpu")[1]  # the tokenizer the model was trained with
    # what a model that dropped a newline (and doubled another) writes
    text = "Left Ventricle: Normal size. Right Ventricle: Normal size.\n\nAorta: The aortic root is normal."
    monkeypatch.setattr(Engine, "generate", lambda self, embeddings, **kw: [[tok.encode(text)]])
    assert generate(run_dir, "--study", 0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["Left Ventricle: Normal size.", "Right Ventricle: Normal size.",
                         "Aorta: The aortic root is normal.", ""]
    # a section name inside a sentence, without its colon, is not a header
    assert study_report.section_per_line("Aorta: Normal. The Left Ventricle is fine.") == \
        "Aorta: Normal. The Left Ventricle is fine."


def test_study_out_of_range(run):
    assert "out of range" in error_of(run[0], "--study", 20) and "20 studies" in error_of(run[0], "--study", -1)


def test_run_without_checkpoint(run, tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert "holds no best.pt or last.pt" in error_of(tmp_path / "empty_run", "--study", 0)


# ------------------------------------------------------------------------------------------------ --embedding
@pytest.mark.parametrize("shape", [(512,), (2, 512)])
def test_embedding_file(run, tmp_path, shape, captured_prefix):
    emb = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    assert generate(run[0], "--embedding", tmp_path / "e.npy", "--out", tmp_path / "out") == 0
    assert np.array_equal(captured_prefix[0], emb.reshape(-1, 512))
    result = json.loads((tmp_path / "out" / "report.json").read_text())
    assert result["reference_report"] is None and result["provenance"]["input"]["embedding_file"].endswith("e.npy")


@pytest.mark.parametrize("array, expected", [
    (np.zeros((3, 16)), "got shape (3, 16)"),
    (np.zeros((2, 2, 512)), "got shape (2, 2, 512)"),
    (np.zeros((0, 512)), "got shape (0, 512)"),
    (np.full(512, np.nan), "NaN"),
    (np.array(["a", "b"]), "numeric array"),
])
def test_bad_embedding_file(run, tmp_path, array, expected):
    np.save(tmp_path / "e.npy", array)
    assert expected in error_of(run[0], "--embedding", tmp_path / "e.npy")


def test_unreadable_embedding_file(run, tmp_path):
    (tmp_path / "e.npy").write_text("not numpy")
    assert "cannot read --embedding" in error_of(run[0], "--embedding", tmp_path / "e.npy")


# ------------------------------------------------------------------------------------------------ videos
@pytest.fixture
def study(tmp_path, make_video):
    """Three short clips, a one-frame video and a corrupt DICOM (both skipped), a text file (ignored)."""
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    make_video(folder / "a.avi", 12, 0)
    make_video(folder / "b.mp4", 40, 1)
    make_video(folder / "sub" / "c.mp4", 6, 2)
    make_video(folder / "still.mp4", 1, 3)
    (folder / "broken.dcm").write_bytes(b"\0" * 200)
    (folder / "notes.txt").write_text("not a video")
    return folder


class StandIn(torch.nn.Module):
    """Answers input i with row + (mean of input i) * tilt, and remembers its answers.

    Short videos are zero-padded clips, so their means differ and so do the answers: a study's videos do not
    all point the same way, and their normalised mean is shorter than 1 before it is normalised again.
    """

    def __init__(self, row, tilt):
        super().__init__()
        self.register_buffer("row", torch.as_tensor(row, dtype=torch.float32))
        self.register_buffer("tilt", torch.as_tensor(tilt, dtype=torch.float32))
        self.answers = []

    def forward(self, x):
        out = self.row + x.flatten(1).mean(1, keepdim=True) * self.tilt
        self.answers.append(out)
        return out


@pytest.fixture
def stand_ins(run, monkeypatch):
    """The encoder answers near 2x the mean embedding of training study SNAP_TARGET; every view is A4C."""
    emb, offsets = run[1].embedding_block("train")
    target = np.asarray(emb[offsets[SNAP_TARGET]:offsets[SNAP_TARGET + 1]], dtype=np.float32).mean(0)
    tilt = np.random.default_rng(1).standard_normal(512) * np.linalg.norm(target) / np.sqrt(512) * 0.3
    models = {"loaded": []}

    def encoder(path):
        models["loaded"].append(Path(path))
        models["encoder"] = StandIn(2 * target, tilt)
        return models["encoder"]

    def views(path):
        models["loaded"].append(Path(path))
        return StandIn(np.eye(11)[video.VIEW_CLASSES.index("A4C")], np.zeros(11))

    monkeypatch.setattr(video, "build_encoder", encoder)
    monkeypatch.setattr(video, "build_view_classifier", views)
    return models


@pytest.mark.parametrize("conditioning", ["snap", "direct"])
def test_video_study(run, tmp_path, study, stand_ins, conditioning, captured_prefix, capsys):
    run_dir, ds = run
    out = tmp_path / "out"
    assert generate(run_dir, study, "--conditioning", conditioning, "--echoprime-dir", tmp_path / "EchoPrime",
                    "--video-batch", 2, "--out", out, "--allow-synthetic-model") == 0
    weights = tmp_path / "EchoPrime" / "model_data" / "weights"
    assert stand_ins["loaded"] == [weights / "echo_prime_encoder.pt", weights / "view_classifier.pt"]
    answers = torch.cat(stand_ins["encoder"].answers).numpy()
    assert len(answers) == 3  # in batches of 2 and 1
    result = json.loads((out / "report.json").read_text())
    assert set(result) == JSON_KEYS and result["conditioning"] == conditioning
    assert [Path(v["file"]).name for v in result["videos"]] == ["a.avi", "b.mp4", "c.mp4"]
    assert all(v["view"] == "A4C" for v in result["videos"])
    assert [v["embedding_norm"] for v in result["videos"]] == pytest.approx(np.linalg.norm(answers, axis=1))
    skipped = {Path(s["file"]).name: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"broken.dcm", "still.mp4"}
    assert "not a readable DICOM" in skipped["broken.dcm"] and "not a video" in skipped["still.mp4"]
    prov = result["provenance"]
    assert prov["input"]["video_encoder"] == str((weights / "echo_prime_encoder.pt").resolve())
    assert [Path(f).name for f in prov["input"]["videos"]] == ["a.avi", "b.mp4", "c.mp4"]

    query = (answers / np.linalg.norm(answers, axis=1, keepdims=True)).mean(0)
    assert np.linalg.norm(query) < 0.999  # the videos disagree, so normalising the mean matters
    query /= np.linalg.norm(query)
    if conditioning == "snap":
        train = np.stack([e.mean(0) for e in ds.embeddings("train")])
        sims = train @ query / np.linalg.norm(train, axis=1)
        best = int(sims.argmax())
        assert result["snapped_to"]["train_study"] == ds.studies("train")[best]
        assert result["snapped_to"]["cosine"] == pytest.approx(sims[best], abs=1e-3)
        assert result["snapped_to"]["far"] is False and not any("FAR" in w for w in result["warnings"])
        assert np.array_equal(captured_prefix[0], ds.embeddings("train")[best])
    else:
        assert result["snapped_to"] is None
        assert np.allclose(captured_prefix[0], query[None], atol=1e-6)
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.dcm" in printed and "A4C" in printed and "c.mp4" in printed


def test_missing_or_mismatched_weights(run, tmp_path, study):
    message = error_of(run[0], study, "--echoprime-dir", tmp_path / "nowhere", "--allow-synthetic-model")
    assert "echo_prime_encoder.pt" in message and "EchoPrime" in message and "--echoprime-dir" in message
    weights = tmp_path / "EchoPrime" / "model_data" / "weights"
    weights.mkdir(parents=True)
    torch.save({"head.weight": torch.zeros(3)}, weights / "echo_prime_encoder.pt")
    message = error_of(run[0], study, "--echoprime-dir", tmp_path / "EchoPrime", "--allow-synthetic-model")
    assert "echo_prime_encoder.pt does not fit" in message


def test_study_without_videos(run, tmp_path, stand_ins, make_video):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no videos here")
    allow = "--allow-synthetic-model"
    assert "no DICOM/AVI/MP4 files found" in error_of(run[0], empty, allow)
    make_video(empty / "still.mp4", 1, 0)
    message = error_of(run[0], empty, allow)
    assert "no usable echo video" in message and "still.mp4" in message
    assert "no such file or folder" in error_of(run[0], tmp_path / "missing", allow)


# ------------------------------------------------------------------------------------------------ issue 13
def test_synthetic_model_refuses_videos_unless_allowed(run, tmp_path, study, stand_ins, capsys):
    message = error_of(run[0], study, "--echoprime-dir", tmp_path / "EchoPrime")
    assert "not trained on EchoPrime video embeddings" in message and "'synthetic'" in message
    assert "--allow-synthetic-model" in message
    assert stand_ins["loaded"] == []  # refused before any weights were read or video decoded
    out = tmp_path / "out"
    assert generate(run[0], study, "--echoprime-dir", tmp_path / "EchoPrime", "--allow-synthetic-model",
                    "--out", out) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["warnings"][0].startswith("NOT A REPORT ABOUT THESE VIDEOS")
    md = (out / "report.md").read_text().splitlines()
    assert md[0] == "# echovlm report" and "NOT A REPORT ABOUT THESE VIDEOS" in md[2]
    assert "WARNING: NOT A REPORT ABOUT THESE VIDEOS" in capsys.readouterr().out


def test_far_snap_says_so(run, tmp_path, study, stand_ins, monkeypatch, capsys):
    # an encoder answering a random direction: as far from the synthetic studies as a real echo is
    far = np.random.default_rng(3).standard_normal(512)
    monkeypatch.setattr(video, "build_encoder", lambda path: StandIn(far, np.zeros(512)))
    out = tmp_path / "out"
    assert generate(run[0], study, "--echoprime-dir", tmp_path / "EchoPrime", "--allow-synthetic-model",
                    "--out", out) == 0
    result = json.loads((out / "report.json").read_text())
    snapped = result["snapped_to"]
    assert snapped["far"] is True and snapped["cosine"] < snapped["far_threshold"]
    # the bar: the 1st percentile of the val studies' own nearest-training-study cosines
    ds = run[1]
    train = np.stack([e.mean(0) for e in ds.embeddings("train")])
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    val = np.stack([e.mean(0) for e in ds.embeddings("val")])
    val /= np.linalg.norm(val, axis=1, keepdims=True)
    assert snapped["far_threshold"] == pytest.approx(np.percentile((val @ train.T).max(1), 1), abs=1e-3)
    assert any(w.startswith("FAR FROM THE TRAINING DATA") for w in result["warnings"])
    assert "FAR FROM THE TRAINING DATA" in (out / "report.md").read_text()
    assert "WARNING: FAR FROM THE TRAINING DATA" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ issue 13 item 14
@pytest.mark.parametrize("flags, expected", [
    (["--max-tokens", "-5"], "--max-tokens must be >= 1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
])
def test_bad_generation_flags(run, flags, expected):
    assert expected in error_of(run[0], "--study", 0, *flags)


def test_embedding_with_too_many_rows(run, tmp_path):
    # as many rows as the sequence holds: no room for <|bos|> and a report (the message blamed max_tokens=None)
    config = load_model(run[0], "cpu")[0].config
    rows = config.sequence_len - config.n_prompt - 1
    np.save(tmp_path / "e.npy", np.ones((rows, 512), np.float32))
    message = error_of(run[0], "--embedding", tmp_path / "e.npy")
    assert f"{rows} embedding rows" in message and "None" not in message
    np.save(tmp_path / "e.npy", np.ones((1, 512), np.float32))
    message = error_of(run[0], "--embedding", tmp_path / "e.npy", "--max-tokens", "100000")
    assert "--max-tokens 100000 does not fit" in message


# ------------------------------------------------------------------------------------------------ --finding
def test_findings_set_by_the_user_replace_the_heads(run, tmp_path, capsys):
    out = tmp_path / "report"
    assert generate(run[0], "--study", 0, "--finding", "aortic_stenosis=1", "--finding", "ejection_fraction=35",
                    "--out", out) == 0
    rows = {r["trait"]: r for r in json.loads((out / "report.json").read_text())["findings_prompt"]}
    assert set(rows) == set(TRAITS)
    assert rows["aortic_stenosis"]["source"] == "user" and rows["aortic_stenosis"]["used"] == 1
    assert rows["ejection_fraction"]["source"] == "user" and rows["ejection_fraction"]["used"] == 35.0
    assert rows["mitral_stenosis"]["source"] == "head" and 0 <= rows["mitral_stenosis"]["probability"] <= 1
    assert "findings the report was written from" in capsys.readouterr().out
    assert "| aortic_stenosis |" in (out / "report.md").read_text()


@pytest.mark.parametrize("finding, expected", [
    ("aortic_stenoses=1", "unknown finding"),
    ("ejection_fraction=100", "out of range, expected 5 to 90"),
    ("ejection_fraction=4", "out of range"),
    ("aortic_stenosis=2", "0 (absent) or 1 (present)"),
    ("aortic_stenosis", "expected NAME=VALUE"),
    ("aortic_stenosis=yes", "not a number"),
])
def test_bad_findings_are_one_line_and_nothing_is_generated(run, finding, expected, captured_prefix):
    assert expected in error_of(run[0], "--study", 0, "--finding", finding)
    assert captured_prefix == []


def test_a_finding_given_twice_is_refused(run, captured_prefix):
    message = error_of(run[0], "--study", 0, "--finding", "pacemaker=1", "--finding", "pacemaker=0")
    assert "given twice" in message and captured_prefix == []


def test_a_finding_the_rules_never_settled_is_refused(run, monkeypatch, captured_prefix):
    real = load_model

    def without_pasp(*a, **kw):  # a head trained with rules that never state PASP
        model, tok, info = real(*a, **kw)
        info["findings"].usable[len(TRAITS) - 1] = False
        return model, tok, info

    monkeypatch.setattr(study_report, "load_model", without_pasp)
    message = error_of(run[0], "--study", 0, "--finding", "pulmonary_artery_pressure_continuous=40")
    assert "does not define it" in message and captured_prefix == []


def test_a_model_without_a_head_writes_a_free_report_and_refuses_findings(run, monkeypatch, capsys):
    real = load_model

    def headless(*a, **kw):  # what load_model gives for a checkpoint made before the findings head
        model, tok, info = real(*a, **kw)
        return model, tok, info | {"findings": None}

    monkeypatch.setattr(study_report, "load_model", headless)
    assert generate(run[0], "--study", 0) == 0
    assert "WARNING: this model has no findings head" in capsys.readouterr().out
    assert "retrained" in error_of(run[0], "--study", 0, "--finding", "pacemaker=1")


def test_consensus_at_temperature_0_records_the_temperature_it_sampled_at(run, tmp_path):
    # the samples of a consensus are drawn at 1.0 when 0 is asked (0 would make every sample the greedy report)
    assert generate(run[0], "--study", 0, "--decode", "consensus", "--temperature", "0", "--samples", "2",
                    "--out", tmp_path / "r") == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["provenance"]["generation"]["temperature"] == 1.0
