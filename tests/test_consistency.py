"""echovlm.consistency: every rule on hand-written reports, each case beside a close one that must not trip it."""

import time

import pytest

from echovlm.consistency import RULES, contradictions, count
from echovlm.synthetic import iter_chunks


def rules_of(report):
    return sorted(c.rule for c in contradictions(report))


# (rule, a report that trips it, a close report that does not)
CASES = [
    ("ef_vs_function", "Left Ventricle: Left ventricular systolic function is normal. LVEF 25%.",
     "Left Ventricle: Left ventricular systolic function is normal. LVEF 55%."),
    ("ef_vs_function", "Left Ventricle: Severely reduced left ventricular systolic function. "
                       "The ejection fraction is estimated at 55-60%.",
     "Left Ventricle: Severely reduced left ventricular systolic function. "
     "The ejection fraction is estimated at 20-25%."),
    ("ef_vs_function", "Left Ventricle: The left ventricle is normal in size with severely reduced systolic "
                       "function. LVEF 60%.",
     "Left Ventricle: The left ventricle is normal in size with severely reduced systolic function. LVEF 20%."),
    # rounding at a category's edge is no contradiction: mildly reduced at 45-50%
    ("ef_vs_function", "Left Ventricle: Mildly reduced left ventricular systolic function. LVEF 65%.",
     "Left Ventricle: Mildly reduced left ventricular systolic function. The ejection fraction is 45-50%."),
    ("ef_vs_function", "Left Ventricle: The left ventricle is hyperdynamic. LVEF 40%.",
     "Left Ventricle: The left ventricle is hyperdynamic. LVEF 75%."),
    # the RV's function is not the LV's
    ("ef_vs_function", "Left Ventricle: LVEF 25%. Left ventricular systolic function is normal.",
     "Left Ventricle: LVEF 25%.\nRight Ventricle: Right ventricular systolic function is normal."),
    ("present_and_absent", "Mitral Valve: No mitral regurgitation. There is moderate mitral regurgitation.",
     "Mitral Valve: No mitral stenosis. There is moderate mitral regurgitation."),
    ("present_and_absent", "Mitral Valve: Mild mitral regurgitation.\nTricuspid Valve: No mitral regurgitation.",
     "Mitral Valve: Mild mitral regurgitation.\nTricuspid Valve: No tricuspid regurgitation."),
    # a bare finding is the section's structure
    ("present_and_absent", "Aortic Valve: No stenosis. Moderate aortic stenosis.",
     "Aortic Valve: No regurgitation. Moderate aortic stenosis."),
    ("present_and_absent", "Left Atrium: The left atrium is normal in size. The left atrium is severely dilated.",
     "Left Atrium: The left atrium is normal in size.\nRight Atrium: The right atrium is severely dilated."),
    ("present_and_absent", "Pericardium: No pericardial effusion. There is a large, circumferential pericardial effusion.",
     "Pericardium: No pleural effusion. There is a large, circumferential pericardial effusion."),
    ("present_and_absent", "Right Ventricle: Right ventricular systolic function is normal. "
                           "Severely depressed right ventricular systolic function.",
     "Right Ventricle: Right ventricular systolic function is normal. "
     "Severely depressed left ventricular systolic function."),
    ("present_and_absent", "Aortic Valve: The aortic valve is bicuspid. Trileaflet aortic valve.",
     "Aortic Valve: The aortic valve is bicuspid. No aortic stenosis."),
    ("present_and_absent", "Right Ventricle: No pacemaker lead is seen.\nPostoperative Findings: Permanent pacemaker in place.",
     "Right Ventricle: A pacemaker lead is seen.\nPostoperative Findings: Permanent pacemaker in place."),
    # trace beside "no" is the same clinical statement; a hedge or an earlier study settles nothing
    ("present_and_absent", "Tricuspid Valve: No tricuspid regurgitation. Mild tricuspid regurgitation.",
     "Tricuspid Valve: No tricuspid regurgitation. Trace tricuspid regurgitation."),
    ("present_and_absent", "Pericardium: No pericardial effusion. Small pericardial effusion.",
     "Pericardium: No pericardial effusion. A small pericardial effusion cannot be excluded."),
    ("conflicting_severity", "Mitral Valve: Mild mitral regurgitation. Severe mitral regurgitation.",
     "Mitral Valve: Mild mitral regurgitation. Mild to moderate mitral regurgitation."),
    ("conflicting_severity", "Mitral Valve: Moderate mitral and tricuspid regurgitation.\n"
                             "Tricuspid Valve: Trace tricuspid regurgitation.",
     "Mitral Valve: Moderate mitral regurgitation.\nTricuspid Valve: Trace tricuspid regurgitation."),
    ("conflicting_severity", "Mitral Valve: No significant mitral regurgitation. Severe MR.",
     "Mitral Valve: No significant mitral regurgitation. Mild MR."),
    ("conflicting_severity", "Aortic Valve: Mild aortic stenosis. Severe aortic stenosis.",
     "Aortic Valve: Mild aortic stenosis. Severe aortic stenosis was present previously."),
    ("conflicting_severity", "Right Atrium: The right atrium is mildly dilated. Severely enlarged right atrium.",
     "Right Atrium: The right atrium is mildly dilated. Severely enlarged left atrium."),
    ("conflicting_values", "Left Ventricle: LVEF 60%. Ejection fraction by Simpson's biplane is 35%.",
     "Left Ventricle: LVEF 60%. Ejection fraction by Simpson's biplane is 57%."),
    ("conflicting_values", "Pulmonary Artery: PASP 30 mmHg. RVSP 70 mmHg.",
     "Pulmonary Artery: PASP 30 mmHg. RVSP 35 mmHg."),
    ("impossible_value", "Left Ventricle: LVEF 95%.", "Left Ventricle: LVEF 75%."),
    ("impossible_value", "Left Ventricle: LVEF 3%.", "Left Ventricle: LVEF 10%."),
    ("impossible_value", "Left Ventricle: The ejection fraction is 2.", "Left Ventricle: EF by method of discs 4 chamber."),
    ("impossible_value", "Pulmonary Artery: PASP -5 mmHg.", "Pulmonary Artery: PASP 25 mmHg."),
    ("impossible_value", "Pulmonary Artery: The estimated PA systolic pressure is 180 mmHg.",
     "Pulmonary Artery: The estimated PA systolic pressure is 80 mmHg."),
    # a number of another measurement next to the key is not the key's
    ("impossible_value", "Pulmonary Artery: PA systolic pressure 2 mmHg.",
     "Pulmonary Artery: PA systolic pressure could not be estimated; TR velocity 2 m/s."),
    ("repeated_section", "Left Ventricle: Normal size.\nLeft Ventricle: Normal size.",
     "Left Ventricle: Normal size.\nRight Ventricle: Normal size."),
    ("repeated_section", "Left Ventricle: Normal size. [SEP] left ventricle: Normal size.",
     "Left Ventricle: Normal size. [SEP] Left Atrium: Normal size."),
]


@pytest.mark.parametrize("rule, trips, close", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule_trips_on_one_report_and_not_on_the_close_one(rule, trips, close):
    assert rule in rules_of(trips), (trips, contradictions(trips))
    assert rules_of(close) == [], (close, contradictions(close))


# consistent reports in other styles than the synthetic generator's: several findings per sentence, hedges,
# comparisons with earlier studies, devices, numbers of other measurements beside the keys
CONSISTENT = [
    "Left Ventricle: The left ventricle is normal in size and function. LVEF: 60-65%. Normal diastolic function.",
    "Left Ventricle: Moderately dilated left ventricle with severe global hypokinesis. LVEF 20-25% by biplane. "
    "Grade II diastolic dysfunction.",
    "Mitral Valve: Mildly thickened leaflets. There is mild (1+) mitral regurgitation. No mitral stenosis.",
    "Aortic Valve: Trileaflet aortic valve with mild sclerosis but no stenosis. Trace aortic regurgitation.",
    "Tricuspid Valve: Trivial tricuspid regurgitation. RVSP 28 mmHg assuming RA pressure of 3 mmHg.",
    "Aorta: Normal aortic root. The ascending aorta is mildly dilated at 4.1 cm.",
    "Mitral Valve: Status post MitraClip with mild residual mitral regurgitation. Severe mitral regurgitation "
    "prior to the procedure.",
    "Left Ventricle: Left ventricular systolic function is mildly reduced, EF 45-50%. Mild inferior hypokinesis.",
    "Left Ventricle: Normal LV systolic function with an estimated EF of 55%. [SEP] Right Ventricle: Normal RV size "
    "and function. [SEP] Pericardium: No effusion.",
    "Right Atrium: Normal right atrial size. Pacemaker wire seen in the right atrium and right ventricle.",
]


@pytest.mark.parametrize("report", CONSISTENT)
def test_consistent_reports_in_other_styles_trip_nothing(report):
    assert contradictions(report) == []


def test_every_rule_has_hand_written_cases():
    assert {c[0] for c in CASES} == set(RULES)


def test_a_contradiction_names_its_sentences():
    (c,) = contradictions("Mitral Valve: No mitral regurgitation. The aortic valve is normal. Severe MR.")
    assert c.rule == "present_and_absent" and "mitral regurgitation" in c.detail
    assert c.sentences == ("no mitral regurgitation", "severe mr")


def test_rules_can_be_chosen_and_unknown_ones_are_refused():
    report = "Left Ventricle: LVEF 95%.\nLeft Ventricle: Normal."
    assert rules_of(report) == ["impossible_value", "repeated_section"]
    assert [c.rule for c in contradictions(report, rules=["repeated_section"])] == ["repeated_section"]
    with pytest.raises(ValueError, match="unknown consistency rules"):
        contradictions(report, rules=["no_such_rule"])
    with pytest.raises(TypeError):
        contradictions(None)


def test_count_gives_the_rate_per_thousand_reports():
    reports = ["Left Ventricle: LVEF 95%.", "Left Ventricle: LVEF 55%.", "Left Ventricle: a\nLeft Ventricle: b",
               "Left Ventricle: LVEF 3%. LVEF 95%."]
    c = count(reports)
    assert c["n_reports"] == 4 and c["reports_with_any"] == 3
    assert c["per_rule"]["impossible_value"] == 3 and c["per_rule"]["repeated_section"] == 1
    # the two impossible LVEFs are also 92 points apart
    assert c["contradictions"] == 5 and c["per_1000"] == 1250.0
    assert count([])["per_1000"] is None


def test_synthetic_reference_reports_are_consistent_and_checked_fast():
    reports = next(iter_chunks(300, seed=3, embed_dim=2)).reports
    t0 = time.process_time()  # CPU time: other processes on a shared machine do not make it fail
    c = count(reports)
    rate = len(reports) / max(time.process_time() - t0, 1e-9)
    # the generator writes one statement per finding, agreeing with its numbers: the floor is zero
    assert c["contradictions"] == 0, [(r, contradictions(r)) for r in reports if contradictions(r)][:3]
    # ~1,300 reports/s measured on one core of the dev machine; an RL reward calls it for every sample
    assert rate > 200, f"{rate:.0f} reports/s"
