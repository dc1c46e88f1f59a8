"""The report card: report.md in a run directory, assembled only from what the pipeline steps wrote there.

Nothing is recomputed here: every number on the card is read from a step's own output file, so the card
cannot disagree with the logs. A missing file is shown as missing, never filled in.

    python -m echovlm.report RUN_DIR --machine            # record the machine (speedrun does this first)
    python -m echovlm.report RUN_DIR [--wall-seconds S] [--gpu-hourly-usd 3.0]
"""

import argparse
import csv
import json
import os
import platform
import sys
from pathlib import Path


def machine_info() -> dict:
    import torch  # only here: the card itself needs no torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_text(path: Path):
    try:
        return path.read_text()
    except OSError:
        return None


def fmt(x, spec=".4f"):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return format(x, spec)
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def step_times(run: Path) -> list[tuple[str, int]]:
    rows = []
    try:
        with open(run / "steps.tsv") as f:
            for row in csv.reader(f, delimiter="\t"):
                if len(row) == 2:
                    rows.append((row[0], int(row[1])))
    except OSError:
        pass
    return rows


def latest(run: Path, name: str) -> Path:
    """A step's output dir; if it was re-made (eval1, ...) the newest one is the run's."""
    candidates = sorted(run.glob(f"{name}*"), key=lambda p: p.stat().st_mtime)
    candidates = [p for p in candidates if p.is_dir() and (p.name == name or p.name[len(name):].isdigit())]
    return candidates[-1] if candidates else run / name


def eval_summary_row(label: str, eval_dir: Path, system: str = "model") -> str | None:
    """One evaluation's headline as a table row (see EVAL_SUMMARY_HEADER), None when its metrics.json is missing.

    One row per (eval directory, system): the fine-tuned model ("model") and the run it started from ("base",
    scored by test_inference --base on the same studies) are two rows of one evaluation. The strongest simple
    baselines of the same evaluation (the probe and kNN, hard labels at the training prevalence) sit beside it."""
    metrics = read_json(Path(eval_dir) / "metrics.json")
    if not metrics or "summary" not in metrics:
        return None
    s = metrics["summary"]
    knn = s.get("knn_system")
    core, hard = s.get("core_metric") or {}, s.get("core_metric_hard") or {}
    r2 = {(t.get("system"), t.get("trait")): t.get("r2") for t in metrics.get("traits") or []}
    rate = s.get("contradictions_per_1000") or {}
    if system not in core:
        return None
    fid = (s.get("fidelity") or {}) if system == "model" else {}
    cells = [label, fmt(core.get(system), ".3f"), fmt(hard.get(system), ".3f"), fmt(hard.get("free"), ".3f"),
             f"{fmt(core.get('probe'), '.3f')} / {fmt(hard.get('probe'), '.3f')}",
             f"{fmt(core.get(knn), '.3f')} / {fmt(hard.get(knn), '.3f')} ({knn or 'n/a'})",
             fmt(r2.get((system, "ejection_fraction")), ".3f"),
             fmt((fid.get("findings") or {}).get("agree"), ".2%"), fmt((fid.get("ejection_fraction") or {}).get("within"), ".2%")]
    cells += [fmt(rate.get(k), ".1f") for k in (system, "reference")]
    return "| " + " | ".join(cells) + " |"


EVAL_SUMMARY_HEADER = ["| eval | Core Metric (score) | Core Metric (hard) | free report (hard) | probe (score / hard) | "
                       "kNN (score / hard) | LVEF R^2 | fidelity: findings | fidelity: LVEF within 2 | "
                       "contradictions / 1,000: model | reference (floor) |",
                       "|---|---|---|---|---|---|---|---|---|---|---|"]


def eval_summary_table(evals: list[tuple]) -> list[str]:
    """Headline rows side by side, one per (label, eval dir[, system]) (e.g. base and fine-tuned), or a note when
    none has one."""
    rows = [r for r in (eval_summary_row(*e) for e in evals) if r]
    return EVAL_SUMMARY_HEADER + rows if rows else ["- metrics.json missing (evaluation did not finish)"]


def build_card(run: Path, wall_seconds: int | None = None, gpu_hourly_usd: float = 3.0) -> str:
    run = Path(run)
    lines = [f"# echovlm report card: `{run.name}`", ""]
    machine = read_json(run / "machine.json") or {}
    gpus = machine.get("gpus") or []
    lines += ["## Machine", "",
              f"- GPUs: {len(gpus)}" + (f" x {gpus[0]}" if gpus else " (CPU run)"),
              f"- CUDA {fmt(machine.get('cuda'))}, torch {fmt(machine.get('torch'))}, Python {fmt(machine.get('python'))}, "
              f"{fmt(machine.get('cpu_count'))} CPU cores", ""]

    dataset = Path(read_text(run / "dataset").strip()) if read_text(run / "dataset") else None
    source = (read_text(run / "source") or "unknown").strip()
    meta = read_json(dataset / "meta.json") if dataset else None
    lines += ["## Data", "", f"- source: **{source}**" + (" (simulated studies, not real echocardiograms)" if source == "synthetic" else "")]
    if meta:
        counts = meta.get("counts") or {}
        lines += [f"- dataset: `{dataset}`; studies per split: " + ", ".join(f"{k} {fmt(v)}" for k, v in counts.items()),
                  f"- embedding dim: {fmt(meta.get('embed_dim'))}"]
    else:
        lines += ["- dataset meta.json missing"]
    lines += [""]

    # the tokenizer the model was trained with (tokenizer directories are keyed by vocabulary size)
    tok_dir = (read_json(run / "model" / "config.json") or {}).get("tokenizer_dir")
    tok = read_json(Path(tok_dir) / "tok_stats.json") if tok_dir else None
    lines += ["## Tokenizer", ""]
    if tok:
        lines += [f"- vocab {fmt(tok.get('vocab_size'))} (rustbpe, trained in {fmt(tok.get('train_seconds'), '.2f')} s)",
                  f"- compression: {fmt(tok.get('chars_per_token'), '.2f')} chars/token, {fmt(tok.get('bytes_per_token'), '.2f')} bytes/token",
                  f"- tokens per report: mean {fmt(tok.get('tokens_per_report_mean'), '.1f')}, max {fmt(tok.get('tokens_per_report_max'))}"]
    else:
        lines += ["- tok_stats.json missing"]
    tok_eval = run / "tok_eval"
    for png in sorted(tok_eval.glob("*.png")):
        lines += ["", f"![tokenizer sweep]({png.relative_to(run)})"]
    lines += [""]

    model_dir = run / "model"
    summary = read_json(model_dir / "train_summary.json")
    config = read_json(model_dir / "config.json") or {}
    lines += ["## Model and training", ""]
    if summary:
        lines += [f"- parameters: {fmt(summary.get('params'))}, depth {fmt((config.get('model') or {}).get('depth'))}",
                  f"- steps: {fmt(summary.get('steps'))}, training time {fmt(summary.get('train_seconds'), '.0f')} s",
                  f"- throughput: {fmt(summary.get('tokens_per_sec'), ',.0f')} real tokens/s in "
                  f"{fmt(((config.get('args') or {}).get('flags') or {}).get('dtype'))}, "
                  f"MFU {fmt(summary.get('mfu'), '.1%')}, padding {fmt(summary.get('padding_fraction'), '.1%')}",
                  f"- val bpb: final {fmt(summary.get('final_val_bpb'))}, best {fmt(summary.get('best_val_bpb'))}"]
    else:
        lines += ["- train_summary.json missing (training did not finish)"]
    for png in sorted(model_dir.glob("*.png")):
        lines += ["", f"![{png.stem}]({png.relative_to(run)})"]
    lines += [""]

    rl_dir = run / "rl"
    rl = read_json(rl_dir / "train_summary.json")
    if rl or rl_dir.is_dir():
        lines += ["## Clinical-reward fine-tuning (rl_train)", ""]
        if rl:
            lines += [f"- steps: {fmt(rl.get('steps'))}, training time {fmt(rl.get('train_seconds'), '.0f')} s, "
                      f"{fmt(rl.get('reports_per_sec'), '.1f')} sampled reports/s",
                      f"- mean reward of the sampled reports: first step {fmt(rl.get('first_reward'))}, "
                      f"last step {fmt(rl.get('last_reward'))}",
                      f"- val reward (greedy reports of the fixed val subset): base {fmt(rl.get('start_val_reward'))}, "
                      f"best {fmt(rl.get('best_val_reward'))} (the checkpoint kept), final {fmt(rl.get('final_val_reward'))}"]
        else:
            lines += ["- train_summary.json missing (fine-tuning did not finish)"]
        for png in sorted(rl_dir.glob("*.png")):
            lines += ["", f"![rl {png.stem}]({png.relative_to(run)})"]
        lines += [""]

    eval_dir = latest(run, "eval")
    lines += ["## Clinical evaluation (test split)", ""]
    lines += eval_summary_table([("base", eval_dir, "base"), ("fine-tuned" if rl_dir.is_dir() else "model", eval_dir)])
    lines += ["", "Rows of one evaluation score the same test studies with the same bootstrap resamples; in the tables "
              "below, \"model\" is the model the run ends with and \"base\" the one it was fine-tuned from.", ""]
    metrics_md = read_text(eval_dir / "metrics.md")
    lines += [metrics_md.strip() if metrics_md else "- metrics.md missing (evaluation did not finish)", ""]
    for png in sorted(eval_dir.glob("*.png")):
        lines += [f"![{png.stem}]({png.relative_to(run)})", ""]
    language = read_json(eval_dir / "language.json")
    if language:
        lines += ["Language metrics (secondary to the clinical table):", "", "```", json.dumps(language, indent=1), "```", ""]
    samples = read_text(eval_dir / "samples.md")
    if samples:
        # samples.md has its own title: the card's section heading replaces it
        body = samples.strip().split("\n", 1)[-1] if samples.startswith("# ") else samples.strip()
        lines += ["## Sample reports (generated beside the reference)", "", body.replace("\n## ", "\n### ").strip(), ""]

    gen = read_json(latest(run, "generate") / "report.json")
    if gen:
        lines += ["## Report for one study (scripts.generate_report)", "", "```", gen.get("report", ""), "```", ""]

    times = step_times(run)
    total = sum(t for _, t in times)
    n_gpu = max(len(gpus), 1)
    lines += ["## Time and cost", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {name} | {t:,} |" for name, t in times]
    lines += [f"| **all steps** | **{total:,}** |", ""]
    if wall_seconds is not None:
        lines += [f"- wall time of the last `speedrun.sh` invocation (set-up included): {wall_seconds:,} s"]
    if gpus:
        lines += [f"- estimated cost: {total / 3600:.2f} h x {n_gpu} GPU x ${gpu_hourly_usd:.2f}/GPU-hour = "
                  f"**${total / 3600 * n_gpu * gpu_hourly_usd:.2f}**"]
    else:
        lines += ["- CPU run: no GPU cost"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory made by speedrun.sh")
    p.add_argument("--machine", action="store_true", help="record machine.json (GPU, CUDA, torch) and exit")
    p.add_argument("--wall-seconds", type=int, default=None)
    p.add_argument("--gpu-hourly-usd", type=float, default=3.0)
    args = p.parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        print(f"report: {run} is not a directory", file=sys.stderr)
        return 1
    if args.machine:
        (run / "machine.json").write_text(json.dumps(machine_info(), indent=2) + "\n")
        return 0
    card = build_card(run, args.wall_seconds, args.gpu_hourly_usd)
    (run / "report.md").write_text(card)
    print(f"wrote {run / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
