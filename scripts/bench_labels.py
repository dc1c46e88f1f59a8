"""How fast the evaluator's labels are read from reports: one core (the baseline) against a pool of workers.

    python -m scripts.bench_labels                                  # 20,000 synthetic reports, every core
    python -m scripts.bench_labels --dataset data/echoprime --n-reports 50000 --workers 16
    python -m scripts.bench_labels --echoprime-rules ../EchoPrime   # EchoPrime's phrase rules instead of ours

Both runs label the same reports with echovlm.labels.label_matrix (workers=1, then --workers) and must agree bit for
bit. The projection for the EchoPrime release is its report count / (per-core rate of the pooled run x --cores),
assuming linear scaling, once from the wall clock (reports/s / workers) and once from CPU time (reports per CPU
second of the parent and its workers together). On free cores the two agree; on a machine shared with other work
the wall clock counts the waiting too, and the CPU-time figure is what a core of our own would do. Report length
matters as well (the mean is printed; the regexes' cost grows with it): time --dataset on the real reports where you
have them.
"""

import argparse
import os
import sys
import time

import numpy as np

from echovlm.common import fail, print0
from echovlm.dataset import SPLITS, open_dataset
from echovlm.echoprime import PUBLISHED_STUDIES, load_echoprime_rules
from echovlm import synthetic
from echovlm.labels import label_matrix, rules_key

SCRIPT = "bench_labels"
TARGET_SECONDS = 300  # labelling the release must not hold up a speedrun by more than five minutes


def synthetic_reports(n: int) -> tuple[list[str], str]:
    # straight from the generator (seed 0, as prepare_dataset makes them): only the reports are timed
    texts = [t for chunk in synthetic.iter_chunks(n, seed=0, embed_dim=8) for t in chunk.reports]
    return texts, f"synthetic, {n:,} studies"


def dataset_reports(path: str, n: int) -> tuple[list[str], str]:
    ds = open_dataset(path)
    texts = [text for split in SPLITS for text in ds.reports(split)]
    return (texts[:n] if n else texts), str(ds.path)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers, reaped when the pool closes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def best_time(fn, repeats: int):
    """(best wall seconds, best CPU seconds, last result). CPU seconds do not count waiting for a core, so on a
    machine shared with other work they, not the wall clock, tell how fast a core that is ours would go."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        result = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return min(times), min(cpu), result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="prepared dataset whose reports to label (default: a synthetic one built in "
                        "a temporary directory)")
    parser.add_argument("--n-reports", type=int, default=20_000, help="reports to time: the synthetic dataset's size, "
                        "or the first that many of --dataset, 0 for all (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes of the pooled run (default: every core, %(default)s here)")
    parser.add_argument("--echoprime-rules", metavar="PATH", help="EchoPrime's assets/per_section.json (or its "
                        "checkout): time its phrase rules instead of ours")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each, best kept (default: %(default)s)")
    parser.add_argument("--project-reports", type=int, default=PUBLISHED_STUDIES,
                        help="reports to project the time for (default: %(default)s, the EchoPrime release)")
    parser.add_argument("--cores", type=int, default=16, help="cores to project for (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("workers", "repeats", "project_reports", "cores"):
        if getattr(args, flag) < 1:
            fail(SCRIPT, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.n_reports < 0 or (args.n_reports == 0 and not args.dataset):
        fail(SCRIPT, f"--n-reports must be at least 1 (0, all of them, only with --dataset), got {args.n_reports}")
    try:
        rules = load_echoprime_rules(args.echoprime_rules) if args.echoprime_rules else None
        texts, where = dataset_reports(args.dataset, args.n_reports) if args.dataset else synthetic_reports(args.n_reports)
    except (FileNotFoundError, ValueError) as e:
        fail(SCRIPT, str(e))
    if not texts:
        fail(SCRIPT, f"--dataset {args.dataset} holds no reports")
    n = len(texts)
    chars = sum(map(len, texts)) / n
    print0(f"reports: {n:,} ({where}), mean {chars:,.0f} characters; rules {rules_key(rules)}; "
           f"{os.cpu_count()} cores here; best of {args.repeats}")

    serial_s, serial_cpu, serial = best_time(lambda: label_matrix(texts, rules, workers=1), args.repeats)
    pooled_s, pooled_cpu, pooled = best_time(lambda: label_matrix(texts, rules, workers=args.workers), args.repeats)
    if not np.array_equal(serial, pooled, equal_nan=True):
        fail(SCRIPT, f"the {args.workers}-worker labels differ from the serial ones: a bug in echovlm.labels", 1)

    print0(f"{'run':<18} {'workers':>7} {'wall s':>8} {'reports/s':>10} {'per core':>9} {'speed-up':>9} {'cpu s':>8} "
           f"{'per cpu-s':>10}")
    for name, workers, seconds, cpu in [("serial (baseline)", 1, serial_s, serial_cpu),
                                        ("pooled", args.workers, pooled_s, pooled_cpu)]:
        rate = n / seconds
        print0(f"{name:<18} {workers:>7} {seconds:>8.2f} {rate:>10,.0f} {rate / workers:>9,.0f} "
               f"{serial_s / seconds:>8.2f}x {cpu:>8.2f} {n / cpu:>10,.0f}")
    # per core of the pooled run, so the pool's own costs (pickling chunks, start-up) are in the projection
    for what, per_core in [("wall clock", n / pooled_s / args.workers), ("CPU time", n / pooled_cpu)]:
        projected = args.project_reports / (per_core * args.cores)
        print0(f"projection from {what} (assumes linear scaling): {args.project_reports:,} reports / ({per_core:,.0f} "
               f"reports/s per core x {args.cores} cores) = {projected:,.0f} s = {projected / 60:.1f} min; target < "
               f"{TARGET_SECONDS // 60} min: {'met' if projected < TARGET_SECONDS else 'missed'}")
    if os.getloadavg()[0] > os.cpu_count():
        print0(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work shared them, so "
               f"the wall-clock rates understate a free core; the CPU-time projection is the one to trust")
    return 0


if __name__ == "__main__":
    sys.exit(main())
