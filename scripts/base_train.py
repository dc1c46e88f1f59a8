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
import csv
import json
import math
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from echovlm.checkpoint import read_checkpoint, save_checkpoint, set_rng_state
from echovlm.common import (atomic_write_json, atomic_write_text, compute_cleanup, compute_init, new_run_dir, print0,
                            seed_everything)
from echovlm.dataset import open_dataset
from echovlm.gpt import GPT, GPTConfig
from echovlm.loader import DeviceSplit, TrainLoader
from echovlm.tokenizer import Tokenizer

# dense bf16 peak of the accelerators we know; MFU is left out (nan) elsewhere rather than guessed
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
HARDWARE_DEFAULTS = {
    "cuda": dict(depth=8, total_batch_size=256, device_batch_size=64, epochs=2.0, num_steps=None, eval_every=250,
                 eval_studies=4096),
    "cpu": dict(depth=4, total_batch_size=32, device_batch_size=32, epochs=None, num_steps=300, eval_every=50,
                eval_studies=256),
}
TRAIN_FIELDS = ["step", "loss", "lr", "lr_mult", "tokens_per_sec", "padding_fraction", "mfu", "elapsed_s"]
VAL_FIELDS = ["step", "val_loss", "val_bpb"]


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
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the transformer matrices")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding (at width 768)")
    p.add_argument("--projector-lr", type=float, default=0.02, help="AdamW lr of the study-embedding projector")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of the lm_head (at width 768)")
    p.add_argument("--weight-decay", type=float, default=0.0)
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
    defaults = HARDWARE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key) is None and not (key == "epochs" and args.num_steps is not None) \
                and not (key == "num_steps" and args.epochs is not None):
            setattr(args, key, value)
    if args.device_batch_size * world > args.total_batch_size:
        args.device_batch_size = max(1, args.total_batch_size // world)
    args.save_every = args.save_every or args.eval_every
    args.dtype = args.dtype if args.dtype != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    if args.compile is None:
        args.compile = device_type == "cuda"
    for name in ("depth", "total_batch_size", "device_batch_size", "eval_every", "save_every", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"base_train: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_frac", "warmdown_frac"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"base_train: --{name.replace('_', '-')} must be in [0, 1]")


def lr_multiplier(step: int, num_steps: int, warmup_frac: float, warmdown_frac: float, final_frac: float) -> float:
    """Linear warm-up, constant, then linear decay to final_frac over the last warmdown_frac of training."""
    warmup, warmdown = round(warmup_frac * num_steps), round(warmdown_frac * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / max(warmdown, 1)
    return progress + (1 - progress) * final_frac


def muon_momentum(step: int) -> float:
    # nanochat: 0.85 -> 0.95 over the first 300 steps, while the momentum buffers fill
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def peak_flops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), float("nan"))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the process's peak resident set (kilobytes on Linux)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model, split: DeviceSplit, token_bytes: torch.Tensor, args, rank, world, autocast):
    """Val loss (nats per target token, <|eos|> included) and bits per byte (special tokens excluded)."""
    model.eval()
    # running sums stay on the device: one transfer at the end instead of one per batch
    nats, nats_text, n_bytes = (torch.zeros((), dtype=torch.float64, device=token_bytes.device) for _ in range(3))
    count = 0
    for b in split.eval_batches(args.eval_studies, args.device_batch_size, rank, world):
        with autocast:
            loss = model(b.ids, b.prefix, b.prefix_mask, b.targets, loss_reduction="none")
        tgt = b.targets.reshape(-1)
        valid = tgt >= 0
        nbytes = torch.where(valid, token_bytes[tgt.clamp(min=0)], 0)
        nats += loss.sum().double()
        count += b.num_targets
        nats_text += (loss * (nbytes > 0)).sum().double()
        n_bytes += nbytes.sum().double()
    model.train()
    total_nats, total_count, text_nats, total_bytes = all_reduce_sum(
        [float(nats), float(count), float(nats_text), float(n_bytes)], token_bytes.device)
    return total_nats / max(total_count, 1), text_nats / (math.log(2) * max(total_bytes, 1))


def write_csv(path: Path, fields: list[str], rows: list[dict]):
    lines = [",".join(fields)] + [",".join(_fmt(r[f]) for f in fields) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(v) -> str:
    return f"{v:.9g}" if isinstance(v, float) else str(v)


def read_csv(path: Path, upto_step: int) -> list[dict]:
    """Rows of an earlier attempt up to its checkpoint step: later ones are redone after a resume."""
    if not path.exists():
        return []
    with open(path) as f:
        rows = [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    return [r for r in rows if r["step"] <= upto_step]


def plot(run_dir: Path, train_rows: list[dict], val_rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, rows, keys in (("train", train_rows, ["loss"]), ("val", val_rows, ["val_loss", "val_bpb"])):
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="." if name == "val" else None)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run_dir.name}: {name}")
        fig.tight_layout()
        fig.savefig(run_dir / f"{name}.png", dpi=100)
        plt.close(fig)


def setup_run(args, rank, ddp):
    """(run_dir, checkpoint to resume or None), the run dir made by rank 0 and shared with the others."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.json").is_file():
            raise SystemExit(f"base_train: {run_dir} has no config.json; --resume takes a run directory that "
                             "base_train made (on several nodes, one on a filesystem that every node sees)")
        ckpt_path = run_dir / "checkpoints" / "last.pt"
        if not ckpt_path.is_file():
            raise SystemExit(f"base_train: {ckpt_path} does not exist (the run stopped before its first "
                             "checkpoint); start it again without --resume")
        return run_dir, ckpt_path
    name = [str(new_run_dir(args.run_dir, args.run_name)) if rank == 0 else None]
    if ddp:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0]), None


def train_step(train_model, ddp_model, model, optimizers, batches, global_targets: int, autocast, world: int):
    """One optimisation step over this rank's micro batches of the global batch; returns their summed loss.

    ddp_model: the DistributedDataParallel wrapper (None without DDP), whose no_sync() skips the all-reduce of
    every micro batch but the last. scripts.bench_train times this very function.
    """
    loss_sum = torch.zeros((), device=batches[0].ids.device)
    for a, b in enumerate(batches):
        sync = nullcontext() if ddp_model is None or a == len(batches) - 1 else ddp_model.no_sync()
        with sync, autocast:
            loss = train_model(b.ids, b.prefix, b.prefix_mask, b.targets, loss_reduction="sum")
        # DDP averages gradients over ranks: x world makes the result the global-batch token mean
        (loss * (world / global_targets)).backward()
        loss_sum += loss.detach()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum


def make_autocast(device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def setup_training(args, device, rank: int, world: int):
    """Tokenizer, train/val splits, loader, model and optimizers for complete args (defaults applied).

    Fills in args.sequence_len and args.num_steps where they were left to the data. scripts.bench_train
    builds its runs here too, so it times the very set-up that trains.
    """
    dataset = open_dataset(args.dataset)
    tok_dir = Path(args.dataset) / "tokenizer"
    if not tok_dir.is_dir():
        raise SystemExit(f"base_train: no tokenizer in {tok_dir}: run `python -m scripts.tok_train --dataset "
                         f"{args.dataset}` first")
    tokenizer = Tokenizer.load(tok_dir)
    pad_multiple = 32 if args.compile else 1  # fewer distinct batch shapes for torch.compile to specialise on
    train_split = DeviceSplit.from_dataset(dataset, "train", tokenizer, args.sequence_len, device, pad_multiple)
    args.sequence_len = train_split.sequence_len
    val_split = DeviceSplit.from_dataset(dataset, "val", tokenizer, args.sequence_len, device, pad_multiple)
    loader = TrainLoader(train_split, args.total_batch_size, args.device_batch_size, rank, world, args.seed,
                         length_grouping=args.length_grouping)
    if args.num_steps is None:
        args.num_steps = max(1, round(args.epochs * loader.batches_per_epoch))

    config = GPTConfig(depth=args.depth, vocab_size=tokenizer.vocab_size, embed_dim=train_split.embed_dim,
                       sequence_len=args.sequence_len)
    model = GPT(config).to(device)
    optimizers = model.setup_optimizers(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                        projector_lr=args.projector_lr, unembedding_lr=args.unembedding_lr,
                                        weight_decay=args.weight_decay)
    return tok_dir, tokenizer, train_split, val_split, loader, config, model, optimizers


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

    tok_dir, tokenizer, train_split, val_split, loader, config, model, optimizers = setup_training(
        args, device, rank, world)
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
