"""Scoring clinical labels: generated reports' labels against the reference reports', trait by trait.

Binary traits: AUROC of a continuous score (or of 0/1 labels, which is balanced accuracy), continuous traits:
R^2 and MAE, each with a 95% bootstrap CI over studies; the Core Metric averages them over traits. The labels
come from echovlm.clinical.extract_labels.
"""

import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

from echovlm.vocabulary import BINARY_TRAITS, TRAITS

def label_arrays(labels, n: int | None = None) -> dict[str, np.ndarray]:
    """trait -> float array over studies (NaN = None), from a list of extract_labels() dicts or trait -> array."""
    if isinstance(labels, dict):
        sizes = {len(v) for v in labels.values()}
        if len(sizes) > 1:
            raise ValueError(f"label arrays of different lengths: {sorted(sizes)}")
        n = sizes.pop() if sizes else (n or 0)
        return {t: np.array([np.nan if x is None else x for x in labels[t]], dtype=float) if t in labels
                else np.full(n, np.nan) for t in TRAITS}
    return {t: np.array([np.nan if d.get(t) is None else d[t] for d in labels], dtype=float) for t in TRAITS}


def _resample_counts(n: int, n_boot: int, seed: int):
    """Bootstrap resamples of n studies as (b, n) multiplicity matrices, a chunk at a time to bound memory."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, (1 << 23) // max(n, 1)))
    for done in range(0, n_boot, chunk):
        b = min(chunk, n_boot - done)
        rows = rng.integers(0, n, size=(b, n), dtype=np.int64) + (np.arange(b) * n)[:, None]
        yield np.bincount(rows.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def _weighted_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC of each row of study weights w (b, n): P(score of a positive > a negative's), ties counting half."""
    order = np.argsort(s, kind="stable")
    y, s, w = y[order], s[order], w[:, order]
    pos, neg = w * y, w * (1 - y)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    if len(starts) < len(s):  # pool tied scores (always for 0/1 predictions)
        pos, neg = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (pos * (below + 0.5 * neg)).sum(1) / den, np.nan)


def _ci(point: float, boots: np.ndarray) -> tuple[float, float, float]:
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return float(point), float("nan"), float("nan")
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def binary_auroc(y_true, score, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float] | None:
    """(AUROC, 95% CI low, high) of a score against 0/1 labels; None without both classes. For a 0/1 score
    this is balanced accuracy. CI: percentile bootstrap over studies (resamples with one class skipped)."""
    y, s = np.asarray(y_true, dtype=float), np.asarray(score, dtype=float)
    if len(y) != len(s):
        raise ValueError(f"binary_auroc: {len(y)} labels but {len(s)} scores")
    if not (0 < y.sum() < len(y)):
        return None
    boots = np.concatenate([_weighted_auroc(y, s, w) for w in _resample_counts(len(y), n_boot, seed)])
    return _ci(roc_auc_score(y, s), boots)


def regression_metrics(y_true, y_pred, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"r2": (value, lo, hi) or None, "mae": (value, lo, hi) or None} with percentile-bootstrap 95% CIs.
    R^2 needs 2+ studies and a reference that is not constant; MAE needs 1+."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    if len(y) != len(p):
        raise ValueError(f"regression_metrics: {len(y)} references but {len(p)} predictions")
    if len(y) == 0:
        return {"r2": None, "mae": None}
    err = y - p
    r2s, maes = [], []
    for w in _resample_counts(len(y), n_boot, seed):
        total = w.sum(1)
        mean = w @ y / total
        ss_tot = w @ (y * y) - total * mean * mean
        with np.errstate(invalid="ignore", divide="ignore"):
            r2s.append(np.where(ss_tot > 1e-9 * total, 1 - (w @ (err * err)) / ss_tot, np.nan))
        maes.append(w @ np.abs(err) / total)
    r2 = _ci(r2_score(y, p), np.concatenate(r2s)) if len(y) >= 2 and np.ptp(y) > 0 else None
    return {"r2": r2, "mae": _ci(mean_absolute_error(y, p), np.concatenate(maes))}


def score_traits(reference, predicted, score=None, n_boot: int = 1000, seed: int = 0):
    """Compare predicted labels with reference labels, trait by trait, over the same studies.

    reference, predicted, score: lists of extract_labels() dicts or trait -> array, one entry per study.
    predicted gives the hard labels (binary; None = not stated = 0) and the values (continuous); score, if
    given, a continuous score per binary trait for the AUROC (e.g. the fraction of sampled reports stating
    the finding), else AUROC = hard AUROC. A study whose reference label is None is left out of that trait.
    Binary: AUROC and hard AUROC (= balanced accuracy), N/A without positives or negatives. Continuous: R^2 and
    MAE over studies where both sides state a value. Core Metric: the mean over traits of AUROC (binary) and
    R^2 (continuous), as in EchoPrime's tables; core_metric_hard uses the hard AUROC.

    Returns (DataFrame with one row per trait, summary dict).
    """
    ref, pred = label_arrays(reference), label_arrays(predicted)
    n = len(ref[BINARY_TRAITS[0]])
    sc = pred
    if score is not None:  # a trait the score leaves out (no values at all) is ranked by its hard labels
        sc = {t: a if np.isfinite(a).any() else pred[t] for t, a in label_arrays(score, n).items()}
    if any(len(a[t]) != n for a in (pred, sc) for t in TRAITS):
        raise ValueError(f"score_traits: reference has {n} studies but the predictions have a different number")
    rows = []
    for trait, kind in TRAITS.items():
        row = {"trait": trait, "kind": kind}
        if kind == "binary":
            keep = ~np.isnan(ref[trait])
            y = ref[trait][keep]
            if not np.isin(y, (0, 1)).all():
                raise ValueError(f"score_traits: reference labels of {trait} must be 0, 1 or None, got {sorted(set(y))[:5]}")
            row.update(n=int(keep.sum()), positives=int(y.sum()), negatives=int((1 - y).sum()), dropped=int((~keep).sum()))
            auroc = binary_auroc(y, np.nan_to_num(sc[trait][keep]), n_boot, seed)
            hard = binary_auroc(y, np.nan_to_num(pred[trait][keep]), n_boot, seed)
            row["status"] = "ok" if auroc else ("N/A: no positives" if row["positives"] == 0 else "N/A: no negatives")
            metrics = {"auroc": auroc, "auroc_hard": hard}
        else:
            keep = ~np.isnan(ref[trait]) & ~np.isnan(pred[trait])
            row.update(n=int(keep.sum()), dropped=int((~keep).sum()))
            metrics = regression_metrics(ref[trait][keep], pred[trait][keep], n_boot, seed)
            row["status"] = "ok" if metrics["r2"] else "N/A: fewer than 2 studies with both values, or a constant reference"
        for name, m in metrics.items():
            row.update({name: np.nan, f"{name}_lo": np.nan, f"{name}_hi": np.nan} if m is None else
                       {name: m[0], f"{name}_lo": m[1], f"{name}_hi": m[2]})
        rows.append(row)
    table = pd.DataFrame(rows)
    main = table["auroc"].where(table["kind"] == "binary", table["r2"])
    hard = table["auroc_hard"].where(table["kind"] == "binary", table["r2"])
    summary = {"core_metric": float(main.mean()) if main.notna().any() else None,
               "core_metric_hard": float(hard.mean()) if hard.notna().any() else None,
               "traits_scored": int(main.notna().sum()), "traits_na": table.loc[main.isna(), "trait"].tolist(),
               "n_studies": n, "n_boot": n_boot, "seed": seed}
    return table, summary
