"""The clinical reward of one report against a reference, and the consensus pick among sampled reports.

Both compare label sets (echovlm.clinical.extract_labels dicts, or EchoPrime's phrase rules' labels):

    reward(pred, ref) = 1/n * [ sum over binary traits t the reference settles:  w_t(ref_t) * [pred_t == ref_t]
                              + sum over continuous traits the reference states: max(0, 1 - |pred_t - ref_t| / s_t) ]
                        - penalty * contradictions(pred report)

n counts the traits summed. w_t(1) = 1 / (2 p_t) and w_t(0) = 1 / (2 (1 - p_t)), p_t the trait's prevalence in
the training reports: averaged over studies, the binary part of a trait is then its balanced accuracy (half
sensitivity, half specificity), the number test_inference's hard Core Metric averages. A rare finding counts
as much as a common one, and writing "normal" everywhere earns 0.5 per trait, not 0.95. s_t is the trait's
standard deviation over the training reports, so a value one spread away earns nothing; a value the report
leaves out earns nothing either. A label the report does not state counts as 0 (absent), as in scoring.

consensus() picks, among a study's sampled reports, the one with the highest mean reward against all the
others (minimum Bayes risk decoding with the reward as utility). It states a finding when more than about the
trait's prevalence of the samples state it, the decision rule under which balanced accuracy is best, rather
than when more than half do (greedy decoding's implicit rule, which under-calls rare findings).
"""

from dataclasses import dataclass

import numpy as np

from echovlm.clinical import BINARY_TRAITS, CONTINUOUS_TRAITS
from echovlm.scoring import label_arrays


@dataclass
class RewardWeights:
    """Per-trait constants of the reward, estimated once from the training split's reference labels."""
    positive: np.ndarray  # (n_binary,) w_t(1) = 1 / (2 p_t)
    negative: np.ndarray  # (n_binary,) w_t(0) = 1 / (2 (1 - p_t))
    spread: np.ndarray  # (n_continuous,) s_t, the training standard deviation of each value
    penalty: float = 0.25  # reward lost per contradiction in the report

    @classmethod
    def from_labels(cls, labels, penalty: float = 0.25) -> "RewardWeights":
        """From a list of label dicts (the training reports'). A trait no report settles gets weight 0.5 both
        ways; prevalence is clipped to [1/n, 1 - 1/n] so a finding seen once or never has a finite weight."""
        a = label_arrays(labels)
        pos, neg = [], []
        for t in BINARY_TRAITS:
            known = a[t][~np.isnan(a[t])]
            n = len(known)
            p = float(np.clip(known.mean(), 1.0 / n, 1 - 1.0 / n)) if n > 1 else 0.5
            pos.append(0.5 / p)
            neg.append(0.5 / (1 - p))
        spread = []
        for t in CONTINUOUS_TRAITS:
            known = a[t][~np.isnan(a[t])]
            spread.append(float(known.std()) if len(known) > 1 and known.std() > 0 else 1.0)
        return cls(np.array(pos), np.array(neg), np.array(spread), penalty)

    def to_dict(self) -> dict:
        return {"positive": dict(zip(BINARY_TRAITS, self.positive.round(4).tolist())),
                "negative": dict(zip(BINARY_TRAITS, self.negative.round(4).tolist())),
                "spread": dict(zip(CONTINUOUS_TRAITS, self.spread.round(4).tolist())), "penalty": self.penalty}


def _matrices(labels: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(binary (n, n_binary) with NaN = not settled, continuous (n, n_continuous) with NaN = not stated)."""
    a = label_arrays(labels)
    return (np.stack([a[t] for t in BINARY_TRAITS], 1) if labels else np.zeros((0, len(BINARY_TRAITS))),
            np.stack([a[t] for t in CONTINUOUS_TRAITS], 1) if labels else np.zeros((0, len(CONTINUOUS_TRAITS))))


def reward_matrix(preds: list[dict], refs: list[dict], w: RewardWeights,
                  contradictions: np.ndarray | None = None) -> np.ndarray:
    """(len(preds), len(refs)) rewards of every prediction against every reference (contradictions: one count
    per prediction, or None for none). reward(pred, ref) is reward_matrix([pred], [ref], w)[0, 0]."""
    pb, pc = _matrices(preds)
    rb, rc = _matrices(refs)
    pb = np.nan_to_num(pb, nan=0.0)  # not stated = absent, as scoring reads it
    settled = ~np.isnan(rb)  # (R, B)
    weight = np.where(rb == 1, w.positive, w.negative) * settled  # (R, B)
    agree = pb[:, None, :] == np.nan_to_num(rb, nan=-1.0)[None]  # (P, R, B)
    binary = (agree * weight[None]).sum(-1)
    stated = ~np.isnan(rc)  # (R, C)
    err = np.abs(pc[:, None, :] - rc[None]) / w.spread  # NaN where either side has no value
    close = np.where(stated[None] & ~np.isnan(err), np.clip(1 - err, 0, None), 0.0).sum(-1)
    n = (settled.sum(-1) + stated.sum(-1))[None].astype(float)  # traits the reference speaks to
    out = np.where(n > 0, (binary + close) / np.maximum(n, 1), 0.0)
    if contradictions is not None:
        out = out - w.penalty * np.asarray(contradictions, dtype=float)[:, None]
    return out


def rewards(preds: list[dict], refs: list[dict], w: RewardWeights, contradictions=None) -> np.ndarray:
    """Reward of preds[i] against refs[i], for paired lists."""
    if len(preds) != len(refs):
        raise ValueError(f"rewards: {len(preds)} predictions but {len(refs)} references")
    if not preds:
        return np.zeros(0)
    # the diagonal of the full matrix, computed row by row to keep memory linear in the number of pairs
    return np.array([reward_matrix([p], [r], w, None if contradictions is None else [contradictions[i]])[0, 0]
                     for i, (p, r) in enumerate(zip(preds, refs))])


def consensus(samples: list[dict], w: RewardWeights, contradictions=None) -> int:
    """Index of the sample with the highest mean reward against the other samples (its own label set left
    out); ties go to the earliest. One sample: 0."""
    if len(samples) == 1:
        return 0
    m = reward_matrix(samples, samples, w, contradictions)
    np.fill_diagonal(m, 0.0)
    return int(np.argmax(m.sum(1)))
