"""The strongest simple baselines a report writer must beat, read from the same study embeddings.

scripts.test_inference scores them beside the model on the same studies. Both give a continuous score (for
AUROC) and hard labels at each finding's training prevalence: for calibrated scores that is the cut under
which balanced accuracy is best, and no one thresholds a 2%-prevalence finding at 0.5.

  knn{k}  the mean label of the k nearest training studies (echovlm.retrieval); values = their mean
  probe   a logistic regression per finding and a ridge per value (scikit-learn) on the standardised mean study
          embedding, fitted on at most max_studies training studies (a seeded subsample on a large split)
"""

import numpy as np

from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, TRAITS


def from_scores(score: dict[str, np.ndarray], values: dict[str, np.ndarray], prevalence: dict[str, float]) -> dict:
    """A score-based baseline: hard label = score above the trait's training prevalence (NaN stays NaN)."""
    predicted = {t: np.where(np.isnan(s), np.nan, (s > prevalence[t]).astype(float)) for t, s in score.items()}
    predicted.update(values)
    return {"predicted": predicted, "score": score}


def from_neighbours(train: dict[str, np.ndarray], neighbours: np.ndarray, prevalence: dict[str, float]) -> dict:
    """Score = mean label of the neighbours that settle the trait; hard label = score above the training
    prevalence; value = mean value."""
    def mean_rows(a):
        ok = ~np.isnan(a)
        return np.where(ok.any(1), np.nansum(a, 1) / np.maximum(ok.sum(1), 1), np.nan)

    return from_scores({t: mean_rows(train[t][neighbours]) for t in BINARY_TRAITS},
                       {t: mean_rows(train[t][neighbours]) for t in CONTINUOUS_TRAITS}, prevalence)


def fit_probe(train_x: np.ndarray, train: dict[str, np.ndarray], test_x: np.ndarray, max_studies: int, seed: int,
              prevalence: dict[str, float]) -> tuple[dict, int]:
    """The probe baseline (scikit-learn): a logistic regression per binary trait and a ridge per value on the
    standardised mean embeddings of at most max_studies training studies (a seeded subsample). (system, fitted on)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = np.arange(len(train_x))
    if len(rows) > max_studies:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_studies, replace=False))
    score, values = {}, {}
    for t in TRAITS:
        y = train[t][rows]
        ok = ~np.isnan(y)
        one_class = TRAITS[t] == "binary" and len(np.unique(y[ok])) < 2
        if ok.sum() < 10 or one_class:  # nothing to learn: the trait is N/A for the probe
            (score if TRAITS[t] == "binary" else values)[t] = np.full(len(test_x), np.nan)
        elif TRAITS[t] == "binary":
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
            score[t] = model.fit(train_x[rows][ok], y[ok]).predict_proba(test_x)[:, 1]
        else:
            values[t] = make_pipeline(StandardScaler(), Ridge()).fit(train_x[rows][ok], y[ok]).predict(test_x)
    return from_scores(score, values, prevalence), len(rows)
