"""Training throughput: real (non-pad) tokens/s, padding, MFU and peak memory of base_train's step, against a
baseline measured in the same run.

    python -m scripts.bench_train                                   # a small synthetic dataset, made in a temp dir
    python -m scripts.bench_train --dataset data/echoprime --depth 12 --compare-compile
    python -m scripts.bench_train --depth 4 --compare-dtype         # bf16 autocast against fp32 on this device

Rows: "grouped" is base_train's set-up as it trains (length-grouped batches); the baseline is the very same
config with plain random batches (--no-length-grouping: more padding), and "vs baseline" is the ratio of real
tokens/s. --compare-compile adds the grouped config with torch.compile switched the other way, --compare-dtype
the grouped config in the other precision (bf16 autocast or fp32; Muon's Newton-Schulz stays the device's
choice, echovlm.common.bf16_native). Each row builds a
fresh model and optimizers through echovlm.train.setup_training (base_train's own set-up), runs --warmup-steps
untimed steps (allocator, kernels, compilation), then times --steps full optimisation steps (all micro batches +
optimizer). The last column projects one epoch of --project-studies studies (default: the EchoPrime release) from the measured
studies/s, so it is as good as the dataset's report lengths are like the release's.
MFU uses the model's FLOPs-per-token estimate and echovlm.train's peak-FLOPs table (n/a where the peak is unknown, e.g. CPU).
Peak memory is torch.cuda.max_memory_allocated per row on CUDA; on CPU it is the process's peak RSS so far.
The rows run one after the other, so on a shared machine (a CPU others are using) the tokens/s ratio carries
that load's noise; the padding fractions do not.
"""

import argparse
import math
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from echovlm.common import autodetect_device, fail, make_autocast, print0, seed_everything
from echovlm.echoprime import PUBLISHED_STUDIES
from echovlm.train import (OPTIM_DEFAULTS, apply_hardware_defaults, peak_flops, peak_memory_mb, setup_training,
                           train_step)

# bench-only defaults; batch sizes (and the CUDA depth) are base_train's hardware defaults
BENCH_DEFAULTS = {"cuda": dict(steps=30, warmup_steps=10, synthetic_studies=32_000),
                  "cpu": dict(depth=2, steps=6, warmup_steps=2, synthetic_studies=2_000)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="prepared dataset with its tokenizer (default: a synthetic one in a temp dir)")
    p.add_argument("--synthetic-studies", type=int, help="studies of the synthetic dataset (CUDA 32000, CPU 2000)")
    p.add_argument("--depth", type=int, help="model depth (default: 8 on CUDA, 2 on CPU)")
    p.add_argument("--total-batch-size", type=int, help="sequences per step (default: base_train's)")
    p.add_argument("--device-batch-size", type=int, help="sequences per forward pass (default: base_train's)")
    p.add_argument("--steps", type=int, help="timed steps per row (default: 30 on CUDA, 6 on CPU)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="as base_train")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA)")
    p.add_argument("--compare-compile", action="store_true",
                   help="add a row with the grouped config compiled the other way (eager vs compiled)")
    p.add_argument("--compare-dtype", action="store_true",
                   help="add a row with the grouped config in the other precision (bf16 vs fp32)")
    p.add_argument("--project-studies", type=int, default=PUBLISHED_STUDIES,
                   help="studies in the epoch whose time is projected (default: the EchoPrime release)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(autodetect_device(args.device))
    for key, value in BENCH_DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup_steps < 0 or args.project_studies < 1:
        p.error("--steps and --project-studies must be >= 1 and --warmup-steps >= 0")
    return args, device


def make_synthetic_dataset(out: str, n_studies: int, seed: int):
    print0(f"no --dataset: making a synthetic one with {n_studies:,} studies in {out}")
    # the pipeline's own CLIs, as a user would run them (a script never imports another script)
    for argv in (["scripts.prepare_dataset", "--source", "synthetic", "--n-studies", str(n_studies), "--seed",
                  str(seed), "--out", out], ["scripts.tok_train", "--dataset", out]):
        if subprocess.run([sys.executable, "-m", *argv]).returncode != 0:
            fail("bench_train", f"`python -m {' '.join(argv)}` failed (its message is above)", 1)


def train_args(args, device, length_grouping: bool, compile_: bool | None, dtype: str | None = None):
    """base_train's settings and hardware defaults for one row, so the row trains as base_train would."""
    targs = argparse.Namespace(
        dataset=args.dataset, dtype=dtype or args.dtype, seed=args.seed, num_steps=args.warmup_steps + args.steps, epochs=None,
        depth=args.depth, total_batch_size=args.total_batch_size, device_batch_size=args.device_batch_size,
        sequence_len=None, compile=compile_, length_grouping=length_grouping, eval_every=None, eval_studies=None,
        **OPTIM_DEFAULTS)
    apply_hardware_defaults(targs, device.type, world=1)
    return targs


def bench_row(targs, device, warmup_steps: int, steps: int) -> dict:
    seed_everything(targs.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    *_, loader, config, model, optimizers = setup_training(targs, device, rank=0, world=1)
    train_model = torch.compile(model) if targs.compile else model
    autocast = make_autocast(device, targs.dtype)
    tokens = positions = padding = 0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            t0 = time.perf_counter()
        # base_train's step at a constant lr: the schedule costs nothing next to the model
        batches = loader.next()
        global_targets = loader.global_stats["targets"]
        loss_sum = train_step(train_model, None, model, optimizers, batches, global_targets, autocast, 1)
        # base_train reads the loss every step too; it waits for the device, so wall time is device time
        loss_value = loss_sum.item() / global_targets
        if not math.isfinite(loss_value):
            fail("bench_train", f"the loss became {loss_value} at step {step}; the set-up is broken", 1)
        if step >= warmup_steps:
            tokens += global_targets
            positions += loader.global_stats["positions"]
            padding += loader.global_stats["padding"]
    seconds = time.perf_counter() - t0
    tps = tokens / seconds
    # attention FLOPs at the batches' real length, as base_train counts them
    flops_per_token = model.estimate_flops(positions / (steps * targs.total_batch_size))
    return {"tokens_per_sec": tps, "padding_fraction": padding / positions,
           "mfu": flops_per_token * tps / peak_flops(device),
           "peak_memory_mb": peak_memory_mb(device),
           "studies_per_sec": steps * targs.total_batch_size / seconds,
           "params": model.num_params(), "config": config, "accum": loader.accum, "train_studies": len(loader.split)}


def main(argv=None):
    args, device = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") if args.dataset is None else nullcontext() as tmp:
        if tmp is not None:
            args.dataset = tmp
            make_synthetic_dataset(tmp, args.synthetic_studies, args.seed)
        targs = train_args(args, device, True, args.compile)
        runs = [("grouped", targs), ("baseline: random batches", train_args(args, device, False, targs.compile))]
        if args.compare_compile:
            runs.append((f"grouped, {'eager' if targs.compile else 'compiled'}",
                         train_args(args, device, True, not targs.compile)))
        if args.compare_dtype:
            other = "fp32" if targs.dtype == "bf16" else "bf16"
            runs.append((f"grouped, {other}", train_args(args, device, True, targs.compile, other)))
        rows = []
        for name, row_args in runs:
            print0(f"{name}: {args.warmup_steps} warm-up + {args.steps} timed steps ...")
            rows.append({"name": name, **bench_row(row_args, device, args.warmup_steps, args.steps)})
            # drop the compiled graphs (they hold the model): the next row's memory and compilation are its own
            torch._dynamo.reset()

    first, base = rows[0], rows[1]
    c = first["config"]
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{device.type} ({torch.get_num_threads()} threads)")
    print0(f"\n{device_name}, {targs.dtype}{' compiled' if targs.compile else ''}: depth {c.depth} "
           f"(width {c.n_embd}, {first['params'] / 1e6:.2f}M params), sequence_len {c.sequence_len}, "
           f"{targs.total_batch_size} sequences per step ({first['accum']} x {targs.device_batch_size}), "
           f"{first['train_studies']:,} train studies in {args.dataset}")
    mem = "peak mem MiB" if device.type == "cuda" else "peak RSS MiB (process, so far)"
    print0(f"| run | real tok/s | vs baseline | padding | MFU | {mem} | epoch of {args.project_studies:,} studies |")
    print0("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if math.isfinite(r["mfu"]) else "n/a"
        epoch_min = args.project_studies / r["studies_per_sec"] / 60
        print0(f"| {r['name']} | {r['tokens_per_sec']:,.0f} | {r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x | "
               f"{r['padding_fraction']:.1%} | {mfu} | {r['peak_memory_mb']:,.0f} | {epoch_min:,.1f} min |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
