"""What scripts.test_inference writes into its evaluation directory: metrics.md (the tables a person reads),
traits.png (AUROC per finding and R^2 per value, with CIs, every system side by side), calibration.png (the
findings head's reliability), samples.md (generated reports beside their references) and language.json
(BLEU-4 and ROUGE-L, secondary: they reward wording). The numbers come computed: nothing here scores.
"""

import io
from pathlib import Path

import numpy as np
import pandas as pd

from echovlm import consistency
from echovlm.common import atomic_write_bytes, atomic_write_json, atomic_write_text, new_run_dir
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS

PRIOR_KIND = "report of another test study (seeded shuffle, none keeps its own)"
HARD_ONLY = ("retrieval",)  # systems without a continuous score


def consistency_sources(systems: tuple[str, ...]) -> tuple[str, ...]:
    """The reports whose contradictions are counted: generated, retrieved and the references (the floor)."""
    return (*[s for s in systems if s in ("model", "free", "base", "prior", "retrieval")], "reference")


def fmt_ci(row, metric: str, spec: str = ".3f") -> str:
    v = row[metric]
    if pd.isna(v):
        return "N/A"
    return f"{v:{spec}} ({row[metric + '_lo']:{spec}}-{row[metric + '_hi']:{spec}})"


def markdown_tables(table: pd.DataFrame, summaries: dict, systems: tuple[str, ...], contradictions: dict,
                    extra: dict) -> str:
    rows = {(r.system, r.trait): r._asdict() for r in table.itertuples(index=False)}
    sources = consistency_sources(systems)
    cols = [(s, m) for s in systems for m in (("auroc_hard",) if s in HARD_ONLY else ("auroc", "auroc_hard"))]
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
    fid = extra.get("fidelity")
    if fid:
        lines += ["", "| Fidelity of the model's report to its findings prompt | value |", "|---|---|",
                  f"| (study, finding) pairs stated as prompted | **{fmt_share(fid['findings']['agree'])}** of "
                  f"{fid['findings']['pairs']:,} |"]
        lines += [f"| {t} within {fid['tolerance']:g} of the prompted value | **{fmt_share(fid[t]['within'])}** of "
                  f"{fid[t]['reports']:,} reports ({fid[t]['not_stated']} not stated) |" for t in CONTINUOUS_TRAITS]
        cal = extra["calibration"]
        lines += [f"| findings head: expected calibration error on these studies ({cal['pairs']:,} pairs, "
                  f"{len(cal['bins'])} bins) | {cal['ece']:.4f} |"]
    lines += ["", "| Contradictions (echovlm.consistency) | " + " | ".join(sources) + " |",
              "|---" * (len(sources) + 1) + "|",
              "| per 1,000 reports | " + " | ".join(f"**{contradictions[s]['per_1000']:.1f}**" for s in sources) + " |",
              "| reports with any | " + " | ".join(f"{contradictions[s]['reports_with_any']}" for s in sources) + " |"]
    lines += [f"| {rule} | " + " | ".join(str(contradictions[s]["per_rule"][rule]) for s in sources) + " |"
              for rule in consistency.RULES]
    score_of = ("the findings head's probability" if "head" in systems
                else "the fraction of sampled reports stating the finding")
    lines += ["", f"AUROC: from the continuous score (model, prior: {score_of}; free: fraction of sampled free reports "
              "stating the finding; head: its probability; probe: its probability; kNN: mean neighbour label); "
              "retrieval has hard labels only. Hard: AUROC of 0/1 labels, i.e. balanced accuracy (model, free, prior: "
              "what the report states; head: its decisions; probe and kNN: score above the training prevalence). "
              f"95% bootstrap CIs in brackets. Prior: the model's {PRIOR_KIND}. Probe fitted on "
              f"{extra['probe_studies']:,} training studies. Contradictions: in the reports each system gives and the "
              "reference report of each study; the reference's rate is the floor."]
    return "\n".join(lines) + "\n"


def fmt_share(x) -> str:
    return "N/A" if x is None else f"{x:.2%}"


def save_png(fig, path: Path):
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_calibration(path: Path, calibration: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration["bins"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    ax.plot([b["mean_prob"] for b in bins], [b["frequency"] for b in bins], "o-", label="findings head")
    for b in bins:
        ax.annotate(f"{b['n']:,}", (b["mean_prob"], b["frequency"]), fontsize=7, textcoords="offset points",
                    xytext=(4, -10))
    ax.set_xlabel("predicted probability (bin mean)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"reliability over (study, finding) pairs, ECE {calibration['ece']:.4f}", fontsize=9)
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot_traits(path: Path, table: pd.DataFrame, systems: tuple[str, ...]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[(table.system == "model") & (table.kind == "binary") & (table.status == "ok")].trait.tolist()
    series = [(s, "auroc_hard" if s in HARD_ONLY else "auroc") for s in systems]
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
    save_png(fig, path)


def rouge_l(reference: list[str], hypothesis: list[str]) -> float:
    """ROUGE-L F1 of two token lists, as rouge_score computes it, with rapidfuzz's LCS: rouge_score's pure-Python
    LCS table took 48 of a 500-study evaluation's 200 s (2 cores); this takes about one."""
    from rapidfuzz.distance import LCSseq

    if not reference or not hypothesis:
        return 0.0
    lcs = LCSseq.similarity(reference, hypothesis)
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return 2 * precision * recall / (precision + recall) if lcs else 0.0


def language_metrics(hypotheses: dict[str, list[str]], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score.tokenizers import DefaultTokenizer

    words = DefaultTokenizer().tokenize  # rouge_score's own: lower case, runs of letters and digits
    ref_words = [words(r) for r in references]
    out = {"note": "secondary: n-gram overlap rewards wording, not correct findings; the clinical table is the result"}
    for name, hyps in hypotheses.items():
        rouge = np.mean([rouge_l(r, words(h)) for r, h in zip(ref_words, hyps)])
        out[name] = {"bleu4": round(sacrebleu.corpus_bleu(hyps, [references]).score, 3), "rougeL_f": round(float(rouge), 4)}
    return out


def write_outputs(args, n, ids, refs, table, summaries, results, names, texts: dict[str, list[str]], extra: dict) -> Path:
    """metrics.csv/json/md, traits.png, calibration.png, samples.md and language.json in a new directory."""
    summary = results["summary"]
    out = new_run_dir(args.out.parent, args.out.name)
    atomic_write_text(out / "metrics.csv", table.to_csv(index=False))
    atomic_write_json(out / "metrics.json", results)  # NaN -> null in the traits' records
    md = markdown_tables(table, summaries, names, summary["contradictions"], extra)
    drafts = (f", {args.drafts} + {3 * args.drafts} drafts where needed" if extra.get("fidelity") and args.drafts
              else "")
    atomic_write_text(out / "metrics.md", md + f"\n{n} test studies, K={args.samples} free samples{drafts} at "
                      f"temperature {args.temperature}, seed {args.seed}; {summary['generated_reports']} reports generated at "
                      f"{summary['generation_reports_per_s']} reports/s; {summary['elapsed_s']:.0f}s in all.\n")
    plot_traits(out / "traits.png", table, names)
    if extra.get("calibration"):
        plot_calibration(out / "calibration.png", extra["calibration"])
    samples = ["# Generated reports beside their references", ""]
    for i in range(min(5, n)):
        samples += [f"## Test study {ids[i]}", ""]
        for name, t in texts.items():
            if name in ("model", "free"):
                samples += [f"Generated ({name}{', ' + summary['decode'] if name == 'free' or 'free' not in texts else ''}):",
                            "", "```", t[i], "```", ""]
        samples += ["Reference:", "", "```", refs[i], "```", ""]
    atomic_write_text(out / "samples.md", "\n".join(samples))
    atomic_write_json(out / "language.json", language_metrics(texts, refs))
    return out
