"""The label cache beside a prepared dataset: parallel equals serial, written once, reused, keyed by rule set, and
never trusted once it or the reports change."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from echovlm import clinical, labels
from echovlm.clinical import extract_labels
from echovlm.dataset import SPLITS, open_dataset
from echovlm.echoprime import load_echoprime_rules
from echovlm.vocabulary import BINARY_TRAITS, TRAITS
from scripts import prepare_dataset

# EchoPrime-style phrase rules in the format of its per_section.json, with phrases of our own that occur in the
# synthetic reports
PHRASE_RULES = {
    "aortic_stenosis": {"mode": "binary", "label_sources": ["severe aortic stenosis"]},
    "pericardial_effusion": {"mode": "binary", "label_sources": ["large pericardial effusion"]},
    "ejection_fraction": {"mode": "regression", "label_sources": ["ejection fraction by simpson's biplane is <#>%"],
                          "range": [0, 100]},
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "data"
    assert prepare_dataset.main(["--source", "synthetic", "--n-studies", "300", "--seed", "0", "--val-size", "30",
                                 "--test-size", "30", "--embed-dim", "8", "--out", str(out)]) == 0
    return out


@pytest.fixture
def ds(pristine, tmp_path):
    """A fresh copy per test: the tests write caches into it and edit its files."""
    return open_dataset(shutil.copytree(pristine, tmp_path / "data"))


@pytest.fixture
def phrase_rules(tmp_path):
    path = tmp_path / "per_section.json"
    path.write_text(json.dumps(PHRASE_RULES))
    return load_echoprime_rules(path)


def all_reports(ds):
    return [text for split in SPLITS for text in ds.reports(split)]


@pytest.mark.parametrize("use_phrases", [False, True], ids=["ours", "phrase-rules"])
def test_parallel_equals_serial(ds, phrase_rules, use_phrases):
    rules = phrase_rules if use_phrases else None
    texts = all_reports(ds)
    serial = labels.label_matrix(texts, rules, workers=1)
    parallel = labels.label_matrix(texts, rules, workers=2)
    assert serial.shape == (300, len(TRAITS)) and serial.dtype == np.float32
    assert np.array_equal(serial, parallel, equal_nan=True)
    # row by row what extract_labels says, None as NaN
    for i in (0, 137, 299):
        want = [np.nan if v is None else v for v in extract_labels(texts[i], rules).values()]
        assert np.array_equal(serial[i], np.array(want, dtype=np.float32), equal_nan=True)
    binary = serial[:, :len(BINARY_TRAITS)]
    assert set(np.unique(binary[~np.isnan(binary)])) <= {0.0, 1.0}
    assert np.nansum(binary) > 0  # the synthetic reports do have findings these rules read


def test_label_matrix_edges():
    assert labels.label_matrix([], workers=2).shape == (0, len(TRAITS))
    with pytest.raises(ValueError, match="at least 1"):
        labels.label_matrix(["Left Ventricle: normal."], workers=0)


def test_cache_is_written_then_reused(ds, monkeypatch, capsys):
    first = labels.dataset_labels(ds, workers=2, progress=False)
    key = labels.rules_key()
    assert re.fullmatch(r"echovlm-[0-9a-f]{12}", key)
    # only the array and its sidecar: no temporary file is left visible
    assert sorted(p.name for p in (ds.path / "labels").iterdir()) == [f"{key}.json", f"{key}.npy"]
    meta = json.loads((ds.path / "labels" / f"{key}.json").read_text())
    assert meta["traits"] == list(TRAITS) and meta["n"] == 300 and meta["rules_key"] == key
    assert meta["reports_per_second"] > 0 and len(meta["reports"]["sha256"]) == 64
    assert "computed 300 studies" in capsys.readouterr().out
    assert np.array_equal(first, labels.label_matrix(all_reports(ds), workers=1), equal_nan=True)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(labels, "label_matrix", no_recompute)
    again = labels.dataset_labels(open_dataset(ds.path))
    assert np.array_equal(first, again, equal_nan=True)
    assert "loaded" in capsys.readouterr().out
    for split in SPLITS:
        a, b = ds._range[split]
        assert np.array_equal(labels.split_labels(ds, split), first[a:b], equal_nan=True)
    with pytest.raises(ValueError, match="unknown split"):
        labels.split_labels(ds, "training")


def test_cache_is_keyed_by_rules(ds, phrase_rules, tmp_path):
    ours = labels.dataset_labels(ds, workers=1, progress=False)
    theirs = labels.dataset_labels(ds, phrase_rules, workers=1, progress=False)
    key = labels.rules_key(phrase_rules)
    assert re.fullmatch(r"echoprime-[0-9a-f]{12}", key) and key != labels.rules_key()
    assert labels.rules_key(clinical.RULES) == labels.rules_key()
    assert {p.name for p in (ds.path / "labels").iterdir()} == {f"{labels.rules_key()}.npy", f"{labels.rules_key()}.json",
                                                                 f"{key}.npy", f"{key}.json"}
    assert not np.array_equal(ours, theirs, equal_nan=True)
    assert np.isnan(theirs[:, list(TRAITS).index("impella")]).all()  # a trait these rules do not define stays open
    # another phrase file is another rule set
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**PHRASE_RULES, "impella": {"mode": "binary", "label_sources": ["impella"]}}))
    assert labels.rules_key(load_echoprime_rules(edited)) != key
    with pytest.raises(TypeError, match="label_matrix"):
        labels.rules_key(clinical.Rules(clinical.FINDINGS, clinical.VALUES))


@pytest.mark.parametrize("damage", ["truncated array", "altered array", "garbage sidecar", "missing sidecar"])
def test_damaged_cache_is_recomputed(ds, capsys, damage):
    good = labels.dataset_labels(ds, workers=1, progress=False)
    key = labels.rules_key()
    array, sidecar = ds.path / "labels" / f"{key}.npy", ds.path / "labels" / f"{key}.json"
    if damage == "truncated array":
        array.write_bytes(array.read_bytes()[:1000])
    elif damage == "altered array":
        bad = good.copy()
        bad[0, 0] = 1 - bad[0, 0]
        np.save(array, bad)
    elif damage == "garbage sidecar":
        sidecar.write_text('{"rules_key": ')
    else:
        sidecar.unlink()
    capsys.readouterr()
    again = labels.dataset_labels(ds, workers=1, progress=False)
    assert np.array_equal(good, again, equal_nan=True)
    assert "recomputed because" in capsys.readouterr().out
    # and the repaired cache is used from then on
    labels.dataset_labels(ds, workers=1, progress=False)
    assert "loaded" in capsys.readouterr().out


def test_edited_reports_invalidate_the_cache(ds, capsys):
    before = labels.dataset_labels(ds, workers=1, progress=False)
    reports = ds.path / "reports.jsonl"
    # touched, not changed (a copy without -p): the content still matches, so the cache stands
    os.utime(reports, ns=(0, 0))
    capsys.readouterr()
    labels.dataset_labels(ds, workers=1, progress=False)
    assert "loaded" in capsys.readouterr().out
    # the same size, other content: caught by the sha256
    lines = reports.read_text(encoding="utf-8").splitlines(keepends=True)
    rec = json.loads(lines[0])
    rec["report"] = rec["report"].replace("e", "E", 1)
    lines[0] = json.dumps(rec, ensure_ascii=False) + "\n"
    reports.write_text("".join(lines), encoding="utf-8")
    os.utime(reports, ns=(0, 0))
    labels.dataset_labels(open_dataset(ds.path), workers=1, progress=False)
    assert "sha256 differs" in capsys.readouterr().out
    # a finding added to a report: recomputed, and the new label is there
    rec["report"] += "\nAortic Valve: Severe aortic stenosis."
    lines[0] = json.dumps(rec, ensure_ascii=False) + "\n"
    reports.write_text("".join(lines), encoding="utf-8")
    after = labels.dataset_labels(open_dataset(ds.path), workers=1, progress=False)
    assert "recomputed because reports.jsonl changed" in capsys.readouterr().out
    stenosis = list(TRAITS).index("aortic_stenosis")
    assert after[0, stenosis] == 1 and np.array_equal(before[1:], after[1:], equal_nan=True)


def test_read_only_dataset_still_gets_labels(ds, monkeypatch, capsys):
    for path in (ds.path, *ds.path.iterdir()):
        path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() == 0:  # root writes through permissions; fail the write the way a read-only mount would
        def read_only(*args, **kwargs):
            raise OSError(30, "Read-only file system")

        monkeypatch.setattr(labels, "atomic_write_bytes", read_only)
    try:
        got = labels.dataset_labels(ds, workers=1, progress=False)
    finally:
        ds.path.chmod(0o755)
    assert got.shape == (300, len(TRAITS))
    out = capsys.readouterr().out
    assert "not cached" in out and len(out.strip().splitlines()) == 1
    assert not (ds.path / "labels").exists()
