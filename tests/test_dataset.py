"""The prepared dataset format and scripts.prepare_dataset: round trip, memmaps, splits, re-runs, refusals."""

import json
import os
import re

import numpy as np
import pytest

from echovlm.dataset import (FILES, SPLITS, DatasetWriter, assign_splits, default_split_sizes, existing_status,
                             open_dataset)
from echovlm.synthetic import generate
from scripts.prepare_dataset import main as prepare_main

SYN = ["--source", "synthetic", "--n-studies", "300", "--embed-dim", "16", "--seed", "5"]


@pytest.fixture(scope="module")
def synthetic_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "syn"
    assert prepare_main(SYN + ["--videos-per-study", "2", "--out", str(out)]) == 0
    return open_dataset(out)


def test_synthetic_round_trip(synthetic_ds):
    ds = synthetic_ds
    truth = generate(300, seed=5, videos_per_study=2, embed_dim=16)
    index = {s: i for i, s in enumerate(truth.studies)}
    counts = ds.meta["counts"]
    assert sum(counts.values()) == 300 and 30 <= counts["val"] <= 34 and 30 <= counts["test"] <= 34
    assert ds.embed_dim == 16 and ds.meta["embed_dim"] == 16 and ds.meta["settings"]["videos_per_study"] == 2
    seen = []
    for split in SPLITS:
        studies, reports, embs = ds.studies(split), ds.reports(split), ds.embeddings(split)
        assert len(studies) == len(reports) == len(embs) == ds.meta["counts"][split]
        for study, report, e in zip(studies, reports, embs):
            i = index[study]
            assert report == truth.reports[i]
            assert e.dtype == np.float32 and e.shape == (2, 16)
            np.testing.assert_allclose(e, truth.embeddings[2 * i:2 * i + 2], atol=1e-3)  # float16 storage
        # source order is kept within a split
        assert [index[s] for s in studies] == sorted(index[s] for s in studies)
        seen += studies
    assert sorted(seen) == sorted(truth.studies)


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

    assert prepare_main(SYN + ["--signal", "0.9", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--force" in err and "settings" in err
    assert {f: os.stat(out / f).st_mtime_ns for f in FILES} == stamp

    assert prepare_main(SYN + ["--signal", "0.9", "--out", str(out), "--force"]) == 0
    assert open_dataset(out).meta["settings"]["signal"] == 0.9
    assert not (out / "tokenizer").exists()  # it belonged to the old data
    assert os.listdir(tmp_path) == ["syn"]  # no temporary or old directories left behind


def test_force_never_deletes_what_is_not_a_dataset(tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert prepare_main(SYN + ["--out", str(out), "--force"]) == 1
    assert "not a prepared dataset" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out) == ["notes.txt"]
    (out / "meta.json").write_text('{"version": 3}')  # somebody else's meta.json is not ours either
    assert prepare_main(SYN + ["--out", str(out), "--force"]) == 1
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
                                           ("inf", "'s3' has NaN or infinite"), ("duplicate", "'s4' occurs more than once"),
                                           ("empty report", "line 10: study 's9' has an empty report"),
                                           ("bad json", "line 3 is not valid JSON")])
def test_files_source_bad_input(tmp_path, capsys, kind, message):
    src = tmp_path / "src"
    src.mkdir()
    write_files(src)
    corrupt(src, kind)
    assert prepare_main(files_args(src, tmp_path / "out")) == 1
    assert re.search(message, capsys.readouterr().err)
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
