"""Clinical evaluation on the test split: what do the generated reports say, and is it right?

    python -m scripts.test_inference --run runs/speedrun/model                    # all test studies
    python -m scripts.test_inference --run RUN --max-studies 2000 --samples 5 --out RUN/eval

Every report, generated or reference, goes through the same label extractor (echovlm.clinical; or
EchoPrime's own phrase rules with --echoprime-rules; by default the rules the model was trained with), and the
labels are compared trait by trait, on the same studies, for these systems:

  model      the report a user gets. With a findings head (echovlm.findings): the head decides the findings,
             the GPT writes the report prompted with them, checked by the evaluator (echovlm.faithful: its
             LVEF/PASP numbers set to the decided values; where it still misstates a prompted finding or
             contradicts itself, --drafts sampled drafts, then 3x that, and the report assembled from them
             section by section). Hard labels: what the report states; score (AUROC): the head's
             probability. Without a head (a model made before it): the free report below, under the name
             model.
  free       the same GPT with no findings prompt, writing from the embeddings alone (a model with a head
             only): hard labels of the --decode report (consensus of the greedy and the sampled reports,
             or greedy), score = the fraction of --samples reports sampled at --temperature stating the finding.
  head       the findings head alone: its decisions (thresholds set on val for balanced accuracy) and
             probabilities; values as regressed.
  prior      the model's report of another test study (a seeded shuffle that leaves no study with its own),
             scored as this study's: what the model writes without knowing the study. Beating it shows the
             embeddings are read. The report is a function of the embeddings it is given, so the model's
             report of that other study is what it writes given them: no second generation.
  retrieval  the report of the nearest training study by cosine similarity of mean embeddings, as EchoPrime
             does. It gives hard labels only, so its AUROC is its balanced accuracy.
  probe      per-finding logistic regression (and ridge for LVEF/PASP) on the standardised mean study
             embedding, fitted on the training split (at most --probe-studies of it, seeded): score = its
             probability, hard label = probability above the finding's training prevalence.
  knn{k}     the mean label of the --knn k nearest training studies as the score, hard label = score above
             the finding's training prevalence (no one thresholds a 2% finding at 0.5), values = their mean.

Binary traits: AUROC of the score and of the hard 0/1 label (= balanced accuracy, the number the reference
system reports), with 95% bootstrap CIs over studies (the same resamples for every system). A trait with
no positive or no negative study is N/A. LVEF and PASP: R^2 and MAE of the decoded (or retrieved, or
regressed) value; studies where either side states no value are dropped and counted. Core Metric, as in
EchoPrime's tables: the mean over traits of AUROC (binary) and R^2 (continuous); "hard" uses hard AUROC.

Fidelity (a model with a head): the share of prompted (study, finding) pairs whose report states the prompted
label, and the share of reports stating LVEF / PASP within 2 points of the prompted value. Calibration: the
head's expected calibration error on the test studies and its reliability plot (calibration.png).

Consistency (echovlm.consistency): contradictions one report holds about itself (LVEF against the stated
systolic function, a finding stated and denied, two severities, impossible numbers, a repeated section), per
1,000 reports of each generating system, the retrieved reports and the reference reports themselves (the
floor: what the real reports do), with counts per rule.

Outputs, in a new directory (--out, default <run>/eval; eval1, eval2, ... if taken, nothing is overwritten):
metrics.csv, metrics.json (with a summary), metrics.md, traits.png, calibration.png, samples.md (5 generated
reports beside their references), language.json (BLEU-4 and ROUGE-L: secondary, they reward wording).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from echovlm import consistency
from echovlm.baselines import fit_probe, from_neighbours
from echovlm.checkpoint import load_model
from echovlm.clinical import extract_labels
from echovlm.common import autodetect_device, fail, print0
from echovlm.dataset import open_dataset
from echovlm.echoprime import load_echoprime_rules
from echovlm.engine import Engine
from echovlm.eval_outputs import PRIOR_KIND, consistency_sources, fmt_share, write_outputs
from echovlm.faithful import fidelity, prompted_reports
from echovlm.findings import calibration, decide, mean_features
from echovlm.labels import dataset_labels, rules_key
from echovlm.retrieval import nearest_training_studies
from echovlm.reward import RewardWeights, consensus
from echovlm.scoring import label_arrays, score_traits
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, TRAITS

def system_names(knn: int, head: bool = False, base: bool = False) -> tuple[str, ...]:
    """The systems in table order, the kNN baseline last and named by its real k (knn50 with the default)."""
    return ("model", *(("free", "head") if head else ()), *(("base",) if base else ()), "prior", "retrieval",
            "probe", f"knn{knn}")


# ------------------------------------------------------------------ each system: hard labels/values and a score

def from_reports(greedy: list[dict], sampled: list[list[dict]] | None) -> dict:
    """Hard labels and values from one report per study; score = fraction of sampled reports stating a finding."""
    system = {"predicted": label_arrays(greedy), "score": None}
    if sampled is not None:
        system["score"] = {t: np.array([np.mean([d[t] == 1 for d in s]) for s in sampled]) for t in BINARY_TRAITS}
    return system


def permuted(system: dict, source: np.ndarray) -> dict:
    """A system's labels and scores with study i given those of study source[i]."""
    def take(arrays):
        return None if arrays is None else {t: np.asarray(a)[source] for t, a in arrays.items()}

    return {"predicted": take(system["predicted"]), "score": take(system["score"])}


def from_head(decided: dict, labels: list[dict] | None = None) -> dict:
    """The head's probabilities as the score; hard labels and values from the reports' labels when given (the
    prompted report), else the head's own decisions and values (the head alone)."""
    score = {t: decided["prob"][:, j] for j, t in enumerate(BINARY_TRAITS)}
    if labels is not None:
        return {"predicted": label_arrays(labels), "score": score}
    predicted = {t: decided["decision"][:, j] for j, t in enumerate(BINARY_TRAITS)}
    predicted.update({t: decided["value"][:, j] for j, t in enumerate(CONTINUOUS_TRAITS)})
    return {"predicted": predicted, "score": score}


def pick_reports(greedy_text, greedy, sampled_text, sampled, decode: str, weights: RewardWeights | None):
    """(text, labels) of the report per study that --decode gives: the greedy one, or the consensus of the
    greedy and the sampled reports (echovlm.reward.consensus, contradictions counted against a candidate)."""
    if decode == "greedy" or sampled is None:
        return greedy_text, greedy
    texts, labels = [], []
    for g_text, g, s_text, s in zip(greedy_text, greedy, sampled_text, sampled):
        cand_text, cand = [g_text, *s_text], [g, *s]
        i = consensus(cand, weights, np.array([len(consistency.contradictions(t)) for t in cand_text]))
        texts.append(cand_text[i])
        labels.append(cand[i])
    return texts, labels


def generate_reports(engine, embeddings, args, seed: int, what: str, samples: bool = True):
    """(greedy report per study, args.samples sampled reports per study or None, reports generated, seconds)."""
    t0 = time.perf_counter()
    common = dict(max_tokens=args.max_tokens, batch_size=args.batch_size, progress=True)
    print0(f"{what}: greedy reports")
    greedy = [s[0] for s in engine.generate_text(embeddings, temperature=0.0, **common)]
    sampled = None
    if samples and args.samples > 0:
        print0(f"{what}: {args.samples} sampled reports per study at temperature {args.temperature}")
        sampled = engine.generate_text(embeddings, temperature=args.temperature, top_k=args.top_k,
                                       num_samples=args.samples, seed=seed, **common)
    return greedy, sampled, len(greedy) * (1 + (args.samples if sampled is not None else 0)), time.perf_counter() - t0


# ------------------------------------------------------------------ main

SCRIPT = "test_inference"


def check_args(args):
    for flag in ("max_studies", "knn", "bootstrap", "batch_size", "top_k", "max_tokens", "weight_studies",
                 "probe_studies"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(SCRIPT, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("samples", "drafts"):
        if getattr(args, flag) < 0:
            fail(SCRIPT, f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if not args.temperature > 0 or not np.isfinite(args.temperature):  # nan fails every comparison
        fail(SCRIPT, f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.samples == 0 and args.decode == "consensus":
        args.decode = "greedy"  # nothing to take a consensus of: say what was done, not what was asked


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run directory (or a checkpoint .pt file)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to load")
    p.add_argument("--base", help="another run on the same dataset and tokenizer (e.g. the base model --run was "
                                  "fine-tuned from), scored beside it as the system \"base\" on the same studies")
    p.add_argument("--dataset", help="prepared dataset (default: the one the model was trained on)")
    p.add_argument("--max-studies", type=int, default=None, help="score the first N test studies (default: all)")
    p.add_argument("--samples", type=int, default=5,
                   help="sampled free reports per study: the free report's AUROC score and consensus (0: greedy only)")
    p.add_argument("--drafts", type=int, default=4,
                   help="sampled drafts per study where the model's report misstates its prompt or contradicts "
                        "itself, then 3x that for those still wrong (echovlm.faithful; 0: the greedy report only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of those reports")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--max-tokens", type=int, default=None, help="report tokens (default: fill the sequence length)")
    p.add_argument("--decode", default="consensus", choices=["consensus", "greedy"],
                   help="the free report per study that gives its hard labels (the model's report without a head): "
                        "the consensus of the greedy and the sampled reports, or the greedy report (with --samples 0 "
                        "the greedy report is all there is)")
    p.add_argument("--weight-studies", type=int, default=5000,
                   help="training reports whose labels set the consensus's trait weights (prevalences)")
    p.add_argument("--knn", type=int, default=50, help="neighbours averaged by the kNN baseline")
    p.add_argument("--probe-studies", type=int, default=50_000,
                   help="training studies the probe baseline is fitted on (a seeded subsample when the split is larger)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--echoprime-rules", help="label with EchoPrime's per_section.json (file or checkout) (default: the "
                                             "rules the model was trained with)")
    # 256 rows on a CPU too: 1.2x (greedy) to 1.4x (sampled) the reports/s of 64 rows on 2 cores
    p.add_argument("--batch-size", type=int, default=256, help="rows decoded together (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output directory (default: <run>/eval); eval1, eval2, ... when it exists")
    args = p.parse_args(argv)
    check_args(args)

    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    args.out = Path(args.out) if args.out else run_dir / "eval"
    # checked before minutes of generation, not after: the nearest existing folder must take new ones
    existing = next(p for p in [args.out.parent, *args.out.parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail(SCRIPT, f"--out {args.out} cannot be created ({existing} is not a writable folder); pass another --out")

    t_start = time.perf_counter()
    try:
        device = torch.device(autodetect_device(args.device))
    except RuntimeError as e:
        fail(SCRIPT, str(e))
    try:  # rules are checked before the model loads and before any report is generated
        rules = load_echoprime_rules(args.echoprime_rules) if args.echoprime_rules else None
    except (FileNotFoundError, ValueError) as e:
        fail(SCRIPT, f"--echoprime-rules: {e}")
    try:
        model, tokenizer, info = load_model(args.run, device, which=args.which)
    except (FileNotFoundError, ValueError) as e:
        fail(SCRIPT, f"{e} (--run takes a training run directory, with checkpoints/, or a checkpoint .pt file)")
    if not args.echoprime_rules and info.get("rules"):  # by default the rules the model was trained with
        try:
            rules = load_echoprime_rules(info["rules"])
        except (FileNotFoundError, ValueError) as e:
            fail(SCRIPT, f"the model was trained with the rules {info['rules']}: {e}; restore it or pass --echoprime-rules")
    head = info["findings"]
    if head is not None and info.get("rules_key") and rules_key(rules) != info["rules_key"]:
        print0(f"note: the findings head was trained on labels of rules {info['rules_key']}, scored here with "
               f"{rules_key(rules)}: its decisions target the other rules' labels")
    base = None
    if args.base:
        try:
            base = load_model(args.base, device, which=args.which)
        except (FileNotFoundError, ValueError) as e:
            fail(SCRIPT, f"--base {args.base}: {e}")
        differ = [f"{what} {base[2].get(key)} (--run has {info.get(key)})" for key, what in
                  (("dataset", "dataset"), ("tokenizer_dir", "tokenizer")) if base[2].get(key) != info.get(key)]
        if base[0].config.embed_dim != model.config.embed_dim:
            differ.append(f"{base[0].config.embed_dim}-d embeddings (--run reads {model.config.embed_dim}-d)")
        if differ:
            fail(SCRIPT, f"--base {args.base} was trained on other data than --run: {'; '.join(differ)}. Scoring it "
                         "beside --run needs the same dataset and tokenizer")
    dataset = args.dataset or info.get("dataset")
    if not dataset:
        fail(SCRIPT, f"the checkpoint {info['checkpoint']} does not name its dataset; pass --dataset")
    try:
        ds = open_dataset(dataset)
        if ds.embed_dim != model.config.embed_dim:
            fail(SCRIPT, f"{dataset} has {ds.embed_dim}-d embeddings but the model reads {model.config.embed_dim}-d "
                         "ones; pass the dataset it was trained on")
        ids, refs, embeddings = ds.studies("test"), ds.reports("test"), ds.embeddings("test")
        n_train = len(ds.studies("train"))
    except (FileNotFoundError, ValueError) as e:
        fail(SCRIPT, f"the dataset {dataset} cannot be read: {e}")
    n = len(ids) if args.max_studies is None else min(args.max_studies, len(ids))
    if n < 2:
        fail(SCRIPT, f"the test split of {dataset} has {len(ids)} studies; at least 2 are needed")
    if args.knn > n_train:
        print0(f"note: --knn {args.knn} is more than the {n_train} training studies: kNN averages all of them")
        args.knn = n_train
    ids, refs, embeddings = ids[:n], refs[:n], embeddings[:n]
    print0(f"scoring {n} test studies of {dataset} with {info['checkpoint']} (step {info.get('step')}) on {device}"
           f"{'' if head is not None else ' (no findings head: free reports only)'}")

    def labels(texts):
        return [extract_labels(t, rules) for t in texts]

    all_labels = dataset_labels(ds, rules)  # cached beside the dataset, computed in parallel when missing
    reference = label_arrays({t: all_labels[slice(*ds._split("test")), j][:n] for j, t in enumerate(TRAITS)})
    train = {t: all_labels[slice(*ds._split("train")), j] for j, t in enumerate(TRAITS)}
    prevalence = {t: float(np.nanmean(train[t])) if (~np.isnan(train[t])).any() else 0.5 for t in BINARY_TRAITS}
    train_reports = ds.reports("train")
    weights = RewardWeights.from_labels([{t: (None if np.isnan(train[t][i]) else train[t][i]) for t in TRAITS}
                                         for i in range(min(args.weight_studies, n_train))])
    # prior: study order[j] gets the embeddings of order[j+1], a shuffle in which no study keeps its own
    order = np.random.default_rng(args.seed).permutation(n)
    source = np.empty(n, dtype=np.int64)
    source[order] = np.roll(order, -1)
    features = mean_features(embeddings)

    engine = Engine(model, tokenizer)
    systems, texts, extra, gen_n, gen_s = {}, {}, {}, 0, 0.0
    gen = dict(max_tokens=args.max_tokens, batch_size=args.batch_size, progress=True)

    def model_system(eng, decider, embs, seed, what):
        """(system, texts, labels, generated, seconds, decisions) of one model's default report on embs."""
        nonlocal gen_n, gen_s
        if decider is None:  # a model without a head: its free report is what a user gets
            g_text, s_text, c, sec = generate_reports(eng, embs, args, seed, what)
            s_lab = None if s_text is None else [labels(x) for x in s_text]
            text, lab = pick_reports(g_text, labels(g_text), s_text, s_lab, args.decode, weights)
            gen_n, gen_s = gen_n + c, gen_s + sec
            return from_reports(lab, s_lab), text, lab, None
        t0 = time.perf_counter()
        decided = decide(decider, mean_features(embs))
        print0(f"{what}: reports prompted with the findings head's decisions")
        text, lab, c = prompted_reports(eng, embs, decided["codes"], decided["values"], labels, retries=args.drafts,
                                        temperature=args.temperature, seed=seed, top_k=args.top_k, **gen)
        gen_n, gen_s = gen_n + c, gen_s + time.perf_counter() - t0
        return from_head(decided, lab), text, lab, decided

    systems["model"], texts["model"], model_labels, decided = model_system(engine, head, embeddings, args.seed, "model")
    decoded = {}
    if head is not None:
        extra["fidelity"] = fidelity(model_labels, decided["codes"], decided["values"])
        f = extra["fidelity"]
        print0(f"fidelity: {fmt_share(f['findings']['agree'])} of prompted findings stated as prompted; "
               + ", ".join(f"{t} within {f['tolerance']:g} in {fmt_share(f[t]['within'])}" for t in CONTINUOUS_TRAITS))
        extra["calibration"] = calibration(np.stack([reference[t] for t in BINARY_TRAITS], 1).ravel(),
                                           decided["prob"].ravel())
        systems["head"] = from_head(decided)
        g_text, s_text, c, sec = generate_reports(engine, embeddings, args, args.seed, "free")
        gen_n, gen_s = gen_n + c, gen_s + sec
        g_lab = labels(g_text)
        s_lab = None if s_text is None else [labels(x) for x in s_text]
        for decode in ("greedy", "consensus") if s_lab is not None else ("greedy",):
            _, chosen = pick_reports(g_text, g_lab, s_text, s_lab, decode, weights)
            decoded[decode] = score_traits(reference, chosen, None, args.bootstrap, args.seed)[1]["core_metric_hard"]
        texts["free"], free_labels = pick_reports(g_text, g_lab, s_text, s_lab, args.decode, weights)
        systems["free"] = from_reports(free_labels, s_lab)
        print0("free report's hard Core Metric by decoding: " + ", ".join(f"{k} {v:.4f}" for k, v in decoded.items()))
    if base is not None:  # the same studies and seed, so the two models' reports differ only by their weights
        systems["base"], texts["base"], _, _ = model_system(Engine(base[0], base[1]), base[2]["findings"], embeddings,
                                                            args.seed, "base")
    systems["prior"], texts["prior"] = permuted(systems["model"], source), [texts["model"][j] for j in source]

    print0(f"retrieval: the {args.knn} nearest training studies of each test study")
    query = torch.from_numpy(features).to(device)
    neighbours, _ = nearest_training_studies(ds, query, args.knn, device)
    texts["retrieval"] = [train_reports[i] for i in neighbours[:, 0]]
    systems["retrieval"] = {"predicted": {t: train[t][neighbours[:, 0]] for t in TRAITS}, "score": None}
    names = system_names(args.knn, head is not None, base is not None)
    systems[names[-1]] = from_neighbours(train, neighbours, prevalence)
    t0 = time.perf_counter()
    systems["probe"], extra["probe_studies"] = fit_probe(mean_features(ds.embeddings("train")), train, features,
                                                         args.probe_studies, args.seed, prevalence)
    print0(f"probe: fitted on {extra['probe_studies']:,} training studies in {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    checked = {name: texts[name] for name in consistency_sources(names) if name != "reference"}
    checked["reference"] = refs
    contradictions = {name: consistency.count(t) for name, t in checked.items()}
    consistency_rate = len(checked) * n / (time.perf_counter() - t0)
    print0(f"consistency: {len(checked) * n} reports checked at {consistency_rate:.0f} reports/s")

    print0(f"scoring: {args.bootstrap} bootstrap resamples")
    tables, summaries = [], {}
    for name in names:
        table, summary = score_traits(reference, systems[name]["predicted"], systems[name]["score"], args.bootstrap,
                                      args.seed)
        tables.append(table.assign(system=name))
        summaries[name] = summary
    table = pd.concat(tables, ignore_index=True)
    table = table[["system"] + [c for c in table.columns if c != "system"]]
    elapsed = time.perf_counter() - t_start
    summary = {"core_metric": {s: summaries[s]["core_metric"] for s in names},
               "core_metric_hard": {s: summaries[s]["core_metric_hard"] for s in names}, "knn_system": names[-1],
               "contradictions_per_1000": {s: contradictions[s]["per_1000"] for s in consistency_sources(names)},
               "contradictions": contradictions, "consistency_reports_per_s": round(consistency_rate, 1),
               "findings_head": head is not None, "fidelity": extra.get("fidelity"),
               "calibration": extra.get("calibration"), "probe_studies": extra["probe_studies"],
               "decode": args.decode, "free_core_metric_hard_by_decoding": decoded,
               "traits_na": summaries["model"]["traits_na"], "n_studies": n, "samples_k": args.samples,
               "drafts": args.drafts if head is not None else None,
               "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed, "knn": args.knn,
               "bootstrap": args.bootstrap, "prior": PRIOR_KIND,
               "rules": rules.source if rules else "echovlm.clinical", "elapsed_s": round(elapsed, 1),
               "generated_reports": gen_n, "generation_s": round(gen_s, 1),
               "generation_reports_per_s": round(gen_n / gen_s, 2) if gen_s else None, "checkpoint": info["checkpoint"],
               "step": info.get("step"), "dataset": str(dataset), "device": str(device),
               "base_checkpoint": base[2]["checkpoint"] if base is not None else None}
    results = {"summary": summary, "traits": json.loads(table.to_json(orient="records"))}

    try:
        out = write_outputs(args, n, ids, refs, table, summaries, results, names, texts, extra)
    except OSError as e:
        fail(SCRIPT, f"writing the evaluation failed ({e}); nothing was overwritten, free space or pass --out", 1)
    md = (out / "metrics.md").read_text()
    print0(md)
    print0(f"wrote {out} in {elapsed:.0f}s ({summary['generation_reports_per_s']} reports/s generated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
