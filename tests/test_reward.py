"""echovlm.reward on hand-written label sets and reports: the reward's arithmetic, its balance between rare and
common findings, and the consensus pick."""

import numpy as np
import pytest

from echovlm.clinical import BINARY_TRAITS, CONTINUOUS_TRAITS, extract_labels
from echovlm.reward import RewardWeights, consensus, reward_matrix, rewards

RARE, COMMON = BINARY_TRAITS[0], BINARY_TRAITS[1]
EF, PASP = CONTINUOUS_TRAITS


def labels(**kw):
    d = {t: 0 for t in BINARY_TRAITS}
    d.update({t: None for t in CONTINUOUS_TRAITS})
    d.update(kw)
    return d


def weights(penalty=0.25):
    """RARE present in 1 of 10 training reports, COMMON in 5 of 10; EF values 40..60 (std ~7.1), PASP 30/40."""
    train = [labels(**{RARE: int(i == 0), COMMON: int(i < 5), EF: 40 + 5 * (i % 5), PASP: 30 + 10 * (i % 2)})
             for i in range(10)]
    return RewardWeights.from_labels(train, penalty)


def test_weights_are_balanced_accuracy_weights():
    w = weights()
    i, j = BINARY_TRAITS.index(RARE), BINARY_TRAITS.index(COMMON)
    assert w.positive[i] == pytest.approx(0.5 / 0.1) and w.negative[i] == pytest.approx(0.5 / 0.9)
    assert w.positive[j] == pytest.approx(1.0) and w.negative[j] == pytest.approx(1.0)
    assert w.spread[0] == pytest.approx(np.std([40, 45, 50, 55, 60]))
    # a trait never seen positive still gets a finite weight (prevalence clipped to 1/n)
    assert np.isfinite(w.positive).all() and np.isfinite(w.negative).all()


def test_reward_is_a_per_study_estimate_of_balanced_accuracy():
    w = weights()
    ref = labels(**{RARE: 1})
    n = len(BINARY_TRAITS)
    perfect = rewards([ref], [ref], w)[0]
    missed = rewards([labels()], [ref], w)[0]
    i = BINARY_TRAITS.index(RARE)
    # a perfect report earns the mean of its traits' weights; missing the rare finding loses its whole weight
    expected = (w.positive[i] + sum(w.negative[k] for k in range(n) if k != i)) / n
    assert perfect == pytest.approx(expected)
    assert perfect - missed == pytest.approx(w.positive[i] / n)
    # over studies, "always normal" earns 0.5 per trait: (n-1) traits fully right on negatives, the rare one split
    pos, neg = ref, labels()
    always_normal = rewards([labels(), labels()], [pos, neg], w)
    p = 0.1
    mean_ba = ((1 - p) * always_normal[1] + p * always_normal[0])
    assert mean_ba < perfect  # calling nothing is worse than calling right


def test_continuous_closeness_and_missing_values():
    w = weights()
    ref = labels(**{EF: 50.0, PASP: 35.0})
    n = len(BINARY_TRAITS) + 2
    base = len(BINARY_TRAITS)  # every binary trait negative and right: sum of negative weights
    exact = rewards([ref], [ref], w)[0] * n - sum(w.negative)
    assert exact == pytest.approx(2.0)
    off = rewards([labels(**{EF: 50.0 + w.spread[0] / 2, PASP: None})], [ref], w)[0] * n - sum(w.negative)
    assert off == pytest.approx(0.5)  # half a spread away: half the credit; no PASP stated: none
    far = rewards([labels(**{EF: 95.0, PASP: 35.0})], [ref], w)[0] * n - sum(w.negative)
    assert far == pytest.approx(1.0)  # EF beyond one spread earns nothing, PASP exact earns 1
    assert base > 0


def test_contradictions_cost_the_penalty_each():
    w = weights(penalty=0.3)
    ref = labels()
    clean, two = rewards([ref, ref], [ref, ref], w, np.array([0, 2]))
    assert clean - two == pytest.approx(0.6)


def test_unsettled_reference_traits_are_left_out():
    w = weights()
    ref = labels(**{COMMON: None})
    a = rewards([labels(**{COMMON: 1})], [ref], w)[0]
    b = rewards([labels(**{COMMON: 0})], [ref], w)[0]
    assert a == b


def test_reward_matrix_matches_pairwise_rewards():
    w = weights()
    rng = np.random.default_rng(0)
    sets = [labels(**{t: int(rng.random() < 0.3) for t in BINARY_TRAITS}, **{EF: float(rng.integers(20, 70))})
            for _ in range(6)]
    m = reward_matrix(sets, sets, w)
    for i in range(6):
        for j in range(6):
            assert m[i, j] == pytest.approx(rewards([sets[i]], [sets[j]], w)[0])


def test_consensus_states_a_rare_finding_above_its_prevalence_not_above_half():
    """3 of 10 samples state a finding of prevalence 0.1: the consensus report states it (0.3 > 0.1), where a
    majority vote would not; 3 of 10 stating a finding of prevalence 0.5 is left out."""
    w = weights()
    rare = [labels(**{RARE: int(i < 3)}) for i in range(10)]
    assert rare[consensus(rare, w)][RARE] == 1
    common = [labels(**{COMMON: int(i < 3)}) for i in range(10)]
    assert common[consensus(common, w)][COMMON] == 0
    assert consensus(rare[:1], w) == 0


def test_consensus_avoids_a_self_contradicting_sample():
    w = weights()
    same = [labels() for _ in range(4)]
    assert consensus(same, w, np.array([1, 0, 0, 0])) == 1


def test_reward_on_real_report_text():
    """The reward reads what the extractor reads: a report that names the reference's severe MR scores above
    one that says there is none."""
    ref_text = "Mitral Valve: There is severe mitral regurgitation.\nLeft Ventricle: LVEF 35%."
    good = "Mitral Valve: Severe mitral regurgitation.\nLeft Ventricle: LVEF 35%."
    bad = "Mitral Valve: No mitral regurgitation.\nLeft Ventricle: LVEF 60%."
    train = [extract_labels(t) for t in (ref_text, bad, bad, bad)]
    w = RewardWeights.from_labels(train)
    ref = extract_labels(ref_text)
    r_good, r_bad = rewards([extract_labels(good), extract_labels(bad)], [ref, ref], w)
    assert r_good > r_bad


def test_rewards_checks_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rewards([labels(), labels()], [labels()], weights())
