"""The prepared dataset format and scripts.prepare_dataset: round trip, memmaps, splits, re-runs, refusals."""

import json
import os
import re

import numpy as np
import pytest

from echovlm.dataset import (FILES, SPLITS, DatasetWriter, assign_splits, default_split_sizes, existing_status,
                             open_dataset)
from echovlm.synthetic import iter_chunks
from scripts.prepare_dataset import main as prepare_main

SYN = ["--source", "synthetic", "--n-studies", "300", "--embed-dim", "16", "--seed", "5"]


def refused(capsys, argv, code=2) -> str:
    """prepare_dataset's one stderr line for argv, checking it stopped with `code` (2 bad input, 1 a failure)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare_main(argv)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "study/s]" not in x]  # not tqdm
    assert e.value.code == code and len(lines) == 1 and lines[0].startswith("prepare_dataset: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def synthetic_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "syn"
    assert prepare_main(SYN + ["--videos-per-study", "2", "--out", str(out)]) == 0
    return open_dataset(out)


def test_synthetic_round_trip(synthetic_ds):
    ds = synthetic_ds
    chunks = list(iter_chunks(300, seed=5, videos_per_study=2, embed_dim=16))  # what prepare_dataset streamed
    true_studies, true_reports = [x for c in chunks for x in c.studies], [x for c in chunks for x in c.reports]
    true_embeddings = np.concatenate([c.embeddings for c in chunks])
    index = {s: i for i, s in enumerate(true_studies)}
    counts = ds.meta["counts"]
    assert sum(counts.values()) == 300 and 30 <= counts["val"] <= 34 and 30 <= counts["test"] <= 34
    assert ds.embed_dim == 16 and ds.meta["embed_dim"] == 16 and ds.meta["settings"]["videos_per_study"] == 2
    seen = []
    for split in SPLITS:
        studies, reports, embs = ds.studies(split), ds.reports(split), ds.embeddings(split)
        assert len(studies) == len(reports) == len(embs) == ds.meta["counts"][split]
        for study, report, e in zip(studies, reports, embs):
            i = index[study]
            assert report == true_reports[i]
            assert e.dtype == np.float32 and e.shape == (2, 16)
            np.testing.assert_allclose(e, true_embeddings[2 * i:2 * i + 2], atol=1e-3)  # float16 storage
        # source order is kept within a split
        assert [index[s] for s in studies] == sorted(index[s] for s in studies)
        seen += studies
    assert sorted(seen) == sorted(true_studies)


def test_embedding_block_is_a_contiguous_memmap(synthetic_ds):
    whole = np.load(synthetic_ds.path / "embeddings.npy", mmap_mode="r")
    start = 0
    for split in SPLITS:
        block, offsets = synthetic_ds.embedding_block(split)
        assert isinstance(block, np.memmap) and block.dtype == np.float16
        n = len(synthetic_ds.studies(split))
        assert offsets.dtype == np.int64 and offsets.shape == (n + 1,) and offsets[0] == 0 and offsets[-1] == len(block)
        np.testing.assert_array_equal(block, whole[start:start + len(block)])
        per_study = synthetic_ds.embeddings(split)
        np.testing.assert_array_equal(per_study[3], block[offsets[3]:offsets[4]].astype(np.float32))
        start += len(block)
    assert start == len(whole)


def test_patient_level_split(synthetic_ds):
    owner = {}
    for split in SPLITS:
        for patient in synthetic_ds.patients(split):
            assert owner.setdefault(patient, split) == split, f"patient {patient} is in {owner[patient]} and {split}"
    assert len(owner) < 300  # some patients do have several studies, so the test means something


def test_assign_splits_sizes_and_determinism():
    patients = [f"P{i // 3}" for i in range(3000)]  # 1,000 patients with 3 studies each
    a = assign_splits(patients, seed=1, val_size=300, test_size=200)
    assert np.array_equal(a, assign_splits(patients, seed=1, val_size=300, test_size=200))
    assert not np.array_equal(a, assign_splits(patients, seed=2, val_size=300, test_size=200))
    assert 300 <= (a == 1).sum() < 303 and 200 <= (a == 2).sum() < 203
    for p in range(1000):
        assert len(set(a[3 * p:3 * p + 3])) == 1
    with pytest.raises(ValueError, match="leave any to train"):
        assign_splits(patients[:10], seed=0, val_size=5, test_size=5)
    assert default_split_sizes(20_000) == (2000, 2000)
    assert default_split_sizes(1_230_676) == (10_000, 10_000)
    assert default_split_sizes(5) == (1, 1)


def test_rerun_is_a_no_op_and_different_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "syn"
    assert prepare_main(SYN + ["--out", str(out)]) == 0
    (out / "tokenizer").mkdir()  # a later step's output inside the dataset
    stamp = {f: os.stat(out / f).st_mtime_ns for f in FILES}
    capsys.readouterr()
    assert prepare_main(SYN + ["--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {f: os.stat(out / f).st_mtime_ns for f in FILES} == stamp and (out / "tokenizer").is_dir()

    err = refused(capsys, SYN + ["--signal", "0.9", "--out", str(out)])
    assert "--force" in err and "settings" in err
    assert {f: os.stat(out / f).st_mtime_ns for f in FILES} == stamp
    assert sorted(os.listdir(tmp_path)) == ["syn"]  # no temporary or old directories left behind


def test_force_replaces_only_the_dataset_files_and_names_the_runs_trained_on_it(tmp_path, capsys):
    out, runs = tmp_path / "syn", tmp_path / "runs"
    assert prepare_main(SYN + ["--out", str(out)]) == 0
    (out / "tokenizer_v2000").mkdir()  # a later step's output, and models point at it
    (out / "tokenizer_v2000" / "tokenizer.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    for run, dataset in (("a", out), ("speedrun/model", out), ("b", tmp_path / "other")):
        (runs / run).mkdir(parents=True)
        (runs / run / "config.json").write_text(json.dumps({"dataset": str(dataset.resolve())}))
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text("{trunc")  # skipped, best effort
    capsys.readouterr()
    assert prepare_main(SYN + ["--signal", "0.9", "--out", str(out), "--force", "--runs", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert open_dataset(out).meta["settings"]["signal"] == 0.9
    assert sorted(os.listdir(out)) == sorted([*FILES, "notes.txt", "tokenizer_v2000"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "tokenizer_v2000" / "tokenizer.json").read_text() == "{}"
    line = next(x for x in printed.splitlines() if x.startswith("trained on the old version"))
    assert str(runs / "a") in line and str(runs / "speedrun" / "model") in line and str(runs / "b") not in line
    assert "kept in" in printed and "tokenizer_v2000" in printed
    assert sorted(os.listdir(tmp_path)) == ["runs", "syn"]  # no temporary or old directories left behind


def test_force_never_deletes_what_is_not_a_dataset(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "not a prepared dataset" in refused(capsys, SYN + ["--out", str(out), "--force"])
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out) == ["notes.txt"]
    (out / "meta.json").write_text('{"version": 3}')  # somebody else's meta.json is not ours either
    refused(capsys, SYN + ["--out", str(out), "--force"])
    assert sorted(os.listdir(out)) == ["meta.json", "notes.txt"]


def write_files(root, n=40, k=None, dim=6, patients=True, seed=0):
    rng = np.random.default_rng(seed)
    records = [{"study": f"s{i}", "report": f"Left Ventricle: study {i} text, EF ≥ {i}%.", **({"patient": f"p{i // 2}"} if patients else {})}
               for i in range(n)]
    (root / "reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    counts = np.ones(n, dtype=np.int64) if k is None else rng.integers(1, k + 1, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    emb = rng.standard_normal((offsets[-1], dim)).astype(np.float32)
    np.save(root / "embeddings.npy", emb)
    np.save(root / "offsets.npy", offsets)
    return records, emb, offsets


def files_args(root, out, offsets=False):
    args = ["--source", "files", "--reports", str(root / "reports.jsonl"), "--embeddings", str(root / "embeddings.npy"),
            "--out", str(out)]
    return args + (["--offsets", str(root / "offsets.npy")] if offsets else [])


def test_files_source_with_several_embeddings_per_study(tmp_path):
    records, emb, offsets = write_files(tmp_path, n=50, k=3)
    assert prepare_main(files_args(tmp_path, tmp_path / "out", offsets=True) + ["--val-size", "6", "--test-size", "4"]) == 0
    ds = open_dataset(tmp_path / "out")
    assert ds.meta["split"]["by"] == "patient" and ds.embed_dim == 6
    assert 6 <= ds.meta["counts"]["val"] <= 7 and 4 <= ds.meta["counts"]["test"] <= 5
    by_id = {r["study"]: i for i, r in enumerate(records)}
    for split in SPLITS:
        for study, report, e in zip(ds.studies(split), ds.reports(split), ds.embeddings(split)):
            i = by_id[study]
            assert report == records[i]["report"]
            np.testing.assert_allclose(e, emb[offsets[i]:offsets[i + 1]], atol=2e-3)


def test_files_source_without_patients_splits_by_study(tmp_path):
    write_files(tmp_path, n=30, patients=False)
    assert prepare_main(files_args(tmp_path, tmp_path / "out")) == 0
    ds = open_dataset(tmp_path / "out")
    assert ds.meta["split"]["by"] == "study" and ds.meta["counts"] == {"train": 24, "val": 3, "test": 3}


def corrupt(root, kind):
    lines = (root / "reports.jsonl").read_text().splitlines()
    if kind == "row count":
        np.save(root / "embeddings.npy", np.load(root / "embeddings.npy")[:-1])
    elif kind == "NaN":
        emb = np.load(root / "embeddings.npy")
        emb[7, 2] = np.nan
        np.save(root / "embeddings.npy", emb)
    elif kind == "inf":
        emb = np.load(root / "embeddings.npy")
        emb[3, 0] = np.inf
        np.save(root / "embeddings.npy", emb)
    elif kind == "duplicate":
        lines[5] = lines[5].replace('"s5"', '"s4"')
    elif kind == "empty report":
        lines[9] = json.dumps({"study": "s9", "report": "  ", "patient": "p4"})
    elif kind == "bad json":
        lines[2] = lines[2][:-3]
    (root / "reports.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("kind, message", [("row count", "39 rows but .* 40 reports"), ("NaN", "'s7' has NaN"),
                                           ("inf", "'s3' has NaN or infinite"), ("duplicate", "duplicate study id 's4'"),
                                           ("empty report", "line 10: study 's9' has an empty report"),
                                           ("bad json", "line 3 is not valid JSON")])
def test_files_source_bad_input(tmp_path, capsys, kind, message):
    src = tmp_path / "src"
    src.mkdir()
    write_files(src)
    corrupt(src, kind)
    assert re.search(message, refused(capsys, files_args(src, tmp_path / "out")))
    assert os.listdir(tmp_path) == ["src"]  # nothing half-written left behind


def test_open_dataset_errors(tmp_path, synthetic_ds):
    with pytest.raises(FileNotFoundError, match="prepare_dataset"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a prepared dataset"):
        open_dataset(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in FILES:
        if f != "offsets.npy":
            (broken / f).write_bytes((synthetic_ds.path / f).read_bytes())
    with pytest.raises(ValueError, match="incomplete, missing offsets.npy"):
        open_dataset(broken)
    np.save(broken / "offsets.npy", np.arange(5, dtype=np.int64))
    with pytest.raises(ValueError, match="inconsistent: offsets.npy"):
        open_dataset(broken)
    with pytest.raises(ValueError, match="unknown split"):
        synthetic_ds.studies("validation")


def test_writer_checks_what_it_is_given(tmp_path):
    out = tmp_path / "out"
    split = np.array([0, 0, 1, 2], dtype=np.int8)
    with pytest.raises(ValueError, match="do not match"):
        with DatasetWriter(out, ["a", "b", "c", "d"], ["a", "b", "c", "d"], split, [1, 2, 1, 1], 4) as w:
            w.put_embeddings(0, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="incomplete"):
        with DatasetWriter(out, ["a", "b", "c", "d"], ["a", "b", "c", "d"], split, [1, 1, 1, 1], 4) as w:
            w.put_embeddings(0, np.zeros((4, 4), np.float32))
            w.put_report("only one")
            w.finish({"source": "test"})
    with pytest.raises(ValueError, match="beyond float16"):
        with DatasetWriter(out, ["a", "b", "c", "d"], ["a", "b", "c", "d"], split, [1, 1, 1, 1], 4) as w:
            w.put_embeddings(0, np.full((4, 4), 1e6, np.float32))
    assert os.listdir(tmp_path) == []


def test_existing_status(tmp_path, synthetic_ds):
    recipe = {k: synthetic_ds.meta[k] for k in ("format_version", "source", "settings", "inputs", "split")}
    assert existing_status(tmp_path / "new", recipe, force=False) == "new"
    assert existing_status(synthetic_ds.path, recipe, force=False) == "same"
    changed = {**recipe, "split": {**recipe["split"], "seed": 99}}
    with pytest.raises(FileExistsError, match="differs in: split"):
        existing_status(synthetic_ds.path, changed, force=False)
    assert existing_status(synthetic_ds.path, changed, force=True) == "replace"


# ---------------------------------------------------------------------------------------------- bad inputs: one line, exit 2
def bad_files(root, kind):
    """A files-source input broken in one way; returns the extra flags it needs."""
    lines = (root / "reports.jsonl").read_text().splitlines()
    extra = []
    if kind == "empty npy":
        (root / "embeddings.npy").write_bytes(b"")
    elif kind == "npz named npy":
        emb = np.load(root / "embeddings.npy")
        with open(root / "embeddings.npy", "wb") as f:
            np.savez(f, emb=emb)
    elif kind == "empty offsets":
        (root / "offsets.npy").write_bytes(b"")
        extra = ["--offsets", str(root / "offsets.npy")]
    elif kind == "width 0":
        np.save(root / "embeddings.npy", np.zeros((40, 0), np.float32))
    elif kind == "report 123":
        lines[4] = json.dumps({"study": "s4", "report": 123, "patient": "p2"})
    if kind == "not utf-8":
        data = "\n".join(lines).encode() + b"\n"
        lines_b = data.split(b"\n")
        lines_b[6] = lines_b[6].replace(b"text", b"t\xe9xt")  # Latin-1, as a Windows export would write it
        (root / "reports.jsonl").write_bytes(b"\n".join(lines_b))
    else:
        (root / "reports.jsonl").write_text("\n".join(lines) + "\n")
    return extra


@pytest.mark.parametrize("kind, message", [
    ("empty npy", r"embeddings.npy is empty \(0 bytes\)"),
    ("npz named npy", r"embeddings.npy is an .npz archive"),
    ("empty offsets", r"offsets.npy is empty \(0 bytes\)"),
    ("width 0", r"embeddings.npy has shape \(40, 0\): embeddings of width 0"),
    ("report 123", r"reports.jsonl line 5: the \"report\" of study 's4' is 123 \(int\), not a string"),
    ("not utf-8", r"reports.jsonl line 7 is not UTF-8 text"),
])
def test_files_source_bad_input_is_one_line(tmp_path, capsys, kind, message):
    src = tmp_path / "src"
    src.mkdir()
    write_files(src)
    extra = bad_files(src, kind)
    assert re.search(message, refused(capsys, files_args(src, tmp_path / "out") + extra))
    assert os.listdir(tmp_path) == ["src"]


PHRASES = {"Left Ventricle": {"size": ["LV size is normal.", "LV is enlarged."]}, "Aorta": {"root": ["Root <numerical> cm."]}}


def make_release(root, n=20, studies=None, reports=None, legacy_pt=False):
    """A tiny EchoPrime-shaped release (our own phrases): what prepare_dataset --source echoprime reads."""
    import pandas as pd
    import torch

    cand = root / "model_data" / "candidates_data"
    cand.mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "assets" / "all_phr.json").write_text(json.dumps(PHRASES))
    studies = studies or [f"ST{i:03d}" for i in range(n)]
    pd.DataFrame({"Study": studies}).to_csv(cand / "candidate_studies.csv", index=False)
    reports = reports if reports is not None else [[(0, i % 2, 0.0), (1, 0, 3.0 + i)] for i in range(n)]
    pd.to_pickle(reports, cand / "candidate_reports.pkl")
    emb = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    for part, rows in (("p1", emb[: n // 2]), ("p2", emb[n // 2:])):
        torch.save(rows.clone(), cand / f"candidate_embeddings_{part}.pt", _use_new_zipfile_serialization=not legacy_pt)
    return cand


def release_args(root, out):
    return ["--source", "echoprime", "--echoprime-dir", str(root), "--out", str(out)]


def test_release_bad_input_is_one_line(tmp_path, capsys):
    rel = tmp_path / "EchoPrime"
    cand = make_release(rel, studies=[f"ST{i % 19:03d}" for i in range(20)])  # ST000 twice
    assert "duplicate study id 'ST000'" in refused(capsys, release_args(rel, tmp_path / "out"))
    (cand / "candidate_studies.csv").write_text("Study\n" + "".join(f"ST{i:03d}\n" for i in range(20)))
    import pandas as pd

    pd.to_pickle(list(range(20)), cand / "candidate_reports.pkl")  # a list of ints, not of triple lists
    err = refused(capsys, release_args(rel, tmp_path / "out"))
    assert "candidate_reports.pkl: report 0 is a int, not a sequence of (section, phrase, value) triples" in err
    assert sorted(os.listdir(tmp_path)) == ["EchoPrime"]


def test_release_legacy_pt_that_fails_to_load_is_one_line(tmp_path, capsys):
    rel = tmp_path / "EchoPrime"
    cand = make_release(rel, legacy_pt=True)
    assert prepare_main(release_args(rel, tmp_path / "ok")) == 0  # a sound legacy-format file loads
    p2 = cand / "candidate_embeddings_p2.pt"
    p2.write_bytes(p2.read_bytes()[:-20])
    err = refused(capsys, release_args(rel, tmp_path / "out"))
    assert "candidate_embeddings_p2.pt is a legacy-format torch file that cannot be loaded" in err
    assert "weights_only" not in err


def test_release_is_split_by_study_unless_patients_are_given(tmp_path, capsys):
    rel = tmp_path / "EchoPrime"
    make_release(rel, n=40)
    capsys.readouterr()
    assert prepare_main(release_args(rel, tmp_path / "by_study")) == 0
    assert "repeat studies of one patient may sit in two splits" in capsys.readouterr().out
    assert open_dataset(tmp_path / "by_study").meta["split"]["by"] == "study"

    csv = tmp_path / "patients.csv"
    csv.write_text("study_id,patient_id\n" + "".join(f"ST{i:03d},P{i // 4}\n" for i in range(40)))
    assert prepare_main(release_args(rel, tmp_path / "by_patient") + ["--patients", str(csv)]) == 0
    ds = open_dataset(tmp_path / "by_patient")
    assert ds.meta["split"]["by"] == "patient" and "patients.csv" in {f["file"] for f in ds.meta["inputs"]}
    owner = {}
    for split in SPLITS:
        for study, patient in zip(ds.studies(split), ds.patients(split)):
            assert patient == f"P{int(study[2:]) // 4}"
            assert owner.setdefault(patient, split) == split
    assert len(owner) == 10

    csv.write_text("study_id,patient_id\n" + "".join(f"ST{i:03d},P{i // 4}\n" for i in range(39)))
    assert "no patient for 1 of the 40 studies (the first: 'ST039')" in refused(
        capsys, release_args(rel, tmp_path / "x") + ["--patients", str(csv)])
    csv.write_text("study,patient\nST000,P0\n")
    assert "needs the columns study_id,patient_id" in refused(
        capsys, release_args(rel, tmp_path / "x") + ["--patients", str(csv)])


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_prepared_dataset_respects_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert prepare_main(SYN + ["--n-studies", "40", "--out", str(tmp_path / "d")]) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "d").st_mode & 0o777) == oct(0o777 & ~umask)
    for f in FILES:
        assert oct(os.stat(tmp_path / "d" / f).st_mode & 0o777) == oct(0o666 & ~umask), f


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "meta.json").write_text((d / "meta.json").read_text()[:40]), r"meta.json is not valid JSON"),
    (lambda d: (d / "embeddings.npy").write_bytes((d / "embeddings.npy").read_bytes()[:300]),
     r"embeddings.npy cannot be read as a .npy array"),
    (lambda d: (d / "offsets.npy").write_bytes((d / "offsets.npy").read_bytes()[:100]),
     r"offsets.npy cannot be read as a .npy array"),
])
def test_open_dataset_names_a_truncated_file(tmp_path, synthetic_ds, damage, message):
    d = tmp_path / "copy"
    d.mkdir()
    for f in FILES:
        (d / f).write_bytes((synthetic_ds.path / f).read_bytes())
    damage(d)
    with pytest.raises(ValueError, match=message):
        open_dataset(d)
