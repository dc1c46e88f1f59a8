"""echovlm.faithful: values set to the prompt, reports assembled from drafts section by section, and the
measures of both; fast, with our rules and reports written here."""

import numpy as np
import pytest

from echovlm.clinical import extract_labels
from echovlm.consistency import contradictions
from echovlm.faithful import (CONTRADICTION, assemble, cost_of, fidelity, misstated, prompted_reports, sections,
                              set_values)
from echovlm.findings import NB, NV, prompt_codes
from echovlm.gpt import ABSENT, PRESENT, UNKNOWN
from echovlm.vocabulary import BINARY_TRAITS

EF, PE = "ejection_fraction", "pericardial_effusion"
PASP = "pulmonary_artery_pressure_continuous"


def prompt(present=(), ef=np.nan, pasp=np.nan):
    """One study's (codes, values): the named findings present, every other one absent."""
    binary = np.array([[1.0 if t in present else 0.0 for t in BINARY_TRAITS]])
    codes, values = prompt_codes(binary, np.array([[ef, pasp]]))
    return codes[0], values[0]


def label(text):
    return extract_labels(text)


def test_fidelity_and_misstated_count_what_the_report_states():
    codes = np.full((2, NB + NV), ABSENT)
    codes[:, 0] = PRESENT
    codes[1, NB + 1] = UNKNOWN
    values = np.array([[50.0, 30.0], [40.0, np.nan]])
    good = {t: 0 for t in BINARY_TRAITS} | {BINARY_TRAITS[0]: 1, "ejection_fraction": 51.0,
                                            "pulmonary_artery_pressure_continuous": 30.0}
    bad = good | {BINARY_TRAITS[0]: 0, "ejection_fraction": None}
    assert misstated(good, codes[0], values[0]) == 0
    assert misstated(bad, codes[1], values[1]) == 2
    f = fidelity([good, bad], codes, values)
    assert f["findings"]["pairs"] == 2 * NB and f["findings"]["agree"] == pytest.approx((2 * NB - 1) / (2 * NB))
    assert f["ejection_fraction"] == {"reports": 2, "within": 0.5, "not_stated": 1}
    assert f["pulmonary_artery_pressure_continuous"]["reports"] == 1


@pytest.mark.parametrize("written, want, expect", [
    ("The ejection fraction is estimated at 50-55%.", 61.6, "59-64%"),  # a range keeps its width
    ("LVEF 40%.", 62.4, "LVEF 62%"),
    ("LVEF 40.5%.", 62.4, "LVEF 62.4%"),  # written with the precision it had
    ("LVEF 61%.", 62.4, "LVEF 61%"),  # within 2 already: left alone
])
def test_set_values_writes_the_prompted_value_into_the_sentence(written, want, expect):
    text = f"Left Ventricle: Normal left ventricular size. {written}\nRight Ventricle: TAPSE 2.1 cm."
    codes, values = prompt(ef=want)
    out = set_values(text, codes, values, label)
    assert expect in out and "TAPSE 2.1 cm" in out
    assert abs(label(out)[EF] - want) <= 2


def test_set_values_changes_nothing_it_cannot_make_the_evaluator_read():
    codes, values = prompt(ef=35.0, pasp=40.0)
    # LVEF not stated at all: no number to set; PASP stated: set; the unrelated numbers are never touched
    text = "Left Ventricle: Normal size.\nRight Ventricle: TAPSE 2.1 cm. RVSP 25 mmHg."
    out = set_values(text, codes, values, label)
    assert out == "Left Ventricle: Normal size.\nRight Ventricle: TAPSE 2.1 cm. RVSP 40 mmHg."
    # a value the prompt leaves unknown is the GPT's to state
    codes, values = prompt(ef=35.0)
    assert codes[NB + 1] == UNKNOWN
    assert set_values("Right Ventricle: RVSP 25 mmHg.", codes, values, label) == "Right Ventricle: RVSP 25 mmHg."


def test_set_values_adds_no_contradiction():
    codes, values = prompt(ef=35.0)
    # 35% beside "normal function" would contradict it: the GPT's own number (one misstated value) stays
    text = "Left Ventricle: Normal left ventricular systolic function. LVEF 60%."
    assert contradictions(text) == [] and contradictions(text.replace("60", "35"))
    assert set_values(text, codes, values, label) == text
    assert set_values("Left Ventricle: Normal size. LVEF 60%.", codes, values, label) == \
        "Left Ventricle: Normal size. LVEF 35%."


def test_sections_group_a_reports_lines_by_header():
    text = "Preface line.\nLeft Ventricle: a.\nmore of it\nPericardium: b.\nLeft Ventricle: c."
    assert sections(text) == [("", "Preface line."), ("left ventricle", "Left Ventricle: a.\nmore of it"),
                              ("pericardium", "Pericardium: b."), ("left ventricle", "Left Ventricle: c.")]


def test_assemble_takes_each_section_from_the_draft_that_states_it():
    codes, values = prompt(present=(PE, "aortic_stenosis"), ef=60.0)
    lv_right = "Left Ventricle: Normal left ventricular systolic function. LVEF 60%."
    lv_wrong = "Left Ventricle: Normal left ventricular systolic function. LVEF 60%. Moderate mitral stenosis."
    av_right, av_wrong = "Aortic Valve: Moderate aortic stenosis.", "Aortic Valve: No aortic stenosis."
    pe_right, pe_wrong = "Pericardium: There is a moderate pericardial effusion.", "Pericardium: No effusion."
    drafts = ["\n".join([lv_right, av_wrong, pe_wrong]), "\n".join([lv_wrong, av_right, pe_wrong]),
              "\n".join([lv_wrong, av_wrong, pe_right])]
    # no single draft states the prompt: the best one misstates two findings
    assert min(misstated(label(d), codes, values) for d in drafts) == 2
    text, cost = assemble(drafts, codes, values, label)
    assert cost == 0 and misstated(label(text), codes, values) == 0
    assert text == "\n".join([lv_right, av_right, pe_right])  # in the best draft's order, every sentence a draft's


def test_assemble_keeps_the_first_of_equal_drafts_and_repairs_a_repeated_section():
    codes, values = prompt(present=("aortic_stenosis",))
    twice = "Aortic Valve: Moderate aortic stenosis.\nPericardium: No effusion.\nAortic Valve: Trileaflet."
    once = "Aortic Valve: Moderate aortic stenosis.\nPericardium: No effusion."
    assert contradictions(twice) and not contradictions(once)
    text, cost = assemble([twice, once], codes, values, label)
    assert (text, cost) == (once, 0)
    assert assemble([once, once + " "], codes, values, label) == (once, 0)


def test_a_contradiction_is_never_traded_for_a_finding():
    codes, values = prompt(present=(PE,), ef=62.0)
    faithful_but_contradictory = ("Left Ventricle: Severely reduced left ventricular systolic function. LVEF 62%.\n"
                                  "Pericardium: There is a moderate pericardial effusion.")
    consistent = "Left Ventricle: Normal left ventricular systolic function. LVEF 62%.\nPericardium: No effusion."
    assert cost_of(consistent, label(consistent), codes, values) == 1
    assert cost_of(faithful_but_contradictory, label(faithful_but_contradictory), codes, values) == CONTRADICTION
    # a trial whose misstatements already reach the cost to beat is not checked for contradictions
    assert cost_of(consistent, label(consistent), codes, values, below=1) == 1
    assert cost_of(faithful_but_contradictory, label(faithful_but_contradictory), codes, values, below=0) == 0
    text, _ = assemble([faithful_but_contradictory, consistent], codes, values, label)
    assert not contradictions(text)


class ScriptedEngine:
    """Stands in for echovlm.engine.Engine: greedy and sampled reports from fixed lists, calls recorded."""

    def __init__(self, greedy, rounds):
        self.greedy, self.rounds, self.calls = greedy, list(rounds), []

    def generate_text(self, embeddings, prompts=None, temperature=0.0, num_samples=1, seed=0, **kw):
        self.calls.append((len(embeddings), temperature, num_samples, seed))
        if temperature == 0.0:
            return [[g] for g in self.greedy]
        drafts = self.rounds.pop(0)
        return [drafts[:num_samples] for _ in embeddings]


def test_prompted_reports_sets_values_then_drafts_in_two_rounds_only_where_needed():
    codes0, values0 = prompt(present=(PE,), ef=30.0)
    codes1, values1 = prompt(ef=60.0)
    codes, values = np.stack([codes0, codes1]), np.stack([values0, values1])
    right = "Left Ventricle: Severely reduced left ventricular systolic function. LVEF 30%."
    greedy = [right + "\nPericardium: No effusion.",  # misses the effusion
              "Left Ventricle: Normal left ventricular systolic function. LVEF 55%."]  # value set, nothing else
    no_help = "Pericardium: No effusion."
    effusion = "Pericardium: There is a moderate pericardial effusion."
    engine = ScriptedEngine(greedy, [[no_help] * 2, [no_help] * 5 + [effusion]])
    texts, labels, generated = prompted_reports(engine, [np.zeros((1, 4))] * 2, codes, values,
                                                lambda ts: [label(t) for t in ts], retries=2, seed=7)
    assert texts == [right + "\n" + effusion, "Left Ventricle: Normal left ventricular systolic function. LVEF 60%."]
    assert [misstated(lab, codes[i], values[i]) for i, lab in enumerate(labels)] == [0, 0]
    # only study 0 was redrafted: 2 drafts, then 6 in the second round, each round with its own seed
    assert engine.calls == [(2, 0.0, 1, 0), (1, 1.0, 2, 7), (1, 1.0, 6, 8)]
    assert generated == 2 + 2 + 6
    # retries 0: the greedy report, values set, and nothing sampled
    engine = ScriptedEngine(greedy, [])
    texts, _, generated = prompted_reports(engine, [np.zeros((1, 4))] * 2, codes, values,
                                           lambda ts: [label(t) for t in ts], retries=0)
    assert texts[1].endswith("LVEF 60%.") and generated == 2 and len(engine.calls) == 1
