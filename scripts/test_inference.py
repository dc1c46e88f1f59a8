"""Clinical evaluation on the test split: what do the generated reports say, and is it right?

    python -m scripts.test_inference --run runs/speedrun/model                    # all test studies
    python -m scripts.test_inference --run RUN --max-studies 2000 --samples 5 --out RUN/eval

Every report, generated or reference, goes through the same label extractor (echovlm.clinical; or
EchoPrime's own phrase rules with --echoprime-rules), and the labels are compared trait by trait, on the
same studies, for four systems:

  model      hard label: the label of the one report per study a user would get (--decode: consensus, the
             sampled or greedy report that agrees best with the others under the clinical reward, or
             greedy). Score: the fraction of --samples reports sampled at --temperature that state the
             finding, a continuous score so that AUROC can rank studies.
  prior      the same model fed another test study's embeddings (a seeded shuffle that leaves no study with
             its own): what the model writes without knowing the study. Beating it shows the prefix is read.
  retrieval  the report of the nearest training study by cosine similarity of mean embeddings, as EchoPrime
             does. It gives hard labels only, so its AUROC is its balanced accuracy.
  knn{k}     the mean label of the --knn k nearest training studies as the score; the majority as hard label
             (named by its k everywhere: knn50 with the default).

Binary traits: AUROC of the score and of the hard 0/1 label (= balanced accuracy, the number the reference
system reports), with 95% bootstrap CIs over studies (the same resamples for every system). A trait with
no positive or no negative study is N/A. LVEF and PASP: R^2 and MAE of the decoded (or retrieved, or
neighbour-mean) value; studies where either side states no value are dropped and counted. Core Metric, as
in EchoPrime's tables: the mean over traits of AUROC (binary) and R^2 (continuous); "hard" uses hard AUROC.

Consistency (echovlm.consistency): contradictions one report holds about itself (LVEF against the stated
systolic function, a finding stated and denied, two severities, impossible numbers, a repeated section), per
1,000 decoded reports of the model and the prior, retrieved reports and the reference reports themselves (the
floor: what the real reports do), with counts per rule.

Outputs, in a new directory (--out, default <run>/eval; eval1, eval2, ... if taken, nothing is overwritten):
metrics.csv, metrics.json (with a summary), metrics.md, traits.png, samples.md (5 generated reports beside
their references), language.json (BLEU-4 and ROUGE-L: secondary, they reward wording, not findings).
"""

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from echovlm import consistency
from echovlm.checkpoint import load_model
from echovlm.clinical import extract_labels
from echovlm.common import (atomic_write_bytes, atomic_write_json, atomic_write_text, autodetect_device, fail,
                            new_run_dir, print0)
from echovlm.dataset import open_dataset
from echovlm.echoprime import load_echoprime_rules
from echovlm.engine import Engine
from echovlm.retrieval import nearest_training_studies
from echovlm.reward import RewardWeights, consensus
from echovlm.scoring import label_arrays, score_traits
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, TRAITS

# rows decoded together, per device
DEVICE_DEFAULTS = {"cuda": dict(batch_size=256), "cpu": dict(batch_size=64)}
PRIOR_KIND = "the embeddings of another test study (seeded shuffle, none keeps its own)"


def system_names(knn: int, base: bool = False) -> tuple[str, ...]:
    """The systems, the kNN baseline last and named by its real k (knn50 with the default --knn); "base" (the
    run --base names, e.g. the model before fine-tuning) after the model when given."""
    return ("model", *(("base",) if base else ()), "prior", "retrieval", f"knn{knn}")


def consistency_sources(systems: tuple[str, ...]) -> tuple[str, ...]:
    """The reports whose contradictions are counted: generated, retrieved and the references (the floor)."""
    return (*systems[:-1], "reference")


# ------------------------------------------------------------------ each system: hard labels/values and a score

def from_reports(greedy: list[dict], sampled: list[list[dict]] | None) -> dict:
    """Hard labels and values from one report per study; score = fraction of sampled reports stating a finding."""
    system = {"predicted": label_arrays(greedy), "score": None}
    if sampled is not None:
        system["score"] = {t: np.array([np.mean([d[t] == 1 for d in s]) for s in sampled]) for t in BINARY_TRAITS}
    return system


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


def from_neighbours(train: dict[str, np.ndarray], neighbours: np.ndarray) -> dict:
    """Score = mean label of the neighbours that settle the trait; hard label = majority; value = mean value."""
    def mean_rows(a):
        ok = ~np.isnan(a)
        return np.where(ok.any(1), np.nansum(a, 1) / np.maximum(ok.sum(1), 1), np.nan)

    score = {t: mean_rows(train[t][neighbours]) for t in BINARY_TRAITS}
    predicted = {t: np.where(np.isnan(s), np.nan, (s > 0.5).astype(float)) for t, s in score.items()}
    predicted.update({t: mean_rows(train[t][neighbours]) for t in CONTINUOUS_TRAITS})
    return {"predicted": predicted, "score": score}


def generate_reports(engine, embeddings, args, seed: int, what: str):
    """(greedy report per study, args.samples sampled reports per study or None, reports generated, seconds)."""
    t0 = time.perf_counter()
    common = dict(max_tokens=args.max_tokens, batch_size=args.batch_size, progress=True)
    print0(f"{what}: greedy reports")
    greedy = [s[0] for s in engine.generate_text(embeddings, temperature=0.0, **common)]
    sampled = None
    if args.samples > 0:
        print0(f"{what}: {args.samples} sampled reports per study at temperature {args.temperature}")
        sampled = engine.generate_text(embeddings, temperature=args.temperature, top_k=args.top_k,
                                       num_samples=args.samples, seed=seed, **common)
    return greedy, sampled, len(greedy) * (1 + args.samples), time.perf_counter() - t0


# ------------------------------------------------------------------ outputs

def fmt_ci(row, metric: str, spec: str = ".3f") -> str:
    v = row[metric]
    if pd.isna(v):
        return "N/A"
    return f"{v:{spec}} ({row[metric + '_lo']:{spec}}-{row[metric + '_hi']:{spec}})"


def markdown_tables(table: pd.DataFrame, summaries: dict, systems: tuple[str, ...], contradictions: dict) -> str:
    rows = {(r.system, r.trait): r._asdict() for r in table.itertuples(index=False)}
    knn, sources = systems[-1], consistency_sources(systems)
    cols = [(s, m) for s in systems[:-2] for m in ("auroc", "auroc_hard")]
    cols += [("retrieval", "auroc_hard"), (knn, "auroc"), (knn, "auroc_hard")]
    head = ["trait", "n", "positives", "prevalence"] + [f"{s} {'AUROC' if m == 'auroc' else 'hard'}" for s, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for t in BINARY_TRAITS:
        r = rows[("model", t)]
        prevalence = f"{r['positives'] / r['n']:.3f}" if r["n"] else "N/A"
        cells = [fmt_ci(rows[(s, t)], m) for s, m in cols] if r["status"] == "ok" else [r["status"]] * len(cols)
        lines.append(f"| {t} | {r['n']} | {r['positives']:.0f} | {prevalence} | " + " | ".join(cells) + " |")
    lines += ["", "| trait | system | n | dropped | R^2 | MAE |", "|---|---|---|---|---|---|"]
    for t in CONTINUOUS_TRAITS:
        for s in systems:
            r = rows[(s, t)]
            lines.append(f"| {t} | {s} | {r['n']} | {r['dropped']} | {fmt_ci(r, 'r2')} | {fmt_ci(r, 'mae', '.2f')} |")
    lines += ["", "| Core Metric (mean AUROC and R^2 over traits) | " + " | ".join(systems) + " |",
              "|---" * (len(systems) + 1) + "|"]
    for key, label in (("core_metric", "from the score"), ("core_metric_hard", "from the hard labels")):
        vals = [summaries[s][key] for s in systems]
        lines.append(f"| {label} | " + " | ".join("N/A" if v is None else f"**{v:.3f}**" for v in vals) + " |")
    lines += ["", "| Contradictions (echovlm.consistency) | " + " | ".join(sources) + " |",
              "|---" * (len(sources) + 1) + "|",
              "| per 1,000 reports | " + " | ".join(f"**{contradictions[s]['per_1000']:.1f}**" for s in sources) + " |",
              "| reports with any | " + " | ".join(f"{contradictions[s]['reports_with_any']}" for s in sources) + " |"]
    lines += [f"| {rule} | " + " | ".join(str(contradictions[s]["per_rule"][rule]) for s in sources) + " |"
              for rule in consistency.RULES]
    lines += ["", "AUROC: from the continuous score (model/prior: fraction of sampled reports stating the finding; "
              "kNN: mean neighbour label); retrieval has hard labels only. Hard: AUROC of 0/1 labels, i.e. balanced "
              f"accuracy. 95% bootstrap CIs in brackets. Prior: the model given {PRIOR_KIND}. Contradictions: in the "
              "decoded report (model, base, prior), the retrieved report and the reference report of each study; the "
              "reference's rate is the floor."]
    return "\n".join(lines) + "\n"


def plot_traits(path: Path, table: pd.DataFrame, systems: tuple[str, ...]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[(table.system == "model") & (table.kind == "binary") & (table.status == "ok")].trait.tolist()
    series = [(s, "auroc") for s in systems[:-2]] + [("retrieval", "auroc_hard"), (systems[-1], "auroc")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 0.4 * max(len(ok), 4) + 2), gridspec_kw={"width_ratios": [3, 1]})
    h, y = 0.8 / len(series), np.arange(len(ok))
    for i, (s, m) in enumerate(series):
        r = table[table.system == s].set_index("trait").loc[ok]
        # a percentile CI need not contain the point estimate on a few studies (resamples with one class are
        # dropped), and matplotlib refuses negative error bars: draw those sides as zero
        err = np.nan_to_num(np.clip([r[m] - r[m + "_lo"], r[m + "_hi"] - r[m]], 0.0, None))
        ax.barh(y + i * h, r[m], h, xerr=err, capsize=2,
                label=f"{s} ({'score' if m == 'auroc' else 'hard labels'})")
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y + 0.4 - h / 2, ok, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("AUROC (95% CI)")
    ax.legend(fontsize=8, loc="lower right")
    for j, t in enumerate(CONTINUOUS_TRAITS):
        r2 = table[table.trait == t].set_index("system").loc[list(systems), "r2"].fillna(0.0)
        ax2.bar(np.arange(len(systems)) + j * 0.4, r2, 0.4, label=t)
    ax2.set_xticks(np.arange(len(systems)) + 0.2, systems, fontsize=8)
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_ylabel("R^2 (N/A drawn as 0)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def language_metrics(hypotheses: dict[str, list[str]], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    out = {"note": "secondary: n-gram overlap rewards wording, not correct findings; the clinical table is the result"}
    for name, hyps in hypotheses.items():
        rouge = np.mean([scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hyps)])
        out[name] = {"bleu4": round(sacrebleu.corpus_bleu(hyps, [references]).score, 3), "rougeL_f": round(float(rouge), 4)}
    return out


def write_outputs(args, n, ids, refs, table, summaries, results, names, model_text, prior_text, retrieval_text) -> Path:
    """metrics.csv/json/md, traits.png, samples.md and language.json in a new directory; returns it."""
    summary = results["summary"]
    out = new_run_dir(args.out.parent, args.out.name)
    atomic_write_text(out / "metrics.csv", table.to_csv(index=False))
    atomic_write_json(out / "metrics.json", results)  # NaN -> null in the traits' records
    md = markdown_tables(table, summaries, names, summary["contradictions"])
    atomic_write_text(out / "metrics.md", md + f"\n{n} test studies, K={args.samples} samples at temperature "
                      f"{args.temperature}, seed {args.seed}; {summary['generated_reports']} reports generated at "
                      f"{summary['generation_reports_per_s']} reports/s; {summary['elapsed_s']:.0f}s in all.\n")
    plot_traits(out / "traits.png", table, names)
    samples = ["# Generated reports beside their references", ""]
    for i in range(min(5, n)):
        samples += [f"## Test study {ids[i]}", "", f"Generated ({args.decode}):", "", "```", model_text[i], "```", "",
                    "Reference:", "", "```", refs[i], "```", ""]
    atomic_write_text(out / "samples.md", "\n".join(samples))
    atomic_write_json(out / "language.json", language_metrics(
        {"model": model_text, "prior": prior_text, "retrieval": retrieval_text}, refs))
    return out


# ------------------------------------------------------------------ main

SCRIPT = "test_inference"

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run directory (or a checkpoint .pt file)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to load")
    p.add_argument("--base", help="another run on the same dataset (e.g. the base model --run was fine-tuned from), "
                                  "scored beside it as the system \"base\" on the same studies")
    p.add_argument("--dataset", help="prepared dataset (default: the one the model was trained on)")
    p.add_argument("--max-studies", type=int, default=None, help="score the first N test studies (default: all)")
    p.add_argument("--samples", type=int, default=5, help="sampled reports per study for the AUROC score (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of those reports")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--max-tokens", type=int, default=None, help="report tokens (default: fill the sequence length)")
    p.add_argument("--decode", default="consensus", choices=["consensus", "greedy"],
                   help="the one report per study that gives the hard labels: the consensus of the greedy and the "
                        "sampled reports, or the greedy report (with --samples 0 the greedy report is all there is)")
    p.add_argument("--weight-studies", type=int, default=5000,
                   help="training reports whose labels set the consensus's trait weights (prevalences)")
    p.add_argument("--knn", type=int, default=50, help="neighbours averaged by the kNN baseline")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--echoprime-rules", help="label with EchoPrime's per_section.json (file or checkout) instead of ours")
    p.add_argument("--batch-size", type=int, default=None, help="rows decoded together (default: 256 on CUDA, 64 on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output directory (default: <run>/eval); eval1, eval2, ... when it exists")
    args = p.parse_args(argv)
    for flag in ("max_studies", "knn", "bootstrap", "batch_size", "top_k", "max_tokens", "weight_studies"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(SCRIPT, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.samples < 0:
        fail(SCRIPT, f"--samples must be >= 0, got {args.samples}")
    if not args.temperature > 0 or not np.isfinite(args.temperature):  # nan fails every comparison
        fail(SCRIPT, f"--temperature must be a finite number > 0, got {args.temperature}")

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
    args.batch_size = args.batch_size or DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]["batch_size"]
    try:
        rules = load_echoprime_rules(args.echoprime_rules) if args.echoprime_rules else None
    except (FileNotFoundError, ValueError) as e:
        fail(SCRIPT, f"--echoprime-rules: {e}")
    try:
        model, tokenizer, info = load_model(args.run, device, which=args.which)
    except (FileNotFoundError, ValueError) as e:
        fail(SCRIPT, f"{e} (--run takes a training run directory, with checkpoints/, or a checkpoint .pt file)")
    base = None
    if args.base:
        try:
            base = load_model(args.base, device, which=args.which)
        except (FileNotFoundError, ValueError) as e:
            fail(SCRIPT, f"--base {args.base}: {e}")
        if base[0].config.embed_dim != model.config.embed_dim:
            fail(SCRIPT, f"--base {args.base} reads {base[0].config.embed_dim}-d embeddings, --run "
                         f"{model.config.embed_dim}-d ones: they were not trained on the same dataset")
    dataset = args.dataset or info.get("dataset")
    if not dataset:
        fail(SCRIPT, f"the checkpoint {info['checkpoint']} does not name its dataset; pass --dataset")
    try:
        ds = open_dataset(dataset)
        if ds.embed_dim != model.config.embed_dim:
            fail(SCRIPT, f"{dataset} has {ds.embed_dim}-d embeddings but the model reads {model.config.embed_dim}-d "
                         "ones; pass the dataset it was trained on")
        ids, refs, embeddings = ds.studies("test"), ds.reports("test"), ds.embeddings("test")
    except (FileNotFoundError, ValueError) as e:
        fail(SCRIPT, f"the dataset {dataset} cannot be read: {e}")
    n = len(ids) if args.max_studies is None else min(args.max_studies, len(ids))
    if n < 2:
        fail(SCRIPT, f"the test split of {dataset} has {len(ids)} studies; at least 2 are needed")
    ids, refs, embeddings = ids[:n], refs[:n], embeddings[:n]
    print0(f"scoring {n} test studies of {dataset} with {info['checkpoint']} (step {info.get('step')}) on {device}")

    def labels(texts):
        return [extract_labels(t, rules) for t in texts]

    reference = labels(refs)
    engine = Engine(model, tokenizer)

    model_text, model_samples, gen_n, gen_s = generate_reports(engine, embeddings, args, args.seed, "model")
    # prior: study order[j] gets the embeddings of order[j+1], a shuffle in which no study keeps its own
    order = np.random.default_rng(args.seed).permutation(n)
    source = np.empty(n, dtype=np.int64)
    source[order] = np.roll(order, -1)
    prior_text, prior_samples, c, s = generate_reports(engine, [embeddings[i] for i in source], args, args.seed + 1, "prior")
    gen_n, gen_s = gen_n + c, gen_s + s
    if base is not None:  # the same studies and seed, so the two models' reports differ only by their weights
        base_text, base_samples, c, s = generate_reports(Engine(base[0], base[1]), embeddings, args, args.seed, "base")
        gen_n, gen_s = gen_n + c, gen_s + s

    print0(f"retrieval: the {args.knn} nearest training studies of each test study")
    query = torch.stack([torch.from_numpy(e).mean(0) for e in embeddings]).to(device)
    neighbours, _ = nearest_training_studies(ds, torch.nn.functional.normalize(query, dim=1), args.knn, device)
    train_reports = ds.reports("train")
    needed = np.unique(neighbours)  # only training studies that are someone's neighbour need labels
    train = {t: np.full(len(train_reports), np.nan) for t in TRAITS}
    for t, a in label_arrays(labels([train_reports[i] for i in needed])).items():
        train[t][needed] = a
    retrieval_text = [train_reports[i] for i in neighbours[:, 0]]
    names = system_names(args.knn, base is not None)
    weights = RewardWeights.from_labels(labels(train_reports[:args.weight_studies]))
    model_sampled = None if model_samples is None else [labels(s) for s in model_samples]
    prior_sampled = None if prior_samples is None else [labels(s) for s in prior_samples]
    model_greedy, prior_greedy = labels(model_text), labels(prior_text)
    decoded = {}  # the hard Core Metric of the model under each decoding, so the choice stays measured
    for decode in ("greedy", "consensus") if model_sampled is not None else ("greedy",):
        _, chosen = pick_reports(model_text, model_greedy, model_samples, model_sampled, decode, weights)
        decoded[decode] = score_traits(reference, chosen, None, args.bootstrap, args.seed)[1]["core_metric_hard"]
    model_text, model_labels = pick_reports(model_text, model_greedy, model_samples, model_sampled, args.decode, weights)
    prior_text, prior_labels = pick_reports(prior_text, prior_greedy, prior_samples, prior_sampled, args.decode, weights)
    if base is not None:
        base_sampled = None if base_samples is None else [labels(s) for s in base_samples]
        base_text, base_labels = pick_reports(base_text, labels(base_text), base_samples, base_sampled, args.decode,
                                              weights)
    print0("model's hard Core Metric by decoding: " + ", ".join(f"{k} {v:.4f}" for k, v in decoded.items()))
    systems = {"model": from_reports(model_labels, model_sampled), "prior": from_reports(prior_labels, prior_sampled),
               "retrieval": {"predicted": {t: train[t][neighbours[:, 0]] for t in TRAITS}, "score": None},
               names[-1]: from_neighbours(train, neighbours)}
    if base is not None:
        systems["base"] = from_reports(base_labels, base_sampled)
    t0 = time.perf_counter()
    checked = {"model": model_text, "prior": prior_text, "retrieval": retrieval_text, "reference": refs,
               **({"base": base_text} if base is not None else {})}
    contradictions = {name: consistency.count(texts) for name, texts in checked.items()}
    consistency_rate = len(checked) * n / (time.perf_counter() - t0)
    print0(f"consistency: {len(checked) * n} reports checked at {consistency_rate:.0f} reports/s")

    print0(f"scoring: {args.bootstrap} bootstrap resamples")
    tables, summaries = [], {}
    for name, system in systems.items():
        table, summary = score_traits(reference, system["predicted"], system["score"], args.bootstrap, args.seed)
        tables.append(table.assign(system=name))
        summaries[name] = summary
    table = pd.concat(tables, ignore_index=True)
    table = table[["system"] + [c for c in table.columns if c != "system"]]
    elapsed = time.perf_counter() - t_start
    summary = {"core_metric": {s: summaries[s]["core_metric"] for s in names},
               "core_metric_hard": {s: summaries[s]["core_metric_hard"] for s in names}, "knn_system": names[-1],
               "contradictions_per_1000": {s: contradictions[s]["per_1000"] for s in consistency_sources(names)},
               "contradictions": contradictions, "consistency_reports_per_s": round(consistency_rate, 1),
               "decode": args.decode, "core_metric_hard_by_decoding": decoded,
               "traits_na": summaries["model"]["traits_na"], "n_studies": n, "samples_k": args.samples,
               "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed, "knn": args.knn,
               "bootstrap": args.bootstrap, "prior": PRIOR_KIND,
               "rules": rules.source if rules else "echovlm.clinical", "elapsed_s": round(elapsed, 1),
               "generated_reports": gen_n, "generation_s": round(gen_s, 1),
               "generation_reports_per_s": round(gen_n / gen_s, 2), "checkpoint": info["checkpoint"],
               "step": info.get("step"), "dataset": str(dataset), "device": str(device),
               "base_checkpoint": base[2]["checkpoint"] if base is not None else None}
    results = {"summary": summary, "traits": json.loads(table.to_json(orient="records"))}

    try:
        out = write_outputs(args, n, ids, refs, table, summaries, results, names, model_text, prior_text, retrieval_text)
    except OSError as e:
        fail(SCRIPT, f"writing the evaluation failed ({e}); nothing was overwritten, free space or pass --out", 1)
    md = (out / "metrics.md").read_text()
    print0(md)
    print0(f"wrote {out} in {elapsed:.0f}s ({summary['generation_reports_per_s']} reports/s generated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
