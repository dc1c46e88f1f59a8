"""The synthetic echo-study generator: deterministic, every scored trait well represented, reports that say
what the labels say, and embeddings that carry the clinical state (and only the state) in proportion to `signal`."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from echovlm import synthetic
from echovlm.vocabulary import BINARY_TRAITS, SECTIONS, TRAITS


def generate(n_studies, **kwargs):
    """All of iter_chunks' studies at once (prepare_dataset streams them; small test sets fit in memory)."""
    chunks = list(synthetic.iter_chunks(n_studies, **kwargs))
    joined = {k: [x for c in chunks for x in getattr(c, k)] for k in ("studies", "patients", "reports", "labels")}
    return SimpleNamespace(**joined, embeddings=np.concatenate([c.embeddings for c in chunks]),
                           offsets=np.cumsum([0] + [n for c in chunks for n in np.diff(c.offsets)]),
                           states={k: np.concatenate([c.states[k] for c in chunks]) for k in chunks[0].states})


@pytest.fixture(scope="module")
def studies():
    return generate(1000, seed=0)


def test_deterministic_and_independent_of_total():
    a, b = generate(1100, seed=3, embed_dim=64), generate(1100, seed=3, embed_dim=64)
    assert a.reports == b.reports and a.labels == b.labels and a.patients == b.patients
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    # study i is the same whatever the total (1100 crosses a chunk boundary)
    c = generate(1030, seed=3, embed_dim=64)
    assert c.reports == a.reports[:1030] and c.studies == a.studies[:1030]
    np.testing.assert_array_equal(c.embeddings, a.embeddings[:1030])
    assert generate(50, seed=4, embed_dim=64).reports != a.reports[:50]
    assert synthetic.study_and_patient_ids(1100, 3) == (a.studies, a.patients)


def test_every_scored_trait_has_enough_positives(studies):
    for trait in BINARY_TRAITS:
        positives = sum(lab[trait] for lab in studies.labels)
        assert 20 <= positives <= 500, f"{trait}: {positives} positives in 1,000 studies"
    ef = np.array([lab["ejection_fraction"] for lab in studies.labels])
    assert ef.min() < 30 and ef.max() > 60 and np.isfinite(ef).all()
    pasp = [lab["pulmonary_artery_pressure_continuous"] for lab in studies.labels]
    stated = np.array([p for p in pasp if p is not None])
    assert 0.7 * len(pasp) < len(stated) < len(pasp) and stated.max() > 50


def test_mild_grades_occur_so_the_evaluator_must_discriminate(studies):
    for finding in synthetic.GRADED:
        assert (studies.states[finding] == 1).sum() >= 20, finding
    text = "\n".join(studies.reports).lower()
    for word in ("mild", "trace", "mild to moderate", "moderate to severe", "small pericardial effusion"):
        assert word in text


def test_clinical_correlations(studies):
    s = studies.states
    low_ef = s["ef"] < 40
    assert s["hypokinesis"][low_ef].mean() > 3 * s["hypokinesis"][~low_ef].mean()
    assert (s["lv_dilation"][low_ef] >= 2).mean() > 3 * (s["lv_dilation"][~low_ef] >= 2).mean()
    high_pa = s["pasp"] > 45
    assert (s["rv_dilation"][high_pa] >= 2).mean() > 3 * (s["rv_dilation"][~high_pa] >= 2).mean()
    assert s["dilated_ivc"][high_pa].mean() > 2 * s["dilated_ivc"][~high_pa].mean()
    assert not (s["tavr"] & (s["aortic_stenosis"] > 0)).any()
    assert not (s["impella"] & (s["ef"] >= 35)).any()


def test_report_layout(studies):
    for report in studies.reports[:200]:
        lines = report.split("\n")
        assert [line.split(": ", 1)[0] for line in lines] == SECTIONS
        assert all(len(line.split(": ", 1)[1]) > 3 for line in lines)
    assert all(set(lab) == set(TRAITS) for lab in studies.labels)
    assert len(set(studies.reports)) == len(studies.reports)


# an evaluator written independently of the generator: section line, the words naming the finding, and
# "moderate"/"severe" (not "mild to moderate") in the same sentence
GRADED_WORDS = {
    "aortic_root_dilation": ("Aorta", "aortic root"), "left_atrium_dilation": ("Left Atrium", "left atrium"),
    "right_atrium_dilation": ("Right Atrium", "right atrium"),
    "right_ventricle_dilation": ("Right Ventricle", "right ventricle"),
    "aortic_stenosis": ("Aortic Valve", "aortic stenosis"), "mitral_stenosis": ("Mitral Valve", "mitral stenosis"),
    "tricuspid_stenosis": ("Tricuspid Valve", "tricuspid stenosis"),
    "aortic_regurgitation": ("Aortic Valve", "aortic regurgitation"),
    "mitral_regurgitation": ("Mitral Valve", "mitral regurgitation"),
    "tricuspid_valve_regurgitation": ("Tricuspid Valve", "tricuspid regurgitation"),
    "pulmonic_valve_regurgitation": ("Pulmonic Valve", "pulmonic regurgitation"),
    "mitral_annular_calcification": ("Mitral Valve", "mitral annular calcification"),
    "pericardial_effusion": ("Pericardium", "pericardial effusion"),
    "rv_systolic_function_depressed": ("Right Ventricle", "right ventricular systolic function"),
    "atrial_septum_hypertrophy": ("Atrial Septum", "lipomatous hypertrophy"),
}
PRESENCE_WORDS = {
    "pacemaker": r"pacemaker|pacer|\bICD\b", "impella": r"Impella", "tavr": r"TAVR|transcatheter aortic valve",
    "mitraclip": r"MitraClip", "bicuspid_aov_morphology": r"bicuspid", "dilated_ivc": r"(?i)IVC: [^.]*dilated",
    "elevated_left_atrial_pressure": r"elevated left atrial pressure", "wall_motion_hypokinesis": r"hypokine",
}


def read_graded(report: str, section: str, words: str) -> int:
    line = next(line for line in report.split("\n") if line.startswith(section + ": "))
    for sentence in re.split(r"(?<=\.) ", line.split(": ", 1)[1]):
        s = sentence.lower().replace("mild to moderate", "mild")
        if words in s and re.search(r"\b(moderate|moderately|severe|severely|large)\b", s):
            return 1
    return 0


def test_report_states_every_label(studies):
    for report, labels in zip(studies.reports, studies.labels):
        for trait, (section, words) in GRADED_WORDS.items():
            assert read_graded(report, section, words) == labels[trait], (trait, report)
        for trait, pattern in PRESENCE_WORDS.items():
            assert int(bool(re.search(pattern, report))) == labels[trait], (trait, report)
        lv = report.split("\n")[0]
        numbers = re.search(r"(?i)(?:LVEF|ejection fraction)\D*?(\d+)(?:-(\d+))? ?%", lv).groups()
        stated = np.mean([float(x) for x in numbers if x])
        assert stated == labels["ejection_fraction"]
        pa = re.search(r"(?:PA systolic pressure is|artery systolic pressure is|PASP) (\d+) mmHg", report)
        assert (float(pa.group(1)) if pa else None) == labels["pulmonary_artery_pressure_continuous"]


def test_labels_agree_with_the_clinical_evaluator(studies):
    clinical = pytest.importorskip("echovlm.clinical")
    disagree = {}
    for report, labels in zip(studies.reports[:300], studies.labels[:300]):
        read = clinical.extract_labels(report)
        for trait in TRAITS:
            if read[trait] != labels[trait]:
                disagree.setdefault(trait, []).append((read[trait], labels[trait], report))
    assert not disagree, {t: v[0] for t, v in disagree.items()}


def probe_r2(x, y, n_train):
    model = Ridge(alpha=1.0).fit(x[:n_train], y[:n_train])
    return model.score(x[n_train:], y[n_train:])


def test_embedding_carries_the_state_not_the_wording(studies):
    x, ef = studies.embeddings, studies.states["ef"]
    assert x.dtype == np.float32 and x.shape == (1000, 512)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert probe_r2(x, ef, 700) > 0.5
    # linear probes for 0/1 targets too (ridge scores ranked by AUROC: as good a probe, and fast)
    positives = np.array([lab["aortic_stenosis"] for lab in studies.labels])
    probe = Ridge(alpha=1.0).fit(x[:700], positives[:700])
    assert roc_auc_score(positives[700:], probe.predict(x[700:])) > 0.7
    # which of the four EF phrasings a report uses is drawn independently of the state: invisible in the embedding
    style = np.array([("LVEF" in r.split("\n")[0]) for r in studies.reports])
    probe = Ridge(alpha=1.0).fit(x[:700], style[:700])
    assert roc_auc_score(style[700:], probe.predict(x[700:])) < 0.62


def test_signal_zero_is_pure_noise():
    d = generate(1000, seed=0, signal=0.0, embed_dim=128)
    assert probe_r2(d.embeddings, d.states["ef"], 700) < 0.05
    strong = generate(1000, seed=0, signal=1.0, embed_dim=128)
    assert probe_r2(strong.embeddings, strong.states["ef"], 700) > 0.9
    assert strong.reports == d.reports  # signal changes the embeddings only


def test_several_videos_per_study():
    d = generate(40, seed=1, signal=0.6, videos_per_study=3, embed_dim=64)
    assert d.embeddings.shape == (120, 64)
    np.testing.assert_array_equal(d.offsets, np.arange(41) * 3)
    views = d.embeddings.reshape(40, 3, 64)
    assert not np.allclose(views[:, 0], views[:, 1])
    # views of one study are more alike than views of different studies
    same = np.einsum("nd,nd->n", views[:, 0], views[:, 1]).mean()
    other = np.einsum("nd,nd->n", views[:, 0], np.roll(views[:, 1], 1, axis=0)).mean()
    assert same > other + 0.05


@pytest.mark.parametrize("kwargs", [dict(n_studies=0), dict(n_studies=5, signal=1.5), dict(n_studies=5, videos_per_study=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        generate(**kwargs)
