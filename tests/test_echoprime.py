"""The EchoPrime release reader, on small fixtures in the release's exact layout (our own phrases and numbers)."""

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from echovlm import echoprime
from echovlm.dataset import open_dataset
from echovlm.echoprime import EchoPrimeError, EchoPrimeRelease, UnsafePickleError, decode_report, load_pickle
from scripts.prepare_dataset import main as prepare_main

PHRASES = {
    "Left Ventricle": {"size": ["LV cavity size is normal.", "LV cavity is enlarged."],
                       "function": ["LVEF about <numerical>%.", "Systolic function is <string>."]},
    "Right Ventricle": {"size": ["RV looks normal."]},
    "Aortic Valve": {"leaflets": ["Three thin cusps."], "doppler": ["Peak jet <numerical> m/s, mean <numerical> mmHg."]},
    "Pericardium": {"fluid": ["No fluid around the heart.", "A <string> rim of fluid."]},
}
REPORTS = [
    [(0, 0, 0.0), (0, 2, 55.0), (2, 0, 0.0), (2, 1, 3.5)],
    [(3, 1, "thin"), (0, 1, 0.0), (0, 3, "poor")],  # sections in the order the triples give
    [(1, 0, 0.0), (0, 2, 40.0), (1, 0, 0.0)],  # a section that comes back forms a second line
]
EXPECTED = [
    "Left Ventricle: LV cavity size is normal. LVEF about 55.0%.\n"
    "Aortic Valve: Three thin cusps. Peak jet 3.5 m/s, mean 3.5 mmHg.",
    "Pericardium: A thin rim of fluid.\nLeft Ventricle: LV cavity is enlarged. Systolic function is poor.",
    "Right Ventricle: RV looks normal.\nLeft Ventricle: LVEF about 40.0%.\nRight Ventricle: RV looks normal.",
]


def make_release(root, reports=REPORTS, studies=None, pickled=list, rows=None, dim=8, seed=0):
    """An EchoPrime-shaped directory: assets/all_phr.json and model_data/candidates_data/*."""
    cand = root / "model_data" / "candidates_data"
    cand.mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "assets" / "all_phr.json").write_text(json.dumps(PHRASES))
    studies = studies if studies is not None else [f"ST{i:03d}" for i in range(len(reports))]
    pd.DataFrame({"Study": studies}).to_csv(cand / "candidate_studies.csv", index=False)
    pd.to_pickle(pickled(reports), cand / "candidate_reports.pkl")
    n = rows if rows is not None else len(reports)
    emb = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * 3
    torch.save(emb[: n // 2].clone(), cand / "candidate_embeddings_p1.pt")
    torch.save(emb[n // 2:].clone(), cand / "candidate_embeddings_p2.pt")
    return emb


def test_decode_exact_text(tmp_path):
    make_release(tmp_path)
    release = EchoPrimeRelease(tmp_path)
    assert release.sections == list(PHRASES)
    assert list(release.iter_reports()) == EXPECTED
    assert release.studies == ["ST000", "ST001", "ST002"] and release.embed_dim == 8


@pytest.mark.parametrize("pickled", [pd.Series, lambda r: pd.DataFrame({"report": r}),
                                     lambda r: [np.array([t[:2] + (float(t[2]),) for t in rep]) for rep in r]])
def test_series_dataframe_and_arrays_decode_the_same(tmp_path, pickled):
    numeric = [[t for t in rep if not isinstance(t[2], str)] for rep in REPORTS]
    make_release(tmp_path, reports=numeric, pickled=pickled)
    plain = [decode_report(rep, list(PHRASES), [sum(g.values(), []) for g in PHRASES.values()]) for rep in numeric]
    assert list(EchoPrimeRelease(tmp_path).iter_reports()) == plain


def test_numpy_scalar_values_print_like_floats():
    phrases = [sum(g.values(), []) for g in PHRASES.values()]
    text = decode_report([(np.int64(0), np.int64(2), np.float64(62.0))], list(PHRASES), phrases)
    assert text == "Left Ventricle: LVEF about 62.0%."


def test_embeddings_are_concatenated_and_l2_normalised(tmp_path):
    emb = make_release(tmp_path, reports=REPORTS * 3, rows=9)
    blocks = list(EchoPrimeRelease(tmp_path).iter_embeddings(block=2))
    got = np.concatenate(blocks)
    np.testing.assert_allclose(got, (emb / emb.norm(dim=1, keepdim=True)).numpy(), rtol=1e-6, atol=1e-7)


def test_count_mismatches_name_the_files(tmp_path):
    make_release(tmp_path / "a", rows=4)
    with pytest.raises(EchoPrimeError, match="candidate_studies.csv"):
        EchoPrimeRelease(tmp_path / "a")
    make_release(tmp_path / "b", studies=["S1", "S2", "S3", "S4"], rows=4)
    release = EchoPrimeRelease(tmp_path / "b")
    with pytest.raises(EchoPrimeError, match="3 reports but .*candidate_studies.csv lists 4"):
        release.reports_raw
    make_release(tmp_path / "c")
    torch.save(torch.zeros(2, 5), tmp_path / "c" / "model_data" / "candidates_data" / "candidate_embeddings_p2.pt")
    with pytest.raises(EchoPrimeError, match="disagree on width"):
        EchoPrimeRelease(tmp_path / "c")


def test_missing_file_says_which_and_where_from(tmp_path):
    make_release(tmp_path)
    os.unlink(tmp_path / "model_data" / "candidates_data" / "candidate_embeddings_p2.pt")
    with pytest.raises(FileNotFoundError, match="candidate_embeddings_p2.pt.*fetch_echoprime"):
        EchoPrimeRelease(tmp_path)


@pytest.mark.parametrize("triple, message", [((0, 4, 1.0), "phrase index of section 'Left Ventricle' 4 is not an index below 4"),
                                             ((0, -1, 1.0), "phrase index .* -1 is not"),
                                             ((4, 0, 1.0), "section index 4 is not an index below 4"),
                                             ((1.5, 0, 1.0), "section index 1.5"), (("x", 0, 1.0), "section index 'x'"),
                                             ((0, 1), r"expected \(section, phrase, value\) triples")])
def test_bad_triples_are_reported(tmp_path, triple, message):
    make_release(tmp_path, reports=[[(0, 0, 1.0)], [(0, 1, 1.0), triple]])
    with pytest.raises(EchoPrimeError, match="report 1: " + message):
        list(EchoPrimeRelease(tmp_path).iter_reports())


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.target}",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "a class of the pickler's own", "builtins.bytearray"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    Exploit.target = tmp_path / "pwned"
    path = tmp_path / "candidate_reports.pkl"
    if payload == "os.system":
        obj = [[(0, 0, 1.0)], Exploit()]
        name = f"{os.system.__module__}.system"  # posix.system on Linux
    elif payload == "builtins.eval":
        obj = EvalExploit()
        name = "builtins.eval"
    elif payload == "builtins.bytearray":  # bytearray(20e9) would fill 20 GB; the format has no bytes at all
        obj = [[(0, 0, 1.0)], Allocates(bytearray, (20 * 10 ** 9,))]
        name = "builtins.bytearray"
    else:
        obj = [Harmless()]
        name = f"{__name__}.Harmless"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(UnsafePickleError, match=name.replace(".", r"\.")):
        load_pickle(path)
    assert not Exploit.target.exists()


class EvalExploit:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class Harmless:
    pass


class Allocates:
    """Unpickles as call(*args): a few bytes of pickle that ask for as much memory as args say."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.skipif(echoprime.resource is None or echoprime._data_segment() is None, reason="Linux only (RLIMIT_DATA)")
def test_pickle_that_asks_for_gigabytes_is_refused_without_allocating(tmp_path):
    # numpy's _reconstruct is allowed (every pickled array needs it), but here with a 3 GiB shape
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    path = tmp_path / "candidate_reports.pkl"
    limit = echoprime.resource.getrlimit(echoprime.resource.RLIMIT_DATA)
    path.write_bytes(pickle.dumps([[(0, 0, 1.0)], Allocates(reconstruct, (np.ndarray, (3 << 30,), b"b"))]))
    assert path.stat().st_size < 1000
    with pytest.raises(EchoPrimeError, match="GiB of memory"):
        load_pickle(path)
    # the cap is lifted afterwards, and a real reports file is still read
    assert echoprime.resource.getrlimit(echoprime.resource.RLIMIT_DATA) == limit
    path.write_bytes(pickle.dumps([[(0, 0, 1.0)] * 25] * 1000))
    assert len(load_pickle(path)) == 1000


def test_damaged_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "candidate_reports.pkl"
    path.write_bytes(pickle.dumps([[(0, 0, 1.0)]])[:-5])
    with pytest.raises(EchoPrimeError, match="damaged"):
        load_pickle(path)


def test_prepare_from_the_release(tmp_path, capsys):
    reports = [REPORTS[i % 3] for i in range(30)]
    emb = make_release(tmp_path / "EchoPrime", reports=reports)
    out = tmp_path / "data" / "echoprime"
    assert prepare_main(["--source", "echoprime", "--echoprime-dir", str(tmp_path / "EchoPrime"), "--out", str(out)]) == 0
    ds = open_dataset(out)
    assert ds.meta["source"] == "echoprime" and ds.meta["split"]["by"] == "study"
    assert {f["file"] for f in ds.meta["inputs"]} == {"all_phr.json", "candidate_studies.csv", "candidate_reports.pkl",
                                                      "candidate_embeddings_p1.pt", "candidate_embeddings_p2.pt"}
    assert ds.meta["counts"] == {"train": 24, "val": 3, "test": 3}
    normed = (emb / emb.norm(dim=1, keepdim=True)).numpy()
    for split in ("train", "val", "test"):
        for study, report, e in zip(ds.studies(split), ds.reports(split), ds.embeddings(split)):
            i = int(study[2:])
            assert report == EXPECTED[i % 3]
            np.testing.assert_allclose(e[0], normed[i], atol=1e-3)
    # the same release again: nothing to do
    assert prepare_main(["--source", "echoprime", "--echoprime-dir", str(tmp_path / "EchoPrime"), "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_prepare_refuses_a_malicious_release(tmp_path, capsys):
    make_release(tmp_path / "EchoPrime")
    Exploit.target = tmp_path / "pwned"
    pkl = tmp_path / "EchoPrime" / "model_data" / "candidates_data" / "candidate_reports.pkl"
    pkl.write_bytes(pickle.dumps([[(0, 0, 1.0)], Exploit(), [(0, 0, 1.0)]]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:  # bad input: one line on stderr, exit 2
        prepare_main(["--source", "echoprime", "--echoprime-dir", str(tmp_path / "EchoPrime"), "--out", str(out)])
    assert stop.value.code == 2 and "refusing" in capsys.readouterr().err
    assert not Exploit.target.exists() and not out.exists() and os.listdir(tmp_path) == ["EchoPrime"]


def test_allow_list_is_data_only():
    modules = {m for m, _ in echoprime.ALLOWED_GLOBALS}
    assert modules <= {"builtins", "collections"} | {m for m in modules if m.split(".")[0] in ("numpy", "pandas")}
    names = {n for _, n in echoprime.ALLOWED_GLOBALS}
    assert not names & {"eval", "exec", "getattr", "system", "__import__", "open", "compile", "apply"}


# ------------------------------------------------------------------ the phrase rules file: refused unless usable

EF_RULE = {"mode": "regression", "label_sources": ["EF <#>%"]}


@pytest.mark.parametrize("text, message", [
    ("{}", "none of the traits echovlm scores"),
    (json.dumps({"not_a_trait": {"mode": "binary", "label_sources": ["x"]}}), "none of the traits echovlm scores"),
    # json reads NaN and Infinity, and a bool is an int to Python: each made every LVEF None (or 1..100)
    ('{"ejection_fraction": {"mode": "regression", "label_sources": ["EF <#>%"], "range": [NaN, 100]}}', "range"),
    ('{"ejection_fraction": {"mode": "regression", "label_sources": ["EF <#>%"], "range": [0, Infinity]}}', "range"),
    (json.dumps({"ejection_fraction": {**EF_RULE, "range": [True, 100]}}), "range"),
    (json.dumps({"ejection_fraction": {**EF_RULE, "range": ["0", "100"]}}), "range"),
    # nothing before <#>: "the first number anywhere in the report" is no rule
    (json.dumps({"ejection_fraction": {"mode": "regression", "label_sources": [" <#>%"]}}), "text before"),
])
def test_unusable_rules_are_refused_with_one_line(tmp_path, text, message):
    path = tmp_path / "per_section.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        echoprime.load_echoprime_rules(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_rules_with_one_usable_trait_and_unknown_ones_are_accepted(tmp_path):
    path = tmp_path / "per_section.json"
    path.write_text(json.dumps({"ejection_fraction": {**EF_RULE, "range": [0, 100.0]},
                                "not_a_trait": {"mode": "binary", "label_sources": ["x"]}}))
    rules = echoprime.load_echoprime_rules(path)
    assert list(rules.regression) == ["ejection_fraction"] and rules.ignored == ["not_a_trait"]
