"""Train the report writer on a prepared dataset (tokenizer already trained by scripts.tok_train).

    python -m scripts.base_train --dataset data/synthetic_n20000_s0
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --dataset data/echoprime
    python -m scripts.base_train --resume runs/base_train          # continue a killed run

The optimisation is defined by the global batch (--total-batch-size sequences per step); each rank runs
--device-batch-size sequences at a time and accumulates gradients over as many micro batches as the global
batch needs, so 1 GPU and 8 GPUs follow the same curve (up to floating point noise). The summed loss of a
step is divided by the number of real target tokens in the whole global batch (known to every rank, since
every rank draws the same global batches), so neither accumulation nor world size changes the gradient.

Hardware-aware defaults: on CUDA a full config (depth 8, 256 sequences per step, bf16, torch.compile,
2 epochs); on CPU a small one (depth 4, 32 sequences per step, 300 steps) that turns the synthetic
dataset into a useful report writer in a few minutes on 2 cores. Any flag given overrides its default.

Outputs in run_dir (made under --run-dir, never overwriting an earlier run): config.json, train.csv,
val.csv, train.png, val.png, checkpoints/{last,best}.pt, train_summary.json.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from echovlm.checkpoint import read_checkpoint, save_checkpoint, set_rng_state
from echovlm.common import (atomic_write_json, compute_cleanup, compute_init, fail, new_run_dir, print0,
                            seed_everything)
from echovlm.train import (OPTIM_DEFAULTS, TRAIN_FIELDS, VAL_FIELDS, all_reduce_sum, apply_hardware_defaults,
                           evaluate, lr_multiplier, make_autocast, muon_momentum, peak_flops, peak_memory_mb, plot, read_csv, setup_training,
                           train_step, write_csv)



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="prepared dataset directory (tokenizer in DATASET/tokenizer)")
    p.add_argument("--resume", help="run directory of a killed run: continue it from checkpoints/last.pt with the "
                                    "settings in its config.json (other flags are ignored); on several nodes it "
                                    "must be on a filesystem that every node sees")
    p.add_argument("--depth", type=int, help="model size knob: width 64*depth (default: 8 on CUDA, 4 on CPU)")
    p.add_argument("--sequence-len", type=int, help="positions per sequence (default: the longest train study, "
                                                    "prefix + <|bos|> + report, rounded up to 32, at most 1024)")
    p.add_argument("--epochs", type=float, help="training length in passes over the train split (CUDA default 2)")
    p.add_argument("--num-steps", type=int, help="training length in optimisation steps (overrides --epochs; CPU "
                                                 "default 600)")
    p.add_argument("--total-batch-size", type=int, help="sequences per optimisation step, all ranks together")
    p.add_argument("--device-batch-size", type=int, help="sequences per forward pass per rank")
    p.add_argument("--matrix-lr", type=float, default=OPTIM_DEFAULTS["matrix_lr"], help="Muon lr of the transformer matrices")
    p.add_argument("--embedding-lr", type=float, default=OPTIM_DEFAULTS["embedding_lr"], help="AdamW lr of the token embedding (at width 768)")
    p.add_argument("--projector-lr", type=float, default=OPTIM_DEFAULTS["projector_lr"], help="AdamW lr of the study-embedding projector")
    p.add_argument("--unembedding-lr", type=float, default=OPTIM_DEFAULTS["unembedding_lr"], help="AdamW lr of the lm_head (at width 768)")
    p.add_argument("--weight-decay", type=float, default=OPTIM_DEFAULTS["weight_decay"])
    p.add_argument("--warmup-frac", type=float, default=0.02, help="fraction of steps with a linear lr warm-up")
    p.add_argument("--warmdown-frac", type=float, default=0.3, help="fraction of steps at the end decaying the lr")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the last step, as a fraction of the peak")
    p.add_argument("--eval-every", type=int, help="steps between val evaluations (and checkpoints)")
    p.add_argument("--eval-studies", type=int, help="val studies per evaluation (<= 0: all)")
    p.add_argument("--save-every", type=int, help="steps between last.pt saves (default: --eval-every)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--run-dir", default="runs", help="base directory for run directories")
    p.add_argument("--run-name", default="base_train", help="run directory name (a number is appended if taken)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast (default on CUDA) or fp32 (default elsewhere)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training model (default: on CUDA)")
    p.add_argument("--no-length-grouping", dest="length_grouping", action="store_false",
                   help="batch studies in plain random order (more padding; for comparison)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.resume and not args.dataset:
        p.error("--dataset is required (or --resume RUNDIR)")
    return args


def apply_defaults(args, device_type: str, world: int):
    apply_hardware_defaults(args, device_type, world)
    args.save_every = args.save_every or args.eval_every
    for name in ("depth", "total_batch_size", "device_batch_size", "eval_every", "save_every", "log_every"):
        if getattr(args, name) < 1:
            fail("base_train", f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_frac", "warmdown_frac"):
        if not 0 <= getattr(args, name) <= 1:
            fail("base_train", f"--{name.replace('_', '-')} must be in [0, 1]")


def setup_run(args, rank, ddp):
    """(run_dir, checkpoint to resume or None), the run dir made by rank 0 and shared with the others."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            fail("base_train", f"{run_dir} has no config.json; --resume takes a run directory that "
                               "base_train made (on several nodes, one on a filesystem that every node sees)")
        ckpt_path = run_dir / "checkpoints" / "last.pt"
        if not ckpt_path.is_file():
            fail("base_train", f"{ckpt_path} does not exist (the run stopped before its first "
                               "checkpoint); start it again without --resume")
        return run_dir, ckpt_path
    name = [str(new_run_dir(args.run_dir, args.run_name)) if rank == 0 else None]
    if ddp:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0]), None


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world, device = compute_init(args.device)
    try:
        return train(args, ddp, rank, world, device)
    finally:
        compute_cleanup()


def train(args, ddp, rank, world, device):
    run_dir, ckpt_path = setup_run(args, rank, ddp)
    ckpt = None
    if ckpt_path is not None:
        saved = json.loads((run_dir / "config.json").read_text())["args"]
        if saved["world_size"] != world:
            print0(f"note: resuming a run made with {saved['world_size']} processes on {world}; the global batch "
                   "is the same, so the curve is too (up to floating point noise)")
        args = argparse.Namespace(**{**saved["flags"], "resume": str(run_dir)})
        ckpt = read_checkpoint(ckpt_path, map_location="cpu")
    else:
        apply_defaults(args, device.type, world)
    seed_everything(args.seed)

    try:
        tok_dir, tokenizer, train_split, val_split, loader, config, model, optimizers = setup_training(
            args, device, rank, world)
    except FileNotFoundError as e:
        fail("base_train", str(e))
    accum = loader.accum
    start_step, best_bpb, last_bpb = 0, float("inf"), float("nan")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        best_bpb = ckpt["meta"].get("best_val_bpb", float("inf"))
        last_bpb = ckpt["meta"].get("val_bpb", float("nan"))
        print0(f"resuming {run_dir} at step {start_step}")
    ddp_model = None  # the DDP wrapper: its no_sync() lives there, not on the compiled module
    train_model = model
    if ddp:
        ddp_model = train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    autocast = make_autocast(device, args.dtype)
    token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(device)
    peak = peak_flops(device) * world

    ckpt_dir = run_dir / "checkpoints"
    meta = {"dataset": str(Path(args.dataset).resolve()), "tokenizer_dir": str(tok_dir.resolve())}
    if rank == 0 and ckpt is None:
        atomic_write_json(run_dir / "config.json", {
            "args": {"flags": vars(args), "world_size": world},
            "model": {**asdict(config), "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                      "params": model.num_params()},
            "dataset": meta["dataset"], "tokenizer_dir": meta["tokenizer_dir"], "world_size": world,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "accumulation_steps": accum, "train_studies": len(train_split),
            "val_studies": len(val_split), "steps_per_epoch": loader.batches_per_epoch,
        })
    train_rows = read_csv(run_dir / "train.csv", start_step) if rank == 0 else []
    val_rows = read_csv(run_dir / "val.csv", start_step) if rank == 0 else []
    print0(f"run {run_dir}: {model.num_params():,} params (depth {config.depth}, width {config.n_embd}, "
           f"{config.n_head} heads), sequence_len {config.sequence_len}, {len(train_split)} train studies, "
           f"{args.num_steps} steps of {args.total_batch_size} sequences ({world} rank(s) x {accum} micro batch(es) "
           f"of {args.device_batch_size}), {device} {args.dtype}{' compiled' if args.compile else ''}")

    elapsed = train_rows[-1]["elapsed_s"] if train_rows else 0.0
    real_tokens, positions, padding = 0, 0, 0
    timed_tokens, timed_flops, timed_seconds, timed_steps = 0, 0.0, 0.0, 0
    step = start_step
    while True:
        last = step == args.num_steps
        # a resumed run's checkpoint step was evaluated (and logged) before it was killed
        if (step % args.eval_every == 0 or last) and not (ckpt is not None and step == start_step):
            val_loss, val_bpb = evaluate(model, val_split, token_bytes, args, rank, world, autocast)
            last_bpb = val_bpb
            print0(f"step {step:5d}/{args.num_steps} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}")
            if rank == 0:
                val_rows.append({"step": step, "val_loss": val_loss, "val_bpb": val_bpb})
                write_csv(run_dir / "val.csv", VAL_FIELDS, val_rows)
                if val_bpb < best_bpb:
                    best_bpb = val_bpb
                    save_checkpoint(ckpt_dir / "best.pt", model, optimizers, step, loader.state_dict(),
                                    {**meta, "val_bpb": val_bpb, "best_val_bpb": best_bpb})
        if rank == 0 and step > start_step and (step % args.save_every == 0 or last):
            save_checkpoint(ckpt_dir / "last.pt", model, optimizers, step, loader.state_dict(),
                            {**meta, "val_bpb": last_bpb, "best_val_bpb": best_bpb})
            plot(run_dir, train_rows, val_rows)
        if last:
            break

        t0 = time.perf_counter()
        batches = loader.next()
        global_targets = loader.global_stats["targets"]
        lrm = lr_multiplier(step, args.num_steps, args.warmup_frac, args.warmdown_frac, args.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in optimizers[1].param_groups:
            group["momentum"] = muon_momentum(step)
        loss_sum = train_step(train_model, ddp_model, model, optimizers, batches, global_targets, autocast, world)
        step_loss = all_reduce_sum([loss_sum.item()], device)[0] / global_targets
        dt = time.perf_counter() - t0
        step += 1
        if not math.isfinite(step_loss):
            print0(f"base_train: the training loss became {step_loss} at step {step} (lr multiplier {lrm:.3g}, last "
                   f"val bpb {last_bpb:.4f}). Stopped; {ckpt_dir / 'last.pt'} holds the last good state. Lower the "
                   "learning rates (--matrix-lr, --embedding-lr, ...) and start again, or resume with --resume")
            return 1

        elapsed += dt
        step_pos, step_pad = loader.global_stats["positions"], loader.global_stats["padding"]
        real_tokens += global_targets
        positions += step_pos
        padding += step_pad
        # FLOPs of the real tokens at the length the batches really had (padded positions are not work done)
        step_flops = global_targets * model.estimate_flops(step_pos / args.total_batch_size)
        if step > start_step + 1:  # the first step pays for compilation and warm-up
            timed_tokens += global_targets
            timed_flops += step_flops
            timed_seconds += dt
            timed_steps += 1
        tok_per_s = global_targets / dt
        mfu = step_flops / dt / peak
        if rank == 0:
            # lr: the Muon lr of the transformer matrices; the AdamW groups follow the same multiplier
            train_rows.append({"step": step, "loss": step_loss, "lr": optimizers[1].param_groups[0]["lr"],
                               "lr_mult": lrm, "tokens_per_sec": tok_per_s,
                               "padding_fraction": step_pad / step_pos, "mfu": mfu,
                               "elapsed_s": elapsed})
        if step % args.log_every == 0 or step == args.num_steps:
            eta = (args.num_steps - step) * (timed_seconds / timed_steps if timed_steps else dt)
            print0(f"step {step:5d}/{args.num_steps} | loss {step_loss:.4f} | lrm {lrm:.3f} | "
                   f"{tok_per_s:,.0f} tok/s | pad {padding / positions:.1%} | "
                   f"mfu {'n/a' if math.isnan(mfu) else format(mfu, '.1%')} | "
                   f"{elapsed:.0f}s, eta {eta:.0f}s")
            if rank == 0:
                write_csv(run_dir / "train.csv", TRAIN_FIELDS, train_rows)

    if rank == 0:
        write_csv(run_dir / "train.csv", TRAIN_FIELDS, train_rows)
        plot(run_dir, train_rows, val_rows)
        tps = timed_tokens / timed_seconds if timed_seconds else (real_tokens / elapsed if elapsed else float("nan"))
        summary = {
            "steps": args.num_steps, "train_seconds": elapsed, "tokens_per_sec": tps,
            "mfu": timed_flops / timed_seconds / peak if timed_seconds else float("nan"), "peak_flops": peak, "final_val_bpb": val_rows[-1]["val_bpb"],
            "best_val_bpb": best_bpb, "final_val_loss": val_rows[-1]["val_loss"], "params": model.num_params(),
            "peak_memory_mb": peak_memory_mb(device), "padding_fraction": padding / positions if positions else None,
            "world_size": world, "device": str(device),
        }
        # strict JSON has no NaN: unknown numbers (MFU on a CPU) are null
        summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
        atomic_write_json(run_dir / "train_summary.json", summary)
        print0(f"done: {args.num_steps} steps in {elapsed:.0f}s, {tps:,.0f} real tokens/s, best val bpb {best_bpb:.4f}, "
               f"summary in {run_dir / 'train_summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
