"""Clinical labels: a hand-written table of report sentences (our own wording) with the labels they should
give, EchoPrime-style phrase rules on a fixture of our own, and the scoring helpers."""

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from echovlm.clinical import extract_labels
from echovlm.sentences import sentences
from echovlm.echoprime import load_echoprime_rules
from echovlm.scoring import _weighted_auroc, binary_auroc, label_arrays, regression_metrics, score_traits
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, TRAITS

EF, PASP = "ejection_fraction", "pulmonary_artery_pressure_continuous"

# (report text, the traits it states: binary traits not listed must be 0, continuous ones not listed None)
CASES = [
    # pacemaker
    ("A pacemaker lead is seen in the right ventricle.", {"pacemaker": 1}),
    ("Pacer wire noted in the right atrium.", {"pacemaker": 1}),
    ("An ICD lead traverses the tricuspid valve.", {"pacemaker": 1}),
    ("Moderate tricuspid regurgitation related to the pacer lead.",
     {"pacemaker": 1, "tricuspid_valve_regurgitation": 1}),
    ("Right Atrium: A device wire is present.", {"pacemaker": 1}),
    ("Right Ventricle: A lead is seen in the apex.", {"pacemaker": 1}),
    ("No pacemaker or ICD leads are seen.", {}),
    ("There is no pacer wire.", {}),
    ("A pacemaker lead is not seen.", {}),
    ("Severe tricuspid regurgitation can lead to right atrial enlargement.", {"tricuspid_valve_regurgitation": 1}),
    # impella
    ("An Impella catheter is seen in the left ventricle.", {"impella": 1}),
    ("Left Ventricle: Impella device in good position.", {"impella": 1}),
    ("No Impella is seen.", {}),
    ("The Impella has been removed.", {}),
    # tavr
    ("A bioprosthetic stent-valve sits in the aortic position.", {"tavr": 1}),
    ("Status post TAVR with a well-seated valve.", {"tavr": 1}),
    ("Transcatheter aortic valve implantation (TAVI) is noted.", {"tavr": 1}),
    ("There is a bioprosthetic aortic valve.", {"tavr": 1}),
    ("Aortic Valve: Bioprosthesis with normal gradients.", {"tavr": 1}),
    ("Aortic valve replacement with a stent valve.", {"tavr": 1}),
    ("Mitral Valve: A bioprosthetic valve is present.", {}),
    ("Mechanical aortic valve prosthesis is present.", {}),
    ("No TAVR.", {}),
    # mitraclip
    ("Two MitraClips join the anterior and posterior mitral leaflets.", {"mitraclip": 1}),
    ("One MitraClip is present with mild residual regurgitation.", {"mitraclip": 1}),
    ("Mitral Valve: Two clips are seen on the leaflets.", {"mitraclip": 1}),
    ("Status post mitral clip repair.", {"mitraclip": 1}),
    ("No MitraClip is seen.", {}),
    # aortic root
    ("Moderate aortic root dilation is present.", {"aortic_root_dilation": 1}),
    ("The aortic root is severely dilated.", {"aortic_root_dilation": 1}),
    ("Mildly dilated aortic root.", {}),
    ("Aorta: The root is moderately enlarged.", {"aortic_root_dilation": 1}),
    ("Aorta: Moderately dilated ascending aorta.", {}),
    ("The sinuses of Valsalva are moderately dilated.", {"aortic_root_dilation": 1}),
    ("Normal aortic root size, no dilation.", {}),
    ("Severe dilatation of the aortic root.", {"aortic_root_dilation": 1}),
    # left atrium
    ("The left atrium is moderately dilated.", {"left_atrium_dilation": 1}),
    ("Severely dilated left atrial cavity.", {"left_atrium_dilation": 1}),
    ("Moderate left atrial enlargement.", {"left_atrium_dilation": 1}),
    ("Left Atrium: Moderately enlarged.", {"left_atrium_dilation": 1}),
    ("The left atrium is mildly dilated.", {}),
    ("Left atrial size is normal.", {}),
    ("Mild to moderate left atrial enlargement.", {}),
    ("Mild-moderate left atrial enlargement.", {}),
    ("The left atrium is at least moderately dilated.", {"left_atrium_dilation": 1}),
    ("Biatrial enlargement, severe.", {"left_atrium_dilation": 1, "right_atrium_dilation": 1}),
    ("Left Atrium: Normal in size; the right atrium is moderately dilated.", {"right_atrium_dilation": 1}),
    ("Left atrial volume index is 45 ml/m2, consistent with moderate dilation.", {"left_atrium_dilation": 1}),
    ("The left atrium is not dilated.", {}),
    # right atrium
    ("The right atrium is severely enlarged.", {"right_atrium_dilation": 1}),
    ("Right Atrium: Moderately dilated.", {"right_atrium_dilation": 1}),
    ("Mildly dilated right atrial cavity.", {}),
    ("Moderate-to-severe right atrial enlargement.", {"right_atrium_dilation": 1}),
    # right ventricle
    ("The right ventricle is moderately dilated.", {"right_ventricle_dilation": 1}),
    ("Right Ventricle: Severely enlarged with moderately reduced systolic function.",
     {"right_ventricle_dilation": 1, "rv_systolic_function_depressed": 1}),
    ("Mild right ventricular enlargement.", {}),
    ("Moderate RV dilation.", {"right_ventricle_dilation": 1}),
    ("RV size is normal.", {}),
    # aortic stenosis
    ("There is moderate aortic stenosis.", {"aortic_stenosis": 1}),
    ("Severe stenosis of the aortic valve.", {"aortic_stenosis": 1}),
    ("Critical aortic stenosis.", {"aortic_stenosis": 1}),
    ("Mild aortic stenosis is present.", {}),
    ("Aortic Valve: Moderate stenosis.", {"aortic_stenosis": 1}),
    ("Aortic Valve: Trileaflet, severely calcified, with mild stenosis.", {}),
    ("The aortic valve is severely stenotic.", {"aortic_stenosis": 1}),
    ("No aortic stenosis is seen.", {}),
    ("Aortic stenosis is severe, with a mean gradient of 45 mmHg.", {"aortic_stenosis": 1}),
    ("Very severe calcific aortic stenosis.", {"aortic_stenosis": 1}),
    ("Moderately severe aortic stenosis.", {"aortic_stenosis": 1}),
    ("Aortic Valve: Tricuspid aortic valve with moderate stenosis.", {"aortic_stenosis": 1}),
    ("Aortic sclerosis without stenosis.", {}),
    ("Low-flow, low-gradient severe aortic stenosis.", {"aortic_stenosis": 1}),
    ("No change in the severe aortic stenosis.", {"aortic_stenosis": 1}),
    ("Severely calcified aortic valve with moderate stenosis.", {"aortic_stenosis": 1}),
    # mitral stenosis
    ("Moderate mitral stenosis is seen.", {"mitral_stenosis": 1}),
    ("Mitral Valve: Severe stenosis with a mean gradient of 12 mmHg.", {"mitral_stenosis": 1}),
    ("Mild mitral valve stenosis.", {}),
    ("Rheumatic mitral valve with moderate to severe stenosis.", {"mitral_stenosis": 1}),
    ("There is no mitral stenosis.", {}),
    ("There is moderate mitral regurgitation with mild aortic stenosis.", {"mitral_regurgitation": 1}),
    # tricuspid stenosis
    ("Moderate tricuspid stenosis is present.", {"tricuspid_stenosis": 1}),
    ("Tricuspid Valve: Severe stenosis.", {"tricuspid_stenosis": 1}),
    ("Mild tricuspid valve stenosis.", {}),
    # aortic regurgitation
    ("Moderate aortic regurgitation is present.", {"aortic_regurgitation": 1}),
    ("Severe aortic insufficiency.", {"aortic_regurgitation": 1}),
    ("Aortic Valve: Moderate to severe regurgitation.", {"aortic_regurgitation": 1}),
    ("Only trace aortic regurgitation.", {}),
    ("Mild to moderate aortic regurgitation is seen.", {}),
    ("Moderate AR.", {"aortic_regurgitation": 1}),
    ("Aortic regurgitation is moderate.", {"aortic_regurgitation": 1}),
    ("There is no aortic regurgitation.", {}),
    ("No aortic stenosis, moderate aortic regurgitation.", {"aortic_regurgitation": 1}),
    # mitral regurgitation
    ("Moderate mitral regurgitation is seen.", {"mitral_regurgitation": 1}),
    ("Mitral valve regurgitation, severe.", {"mitral_regurgitation": 1}),
    ("Mitral Valve: Moderate regurgitation directed toward the left atrium.", {"mitral_regurgitation": 1}),
    ("Mild mitral regurgitation is seen.", {}),
    ("Moderate (3+) mitral regurgitation.", {"mitral_regurgitation": 1}),
    ("Moderate mitral and tricuspid regurgitation.", {"mitral_regurgitation": 1, "tricuspid_valve_regurgitation": 1}),
    ("Mild mitral regurgitation and moderate tricuspid regurgitation.", {"tricuspid_valve_regurgitation": 1}),
    ("Mitral regurgitation, moderate.", {"mitral_regurgitation": 1}),
    ("At least moderate mitral regurgitation.", {"mitral_regurgitation": 1}),
    ("Moderate to severe MR.", {"mitral_regurgitation": 1}),
    ("There is mild aortic stenosis and moderate mitral regurgitation.", {"mitral_regurgitation": 1}),
    ("No significant mitral regurgitation.", {}),
    ("Without evidence of moderate or severe mitral regurgitation.", {}),
    ("Mitral insufficiency is severe.", {"mitral_regurgitation": 1}),
    ("Minimal mitral regurgitation.", {}),
    # tricuspid regurgitation
    ("Moderate tricuspid regurgitation is seen.", {"tricuspid_valve_regurgitation": 1}),
    ("Severe regurgitation of the tricuspid valve.", {"tricuspid_valve_regurgitation": 1}),
    ("Tricuspid Valve: Moderate regurgitation with the jet aimed at the right atrium.",
     {"tricuspid_valve_regurgitation": 1}),
    ("Trivial tricuspid regurgitation.", {}),
    ("Torrential tricuspid regurgitation.", {"tricuspid_valve_regurgitation": 1}),
    ("Tricuspid insufficiency, moderate to severe.", {"tricuspid_valve_regurgitation": 1}),
    # pulmonic regurgitation
    ("Moderate pulmonic regurgitation is seen.", {"pulmonic_valve_regurgitation": 1}),
    ("Severe pulmonary valve regurgitation.", {"pulmonic_valve_regurgitation": 1}),
    ("Pulmonic Valve: Moderate insufficiency.", {"pulmonic_valve_regurgitation": 1}),
    ("Mild pulmonic regurgitation.", {}),
    ("Moderate pulmonary insufficiency.", {"pulmonic_valve_regurgitation": 1}),
    ("Moderate pulmonary hypertension.", {}),
    # mitral annular calcification
    ("Moderate mitral annular calcification is noted.", {"mitral_annular_calcification": 1}),
    ("Severe calcification of the mitral annulus.", {"mitral_annular_calcification": 1}),
    ("Mild mitral annular calcification only.", {}),
    ("Mitral Valve: Moderate annular calcification.", {"mitral_annular_calcification": 1}),
    ("The mitral annulus is severely calcified.", {"mitral_annular_calcification": 1}),
    ("Moderate MAC.", {"mitral_annular_calcification": 1}),
    # bicuspid aortic valve
    ("A bicuspid aortic valve is seen.", {"bicuspid_aov_morphology": 1}),
    ("The aortic valve is likely bicuspid.", {"bicuspid_aov_morphology": 1}),
    ("Appearance suggests a possible bicuspid aortic valve.", {"bicuspid_aov_morphology": 1}),
    ("The aortic valve is probably bicuspid with moderate stenosis.",
     {"bicuspid_aov_morphology": 1, "aortic_stenosis": 1}),
    ("The aortic valve is not bicuspid.", {}),
    ("Trileaflet (tricuspid) aortic valve.", {}),
    ("Aortic Valve: Possibly bicuspid.", {"bicuspid_aov_morphology": 1}),
    # dilated IVC
    ("The inferior vena cava appears dilated.", {"dilated_ivc": 1}),
    ("IVC: Dilated with less than 50% inspiratory collapse.", {"dilated_ivc": 1}),
    ("The IVC measures 2.3cm.", {"dilated_ivc": 1}),
    ("IVC diameter 23 mm.", {"dilated_ivc": 1}),
    ("The IVC is 1.6 cm with normal respiratory variation.", {}),
    ("IVC: 2.0 cm.", {"dilated_ivc": 1}),
    ("IVC: 1.9 cm, collapses more than 50%.", {}),
    ("The inferior vena cava is normal in size.", {}),
    ("IVC is not dilated.", {}),
    ("A plethoric IVC.", {"dilated_ivc": 1}),
    # pericardial effusion
    ("There is a moderate pericardial effusion.", {"pericardial_effusion": 1}),
    ("Large pericardial effusion with early tamponade physiology.", {"pericardial_effusion": 1}),
    ("Small posterior pericardial effusion.", {}),
    ("A small to moderate pericardial effusion is present.", {}),
    ("A moderate to large pericardial effusion surrounds the heart.", {"pericardial_effusion": 1}),
    ("Pericardium: Very large effusion.", {"pericardial_effusion": 1}),
    ("Pericardium: There is a trivial effusion.", {}),
    ("Echocardiographic findings of cardiac tamponade are present.", {"pericardial_effusion": 1}),
    ("No pericardial effusion is present.", {}),
    ("Pericardium: Moderate left pleural effusion.", {}),
    ("No evidence of tamponade.", {}),
    ("A large, circumferential pericardial effusion is present.", {"pericardial_effusion": 1}),
    ("Moderate-sized pericardial effusion.", {"pericardial_effusion": 1}),
    ("Pericardial effusion is not seen.", {}),
    ("Tamponade was ruled out.", {}),
    # RV systolic function
    ("Right ventricular systolic function is moderately depressed.", {"rv_systolic_function_depressed": 1}),
    ("RV systolic function is severely reduced.", {"rv_systolic_function_depressed": 1}),
    ("Mildly reduced RV systolic function.", {}),
    ("RV systolic function is normal.", {}),
    ("Severely depressed RV systolic function with McConnell's sign.", {"rv_systolic_function_depressed": 1}),
    ("McConnell's sign is present.", {"rv_systolic_function_depressed": 1}),
    ("Right Ventricle: Moderately reduced systolic function.", {"rv_systolic_function_depressed": 1}),
    ("The right ventricle has moderately decreased systolic function.", {"rv_systolic_function_depressed": 1}),
    ("Left Ventricle: Moderately reduced systolic function.", {}),
    # elevated left atrial pressure
    ("Findings suggest elevated left atrial pressure.", {"elevated_left_atrial_pressure": 1}),
    ("Elevated LV filling pressures.", {"elevated_left_atrial_pressure": 1}),
    ("Left atrial pressure is elevated.", {"elevated_left_atrial_pressure": 1}),
    ("No evidence of elevated left atrial pressure.", {}),
    ("Normal left atrial pressure.", {}),
    ("Elevated right atrial pressure.", {}),
    # hypokinesis
    ("Resting Segmental Wall Motion Analysis: Hypokinesis of the inferior wall.", {"wall_motion_hypokinesis": 1}),
    ("The basal inferolateral segment is hypokinetic.", {"wall_motion_hypokinesis": 1}),
    ("Mild global hypokinesis.", {"wall_motion_hypokinesis": 1}),
    ("No regional wall motion abnormality is seen.", {}),
    ("There is no hypokinesis.", {}),
    ("Akinesis of the apex.", {}),
    # lipomatous hypertrophy of the atrial septum
    ("The atrial septum shows moderate lipomatous hypertrophy.", {"atrial_septum_hypertrophy": 1}),
    ("Severe lipomatous hypertrophy of the interatrial septum.", {"atrial_septum_hypertrophy": 1}),
    ("Mild lipomatous hypertrophy of the interatrial septum is noted.", {}),
    ("Atrial Septum: Moderate lipomatous hypertrophy.", {"atrial_septum_hypertrophy": 1}),
    ("Atrial Septum: Intact, no shunt.", {}),
    # ejection fraction
    ("LVEF 55%.", {EF: 55.0}),
    ("The LV ejection fraction is estimated to be 55 %.", {EF: 55.0}),
    ("EF of 55-60%.", {EF: 57.5}),
    ("Ejection fraction by Simpson's biplane is 40%.", {EF: 40.0}),
    ("LVEF is 35 to 40 %.", {EF: 37.5}),
    ("Left ventricular systolic function is moderately impaired with an estimated ejection fraction of 35.", {EF: 35.0}),
    ("Ejection fraction is visually estimated at 60-65 percent.", {EF: 62.5}),
    ("LVEF: 25%.", {EF: 25.0}),
    ("Ejection fraction of 150%.", {}),
    ("The ejection fraction is normal.", {}),
    ("RV ejection fraction 45%.", {}),
    ("EF 55 +/- 5%.", {EF: 55.0}),
    ("The biplane (Simpson's) ejection fraction measures 45.5 %.", {EF: 45.5}),
    # PA systolic pressure
    ("The estimated PA systolic pressure is 45 mmHg.", {PASP: 45.0}),
    ("PASP 38 mm Hg.", {PASP: 38.0}),
    ("RVSP 50 mmHg.", {PASP: 50.0}),
    ("Pulmonary artery systolic pressure of 35-40 mmHg.", {PASP: 37.5}),
    ("Pulmonary Artery: Estimated pulmonary artery systolic pressure is 62mmHg.", {PASP: 62.0}),
    ("Mean pulmonary artery pressure 25 mmHg.", {}),
    ("PA systolic pressure could not be estimated; RVSP 41 mmHg.", {PASP: 41.0}),
    ("RVSP 45 mmHg. PA systolic pressure is 40 mmHg.", {PASP: 40.0}),
    ("Pulmonary artery pressure 250 mmHg.", {}),
    ("The right ventricular systolic pressure is estimated at 30 mmHg plus a right atrial pressure of 8 mmHg.",
     {PASP: 30.0}),
    ("PA systolic pressure is normal, right atrial pressure 8 mmHg.", {}),
    ("EF 60 %, RVSP 35 mmHg.", {EF: 60.0, PASP: 35.0}),
    # whole reports: several lines, several sentences per line, line breaks, section context
    ("Left Ventricle: Normal size. LVEF 60%.\nAortic Valve: Trileaflet. Moderate stenosis. Mild regurgitation.\n"
     "Mitral Valve: Mild regurgitation.\nTricuspid Valve: Moderate regurgitation.\nPulmonary Artery: PASP 40 mmHg.",
     {"aortic_stenosis": 1, "tricuspid_valve_regurgitation": 1, EF: 60.0, PASP: 40.0}),
    ("Aortic Valve: There is moderate\nstenosis of the valve.", {"aortic_stenosis": 1}),
    ("Mitral Valve: Mild regurgitation.\nAortic Valve: Severe stenosis.", {"aortic_stenosis": 1}),
    ("Left Atrium: Severely dilated left atrium. [SEP] Right Atrium: Normal size. [SEP]", {"left_atrium_dilation": 1}),
    ("AORTIC VALVE :  MODERATE   STENOSIS .", {"aortic_stenosis": 1}),
    ("Mitral Valve: The mitral valve is thickened. There is moderate to severe regurgitation; no stenosis.",
     {"mitral_regurgitation": 1}),
    ("Aortic Valve: No stenosis or regurgitation.", {}),
    ("Aortic Valve: Severe stenosis, no regurgitation.", {"aortic_stenosis": 1}),
    ("Tricuspid Valve: No stenosis. Moderate regurgitation due to pacemaker lead impingement.",
     {"tricuspid_valve_regurgitation": 1, "pacemaker": 1}),
    ("Left Ventricle: Severely reduced systolic function, EF 20-25%. Global hypokinesis.",
     {EF: 22.5, "wall_motion_hypokinesis": 1}),
    ("Pericardium: No effusion.", {}),
    ("Left Atrium: Moderately\r\n  dilated.\r\nIVC: Normal.", {"left_atrium_dilation": 1}),
    ("Aortic Valve: Moderate stenosis.\nMitral Valve: Normal leaflets.\nTricuspid Valve: Normal.", {"aortic_stenosis": 1}),
    ("Right Ventricle: Normal size.\tMildly reduced systolic function.", {}),
    ("", {}),
    # phrases joined without full stops, as in many real reports
    ("Tricuspid Valve: No tricuspid stenosis There is moderate tricuspid regurgitation",
     {"tricuspid_valve_regurgitation": 1}),
    ("Mitral Valve: Normal leaflets Mild to Moderate mitral regurgitation", {}),
    ("Aortic Valve: Trileaflet aortic valve No aortic regurgitation Severe aortic stenosis", {"aortic_stenosis": 1}),
    ("Left Ventricle: LV ejection fraction is 60 Normal wall thickness", {EF: 60.0}),
    ("Mitral Valve: No stenosis (mean gradient 2 mmHg) Moderate regurgitation", {"mitral_regurgitation": 1}),
    # further wordings
    ("Estimated PA pressure is 40 + CVP mmHg.", {PASP: 40.0}),
    ("Estimated peak RVSP is 45", {PASP: 45.0}),
    ("Systolic function is normal with an estimated ejection fraction between 50 and 55%.", {EF: 52.5}),
    ("LVEF 55% and RVSP 40 mmHg.", {EF: 55.0, PASP: 40.0}),
    ("Bioprosthetic stent valve in the pulmonic position.", {}),
    ("A bioprosthetic stent valve sits in mitral position.", {}),
    ("A MitraClip device lies in the tricuspid position.", {}),
    ("Flow reversal in the descending aorta suggests the aortic regurgitation is not severe.", {}),
    ("Descending aortic flow reversal suggests aortic regurgitation is moderate in severity.",
     {"aortic_regurgitation": 1}),
    ("The interatrial septum bows toward the right, consistent with elevated left atrial pressure.",
     {"elevated_left_atrial_pressure": 1}),
    ("Cardiac tamponade cannot be ruled out.", {}),
    ("We cannot rule out tamponade.", {}),
    ("Moderate aortic stenosis cannot be excluded.", {}),
    ("Paravalvular aortic regurgitation is moderate.", {"aortic_regurgitation": 1}),
    ("Mild-moderate mitral regurgitation.", {}),
    ("Moderate-severe residual mitral regurgitation.", {"mitral_regurgitation": 1}),
    ("Aorta: The root measures normal, but visually appears mildly dilated.", {}),
    ("Aorta: Moderate sinotubular junction dilation.", {}),
    ("The IVC diameter is 21 mm.", {"dilated_ivc": 1}),
    ("Moderate AS.", {"aortic_stenosis": 1}),
    ("Severe MS and mild TS.", {"mitral_stenosis": 1}),
    ("SAME AS PRIOR. NO AORTIC STENOSIS.", {}),
    ("Findings as before, mild AS.", {}),
    ("Severe MR and TR.", {"mitral_regurgitation": 1, "tricuspid_valve_regurgitation": 1}),
    ("Mitral and tricuspid regurgitation are moderate.",
     {"mitral_regurgitation": 1, "tricuspid_valve_regurgitation": 1}),
    ("Severe RV free wall hypokinesis.", {"rv_systolic_function_depressed": 1, "wall_motion_hypokinesis": 1}),
    ("The right ventricle is mildly hypokinetic.", {"wall_motion_hypokinesis": 1}),
    ("Status post pacemaker removal.", {}),
    ("The ICD lead was extracted.", {}),
    ("The IVC is < 2.1 cm and collapses normally.", {}),
    ("Pulmonary Veins: Systolic flow reversal in the pulmonary veins, suggestive of severe mitral regurgitation.",
     {"mitral_regurgitation": 1}),
]


def expected(stated: dict) -> dict:
    return {t: stated.get(t, 0 if kind == "binary" else None) for t, kind in TRAITS.items()}


def test_table_is_large_and_covers_every_trait():
    assert len(CASES) >= 150
    positive = {t for _, stated in CASES for t, v in stated.items() if v}
    assert positive == set(TRAITS)


@pytest.mark.parametrize("text,stated", CASES, ids=[f"{i:03d}" for i in range(len(CASES))])
def test_extract_labels(text, stated):
    got = extract_labels(text)
    assert set(got) == set(TRAITS)
    want = expected(stated)
    wrong = {t: (got[t], want[t]) for t in TRAITS if got[t] != (pytest.approx(want[t]) if isinstance(want[t], float)
                                                               else want[t])}
    assert not wrong, f"{text!r}: (got, expected) {wrong}"


HIGH = ["moderate", "moderately severe", "moderate to severe", "moderate-to-severe", "moderate/severe", "at least moderate",
        "severe", "very severe", "critical", "massive", "marked", "torrential", "huge", "large", "3+", "4+"]
LOW = ["mild", "mild to moderate", "mild-moderate", "small", "small to moderate", "trace", "trivial", "minimal", "tiny",
       "physiologic", "borderline", "slight", "trace to mild", "trace/mild", "mild/moderate", "1+", "2+"]


@pytest.mark.parametrize("word", HIGH + LOW)
def test_every_severity_word(word):
    assert extract_labels(f"There is {word} mitral regurgitation.")["mitral_regurgitation"] == (word in HIGH)


@pytest.mark.parametrize("adverb,positive", [("moderately", 1), ("severely", 1), ("markedly", 1), ("massively", 1),
                                             ("moderately to severely", 1), ("mildly", 0), ("minimally", 0),
                                             ("slightly", 0), ("mildly to moderately", 0), ("not", 0)])
def test_every_severity_adverb(adverb, positive):
    assert extract_labels(f"The right atrium is {adverb} dilated.")["right_atrium_dilation"] == positive


def test_rules_can_be_varied():
    from echovlm.clinical import FINDINGS, RULES, VALUES, Finding, Rules
    variant = Rules({**FINDINGS, "impella": Finding(words="pump", present=(r"\bassist pump\b",))}, VALUES)
    text = "An assist pump is seen in the left ventricle."
    assert extract_labels(text)["impella"] == 0 and extract_labels(text, rules=variant)["impella"] == 1
    assert RULES.findings is FINDINGS


def test_labels_do_not_depend_on_case_or_spacing():
    text = "Aortic Valve: Moderate aortic stenosis. LVEF 45%."
    assert extract_labels(text) == extract_labels(text.upper().replace(" ", "   ")) == extract_labels(text.lower())


def test_sentences_split_sections_and_keep_decimals():
    got = sentences("Left Ventricle: EF 57.5%. Normal size\nIVC: 2.1 cm; dilated.\nwrapped here")
    assert got == [("left ventricle", "ef 57.5%"), ("left ventricle", "normal size"), ("ivc", "2.1 cm"),
                   ("ivc", "dilated"), ("ivc", "wrapped here")]


def test_extract_labels_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        extract_labels(None)


# ------------------------------------------------------------------ EchoPrime-style phrase rules (our own fixture)

FIXTURE = {
    "impella": {"section": "FNDG_Left_Ventricle", "mode": "binary", "label_sources": ["A CIRCULATORY PUMP IS VISIBLE"]},
    "aortic_stenosis": {"mode": "binary", "label_sources": [". MARKED NARROWING OF THE AORTIC VALVE",
                                                            "AORTIC VALVE OPENING IS CRITICALLY SMALL. "]},
    "ejection_fraction": {"mode": "regression", "label_sources": ["PUMPING FRACTION ESTIMATE: <#>% ",
                                                                  "The LV pumps <#> percent"], "range": [0, 100]},
    "pulmonary_artery_pressure_continuous": {"mode": "regression", "label_sources": ["PA PEAK <#>MMHG"]},
    "a_trait_echovlm_does_not_score": {"mode": "binary", "label_sources": ["anything"]},
}


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "assets" / "per_section.json"
    path.parent.mkdir()
    path.write_text(json.dumps(FIXTURE))
    return load_echoprime_rules(path)


def test_echoprime_rules_binary_is_a_substring_test(rules):
    got = extract_labels("Left Ventricle: A circulatory pump is visible. Normal size.", rules=rules)
    assert got["impella"] == 1 and got["aortic_stenosis"] == 0
    # the leading ". " of a phrase must be matched too, so it does not fire on "mild to marked narrowing"
    assert extract_labels("Aortic Valve: Thick. Marked narrowing of the aortic valve.", rules=rules)["aortic_stenosis"] == 1
    assert extract_labels("Aortic Valve: Mild to marked narrowing of the aortic valve.", rules=rules)["aortic_stenosis"] == 0
    # the phrase's trailing space is dropped, so it also matches at the very end of a report
    assert extract_labels("AORTIC VALVE OPENING IS CRITICALLY   SMALL.", rules=rules)["aortic_stenosis"] == 1
    # no negation logic: that is how these rules behave, and why our own rules are the default
    assert extract_labels("Not true that a circulatory pump is visible.", rules=rules)["impella"] == 1


def test_echoprime_rules_regression_and_range(rules):
    assert extract_labels("Pumping fraction estimate: 55% today.", rules=rules)[EF] == 55.0
    assert extract_labels("The LV pumps 35.5 percent.", rules=rules)[EF] == 35.5
    assert extract_labels("Pumping fraction estimate: 155%.", rules=rules)[EF] is None
    assert extract_labels("PA peak 42mmHg.", rules=rules)[PASP] == 42.0
    assert extract_labels("PASP 42 mmHg.", rules=rules)[PASP] is None


def test_echoprime_rules_leave_other_traits_unset(rules, tmp_path):
    got = extract_labels("Moderate mitral regurgitation.", rules=rules)
    assert set(got) == set(TRAITS)
    assert got["mitral_regurgitation"] is None and got["impella"] == 0
    assert rules.ignored == ["a_trait_echovlm_does_not_score"]
    assert load_echoprime_rules(tmp_path).binary == rules.binary  # a checkout directory works too


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "should hold an object"),
    (json.dumps({"impella": {"mode": "fuzzy", "label_sources": ["x"]}}), "'mode'"),
    (json.dumps({"impella": {"mode": "binary", "label_sources": []}}), "non-empty list"),
    (json.dumps({"impella": {"mode": "regression", "label_sources": ["x <#>"]}}), "scores it as binary"),
    (json.dumps({"ejection_fraction": {"mode": "regression", "label_sources": ["EF is"]}}), "<#>"),
    (json.dumps({"ejection_fraction": {"mode": "regression", "label_sources": ["EF <#>"], "range": [90, 10]}}), "range"),
])
def test_echoprime_rules_malformed(tmp_path, content, message):
    path = tmp_path / "per_section.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_echoprime_rules(path)


def test_echoprime_rules_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_echoprime"):
        load_echoprime_rules(tmp_path / "nowhere.json")


# ------------------------------------------------------------------ scoring


def test_weighted_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(float)
    s = np.round(rng.normal(size=300) + y, 1)
    assert _weighted_auroc(y, s, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(y, s))
    w = rng.integers(0, 3, 300).astype(float)  # integer weights = repeating studies
    rep = np.repeat(np.arange(300), w.astype(int))
    assert _weighted_auroc(y, s, w[None])[0] == pytest.approx(roc_auc_score(y[rep], s[rep]))


def test_auroc_perfect_random_and_hard():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    assert binary_auroc(y, y + 0.5 * y * rng.random(2000), n_boot=200) == (1.0, 1.0, 1.0)
    value, lo, hi = binary_auroc(y, rng.random(2000), n_boot=200)
    assert abs(value - 0.5) < 0.05 and lo <= value <= hi and lo < 0.5 < hi
    hard = (rng.random(2000) < 0.3 + 0.4 * y).astype(int)
    assert binary_auroc(y, hard, n_boot=50)[0] == pytest.approx(balanced_accuracy_score(y, hard))
    assert binary_auroc(np.zeros(10), rng.random(10)) is None


def test_bootstrap_is_seeded_and_ci_brackets_estimate():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + y
    a, b, c = binary_auroc(y, s, 300, seed=7), binary_auroc(y, s, 300, seed=7), binary_auroc(y, s, 300, seed=8)
    assert a == b and a != c
    assert a[1] < a[0] < a[2] and a[2] - a[1] < 0.2


def test_regression_known_values():
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 5], n_boot=200)
    assert m["mae"][0] == pytest.approx(0.25) and m["r2"][0] == pytest.approx(0.8)
    rng = np.random.default_rng(3)
    y = rng.normal(50, 10, 500)
    value, lo, hi = regression_metrics(y, y + rng.normal(0, 5, 500), n_boot=300)["r2"]
    assert lo <= value <= hi and 0.65 < value < 0.85
    assert regression_metrics([5.0], [4.0])["r2"] is None and regression_metrics([], [])["mae"] is None
    assert regression_metrics([3, 3, 3], [1, 2, 3])["r2"] is None


def test_score_traits_table_and_summary():
    refs = ["Moderate aortic stenosis. LVEF 40%.", "Mild aortic stenosis. LVEF 60%.",
            "Severe aortic stenosis. LVEF 30%.", "No aortic stenosis. EF not assessed."] * 5
    reference = [extract_labels(r) for r in refs]
    predicted = [dict(d) for d in reference]
    predicted[0] = {**predicted[0], "aortic_stenosis": 0, EF: 50.0}
    reference[1] = {**reference[1], "mitral_regurgitation": None}  # unsettled in the reference: left out
    table, summary = score_traits(reference, predicted, n_boot=100)
    assert list(table["trait"]) == list(TRAITS) and len(table) == 25
    row = table.set_index("trait")
    assert row.loc["aortic_stenosis", "positives"] == 10 and row.loc["aortic_stenosis", "negatives"] == 10
    assert row.loc["aortic_stenosis", "auroc_hard"] == pytest.approx(0.95)  # one of ten positives missed
    assert row.loc["mitral_regurgitation", "status"] == "N/A: no positives"
    assert np.isnan(row.loc["mitral_regurgitation", "auroc"]) and row.loc["mitral_regurgitation", "dropped"] == 1
    assert row.loc[EF, "n"] == 15 and row.loc[EF, "dropped"] == 5
    assert row.loc[EF, "mae"] == pytest.approx(10 / 15)
    assert row.loc[PASP, "status"].startswith("N/A")
    assert summary["traits_scored"] == 2 and set(summary["traits_na"]) == set(TRAITS) - {"aortic_stenosis", EF}
    assert summary["core_metric"] == pytest.approx((row.loc["aortic_stenosis", "auroc"] + row.loc[EF, "r2"]) / 2)
    # a continuous score ranks the missed study above the negatives: AUROC 1 while the hard label stays 0.95
    score = {"aortic_stenosis": np.where(np.array([d["aortic_stenosis"] for d in reference]) == 1, 0.9, 0.1)}
    table, summary = score_traits(reference, predicted, score=score, n_boot=50)
    assert table.set_index("trait").loc["aortic_stenosis", "auroc"] == 1.0
    assert summary["core_metric"] > summary["core_metric_hard"]
    # traits the score leaves out fall back to the hard labels, not to a constant 0
    table = score_traits(reference, predicted, score={"mitral_regurgitation": [0.5] * 20}, n_boot=20)[0]
    assert table.set_index("trait").loc["aortic_stenosis", "auroc"] == pytest.approx(0.95)


def test_score_traits_rejects_bad_input():
    with pytest.raises(ValueError, match="different number"):
        score_traits([extract_labels("LVEF 50%")] * 3, [extract_labels("LVEF 50%")] * 2, n_boot=10)
    with pytest.raises(ValueError, match="0, 1 or None"):
        score_traits({"aortic_stenosis": [0, 2, 1]}, {"aortic_stenosis": [0, 1, 1]}, n_boot=10)


def test_label_arrays_accepts_dicts_of_arrays():
    arrays = label_arrays({"aortic_stenosis": [1, 0, None], EF: np.array([50.0, np.nan, 40.0])})
    assert np.isnan(arrays["aortic_stenosis"][2]) and arrays[EF][0] == 50.0
    assert set(arrays) == set(TRAITS) and all(len(a) == 3 for a in arrays.values())
    assert set(BINARY_TRAITS) | set(CONTINUOUS_TRAITS) == set(TRAITS)
