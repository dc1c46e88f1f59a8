"""Train the report writer on a prepared dataset (tokenizer already trained by scripts.tok_train).

    python -m scripts.base_train --dataset data/synthetic_n20000_s0
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --dataset data/echoprime
    python -m scripts.base_train --resume runs/base_train          # continue a killed run

The optimisation is defined by the global batch (--total-batch-size sequences per step); each rank runs
--device-batch-size sequences at a time and accumulates gradients over as many micro batches as the global
batch needs, so 1 GPU and 8 GPUs follow the same curve (up to floating point noise). The summed loss of a
step is divided by the number of real target tokens in the whole global batch (known to every rank, since
every rank draws the same global batches), so neither accumulation nor world size changes the gradient.

Hardware-aware defaults (echovlm.train.HARDWARE_DEFAULTS; each flag's help below gives its values): on CUDA a
full config (bf16, torch.compile, a few epochs); on CPU a small one that turns the synthetic dataset into a
useful report writer in a few minutes on 2 cores. Any flag given overrides its default.

Ctrl-C or SIGTERM finishes the current step, saves it to checkpoints/last.pt and exits 130 / 143 with the
command that resumes; --resume keeps the run's settings (a flag given with another value is refused) and does
nothing for a run that has finished.

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
from echovlm.echoprime import load_echoprime_rules
from echovlm.findings import FindingsHead, fit_head, split_features
from echovlm.labels import rules_key
from echovlm.common import (atomic_write_json, compute_cleanup, compute_init, fail, make_autocast, new_run_dir,
                            print0, seed_everything)
from echovlm.tokenizer import STATS_FILE
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE
from echovlm.train import (HARDWARE_DEFAULTS, OPTIM_DEFAULTS, TRAIN_FIELDS, VAL_FIELDS, InputError, StopSignals,
                           all_reduce_sum, apply_hardware_defaults, evaluate, lr_multiplier, muon_momentum, peak_flops,
                           peak_memory_mb, plot, read_csv, setup_training, train_step, write_csv)

GPU, CPU = HARDWARE_DEFAULTS["cuda"], HARDWARE_DEFAULTS["cpu"]
# flags that say where a new run goes or what hardware runs it: a resume may give other values
NOT_PINNED = ("resume", "run_dir", "run_name", "device")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="prepared dataset directory, its tokenizer trained by scripts.tok_train")
    p.add_argument("--resume", help="run directory of an interrupted run: continue it from checkpoints/last.pt with "
                                    "the settings in its config.json (a flag given with a different value is "
                                    "refused); on several nodes it must be on a filesystem that every node sees")
    p.add_argument("--vocab-size", type=int, help="which of the dataset's tokenizers (scripts.tok_train --vocab-size) "
                                                  f"to train with (default: its only one; of several, the one of size "
                                                  f"{DEFAULT_VOCAB_SIZE})")
    p.add_argument("--depth", type=int, help=f"model size knob: width 64*depth (default: {GPU['depth']} on CUDA, "
                                             f"{CPU['depth']} on CPU)")
    p.add_argument("--sequence-len", type=int, help="positions per sequence (default: the longest train study, "
                                                    "prefix + <|bos|> + report, rounded up to 32, at most 1024)")
    p.add_argument("--epochs", type=float, help=f"training length in passes over the train split (CUDA default "
                                                f"{GPU['epochs']:g})")
    p.add_argument("--num-steps", type=int, help=f"training length in optimisation steps (overrides --epochs; CPU "
                                                 f"default {CPU['num_steps']})")
    p.add_argument("--total-batch-size", type=int, help=f"sequences per optimisation step, all ranks together "
                                                        f"(default: {GPU['total_batch_size']} on CUDA, "
                                                        f"{CPU['total_batch_size']} on CPU)")
    p.add_argument("--device-batch-size", type=int, help=f"sequences per forward pass per rank (default: "
                                                         f"{GPU['device_batch_size']} on CUDA, "
                                                         f"{CPU['device_batch_size']} on CPU)")
    for name, what in (("matrix_lr", "Muon lr of the transformer matrices"),
                       ("embedding_lr", "AdamW lr of the token embedding (at width 768)"),
                       ("projector_lr", "AdamW lr of the study-embedding projector"),
                       ("unembedding_lr", "AdamW lr of the lm_head (at width 768)"),
                       ("weight_decay", "AdamW weight decay")):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=OPTIM_DEFAULTS[name],
                       help=f"{what} (default {OPTIM_DEFAULTS[name]:g})")
    p.add_argument("--warmup-frac", type=float, default=0.02, help="fraction of steps with a linear lr warm-up "
                                                                   "(default %(default)g)")
    p.add_argument("--warmdown-frac", type=float, default=0.3, help="fraction of steps at the end decaying the lr "
                                                                    "(default %(default)g)")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="lr at the last step, as a fraction of the peak "
                                                                    "(default %(default)g)")
    p.add_argument("--eval-every", type=int, help=f"steps between val evaluations (default: {GPU['eval_every']} on "
                                                  f"CUDA, {CPU['eval_every']} on CPU)")
    p.add_argument("--eval-studies", type=int, help=f"val studies per evaluation, <= 0: all (default: "
                                                    f"{GPU['eval_studies']} on CUDA, {CPU['eval_studies']} on CPU)")
    p.add_argument("--save-every", type=int, help="steps between last.pt saves (default: --eval-every)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines (default %(default)s)")
    p.add_argument("--run-dir", default="runs", help="base directory for run directories (default %(default)s)")
    p.add_argument("--run-name", default="base_train", help="run directory name (a number is appended if taken; "
                                                            "default %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on CUDA and on CPUs with native bf16 matmuls, "
                        "AVX512-BF16 or AMX; fp32 elsewhere)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training model (default: on CUDA)")
    p.add_argument("--no-length-grouping", dest="length_grouping", action="store_false",
                   help="batch studies in plain random order (more padding; for comparison)")
    p.add_argument("--findings", action=argparse.BooleanOptionalAction, default=True,
                   help="train the findings head (echovlm.findings) and prompt the GPT with each report's findings "
                        "(default: on; --no-findings trains a GPT that only writes free reports)")
    p.add_argument("--prompt-dropout", type=float, default=0.5,
                   help="fraction of training reports whose findings prompt is all unknown, so the GPT also writes "
                        "without one (default %(default)g)")
    p.add_argument("--swap-embeddings", type=float, default=0.25,
                   help="fraction of the prompted training reports read with another study's embeddings, so that "
                        "where the embeddings and the prompt disagree the report states the prompt (default %(default)g)")
    p.add_argument("--balance-findings", type=float, default=0.2,
                   help="a floor F: a training report whose rarest present finding has training prevalence p < F "
                        "is drawn F/p times as often (at most 10x), so rare findings are read and written more "
                        "(sampling with replacement; 0: a plain permutation each epoch; default %(default)g)")
    p.add_argument("--head-hidden", type=int, default=256,
                   help="hidden width of the findings head's MLP, 0 = linear only (default %(default)s)")
    p.add_argument("--echoprime-rules", help="label the reports with EchoPrime's per_section.json (file or checkout) "
                                             "instead of echovlm.clinical's rules, for the findings head and prompts")
    p.add_argument("--seed", type=int, default=0, help="data order and initialisation seed (default %(default)s)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.resume and not args.dataset:
        p.error("--dataset is required (or --resume RUNDIR)")
    return args


def given_flags(argv=None) -> dict:
    """The flags written on the command line (not those left to their defaults), by dest."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def apply_defaults(args, device_type: str, world: int):
    apply_hardware_defaults(args, device_type, world)
    args.save_every = args.save_every or args.eval_every
    for name in ("depth", "total_batch_size", "device_batch_size", "eval_every", "save_every", "log_every"):
        if getattr(args, name) < 1:
            fail("base_train", f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # a step count below 1 never stops (the lr schedule then goes negative) or trains nothing at all
    if args.num_steps is not None and args.num_steps < 1:
        fail("base_train", f"--num-steps must be >= 1, got {args.num_steps}")
    if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
        fail("base_train", f"--epochs must be a number > 0, got {args.epochs}")
    if args.sequence_len is not None and args.sequence_len < 3:
        fail("base_train", f"--sequence-len must be >= 3 (one embedding, <|bos|>, one token), got {args.sequence_len}")
    for name in ("warmup_frac", "warmdown_frac", "final_lr_frac", "prompt_dropout", "swap_embeddings",
                 "balance_findings"):
        if not 0 <= getattr(args, name) <= 1:
            fail("base_train", f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in OPTIM_DEFAULTS:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            fail("base_train", f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(args, name)}")
    if args.head_hidden < 0:
        fail("base_train", f"--head-hidden must be >= 0, got {args.head_hidden}")
    if args.echoprime_rules:
        try:
            load_echoprime_rules(args.echoprime_rules)
        except (FileNotFoundError, ValueError) as e:
            fail("base_train", f"--echoprime-rules: {e}")


def open_resumed(args, given: dict, world: int):
    """(run_dir, its checkpoint, the run's own args) for --resume, after checking that the flags given with it
    agree with the settings the run recorded: a resume continues a run, it never changes one."""
    run_dir = Path(args.resume)
    if not (run_dir / "config.json").is_file():
        fail("base_train", f"{run_dir} has no config.json; --resume takes a run directory that "
                           "base_train made (on several nodes, one on a filesystem that every node sees)")
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if not ckpt_path.is_file():
        fail("base_train", f"{ckpt_path} does not exist (the run stopped before its first "
                           "checkpoint); start it again without --resume")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        saved = config["args"]
        flags = dict(saved["flags"])
    except (ValueError, KeyError, TypeError) as e:
        fail("base_train", f"{run_dir / 'config.json'} is not a base_train config ({type(e).__name__}: {e}); "
                           "start a new run without --resume")
    if flags.get("vocab_size") is None:  # a run from before --vocab-size: the tokenizer it recorded
        try:
            stats = json.loads((Path(config["tokenizer_dir"]) / STATS_FILE).read_text())
            flags["vocab_size"] = int(stats["settings"]["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    differ = []
    for key, value in given.items():
        if key in NOT_PINNED or value == "auto" or key not in flags:
            continue
        same = Path(value).resolve() == Path(flags[key]).resolve() if key == "dataset" else value == flags[key]
        if not same:
            differ.append(f"--{key.replace('_', '-')} {value} (the run has {flags[key]})")
    if differ:
        fail("base_train", f"{run_dir} was trained with other settings than {'; '.join(differ)}. A resume keeps "
                           "the run's settings: drop these flags to continue it, or start a new run without --resume")
    if saved.get("world_size", world) != world:
        print0(f"note: resuming a run made with {saved['world_size']} processes on {world}; the global batch "
               "is the same, so the curve is too (up to floating point noise)")
    try:
        ckpt = read_checkpoint(ckpt_path, map_location="cpu")
    except (FileNotFoundError, ValueError) as e:
        fail("base_train", str(e))
    return run_dir, ckpt, argparse.Namespace(**{**flags, "resume": str(run_dir)})


def make_run_dir(args, rank, ddp) -> Path:
    """The new run directory, made by rank 0 and shared with the others (only once the inputs are checked)."""
    name = [str(new_run_dir(args.run_dir, args.run_name)) if rank == 0 else None]
    if ddp:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def throughput_from_rows(rows: list[dict]) -> tuple[float, float | None]:
    """(real tokens/s, padding fraction) of a finished run's train.csv, the first step (warm-up) left out: the
    summary of a session that had no step left to time itself."""
    dts = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])]
    tokens = sum(r["tokens_per_sec"] * dt for r, dt in zip(rows[1:], dts))
    padding = sum(r["padding_fraction"] for r in rows) / len(rows) if rows else None
    return (tokens / sum(dts) if sum(dts) > 0 else float("nan")), padding


def main(argv=None):
    args = parse_args(argv)
    given = given_flags(argv)
    ddp, rank, local_rank, world, device = compute_init(args.device)
    try:
        return train(args, ddp, rank, world, device, given)
    finally:
        compute_cleanup()


def train(args, ddp, rank, world, device, given=None):
    ckpt = None
    if args.resume:
        run_dir, ckpt, args = open_resumed(args, given or {}, world)
        if ckpt["step"] >= args.num_steps and (run_dir / "train_summary.json").is_file():
            print0(f"{run_dir} has finished all its {args.num_steps} steps; nothing to do (its outputs are kept). "
                   "To train again, start a new run without --resume")
            return 0
    else:
        apply_defaults(args, device.type, world)
    seed_everything(args.seed)

    try:
        tok_dir, tokenizer, train_split, val_split, loader, config, model, optimizers = setup_training(
            args, device, rank, world)
    except InputError as e:
        fail("base_train", str(e))
    except KeyboardInterrupt:
        fail("base_train", "interrupted while loading the data; nothing was trained or written", 130)
    if ckpt is None:
        run_dir = make_run_dir(args, rank, ddp)
    accum = loader.accum
    start_step, best_bpb, last_bpb = 0, float("inf"), float("nan")
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            for opt, state in zip(optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as e:
            fail("base_train", f"{run_dir / 'checkpoints' / 'last.pt'} does not fit the model and optimizers its "
                               f"config.json describes ({type(e).__name__}: {str(e).splitlines()[0]}); start a new "
                               "run without --resume")
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

    head, head_summary = None, None
    if config.n_prompt and ckpt is not None:
        try:
            head = FindingsHead.from_checkpoint(ckpt.get("findings"), run_dir / "checkpoints" / "last.pt")
        except (ValueError, KeyError, TypeError) as e:
            fail("base_train", f"{e}; start a new run without --resume")
    elif config.n_prompt and rank == 0:  # only rank 0 saves checkpoints, and the GPT trains on reference labels
        head, head_summary = fit_head(split_features(train_split), train_split.labels, split_features(val_split),
                                      val_split.labels, hidden=args.head_hidden, seed=args.seed, device=device,
                                      log=print0)
    ckpt_dir = run_dir / "checkpoints"
    rules = load_echoprime_rules(args.echoprime_rules) if getattr(args, "echoprime_rules", None) else None
    meta = {"dataset": str(Path(args.dataset).resolve()), "tokenizer_dir": str(tok_dir.resolve()),
            "rules": str(Path(rules.source).resolve()) if rules else None, "rules_key": rules_key(rules)}
    if rank == 0 and ckpt is None:
        atomic_write_json(run_dir / "config.json", {
            "args": {"flags": vars(args), "world_size": world},
            "model": {**asdict(config), "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
                      "n_kv_head": config.n_kv_head, "params": model.num_params()},
            "dataset": meta["dataset"], "tokenizer_dir": meta["tokenizer_dir"], "world_size": world,
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "accumulation_steps": accum, "train_studies": len(train_split),
            "val_studies": len(val_split), "steps_per_epoch": loader.batches_per_epoch, "findings_head": head_summary,
        })
    train_rows = read_csv(run_dir / "train.csv", start_step) if rank == 0 else []
    val_rows = read_csv(run_dir / "val.csv", start_step) if rank == 0 else []
    print0(f"run {run_dir}: {model.num_params():,} params (depth {config.depth}, width {config.n_embd}, "
           f"{config.n_head} heads sharing {config.n_kv_head} key/value), sequence_len {config.sequence_len}, {len(train_split)} train studies, "
           f"{args.num_steps} steps of {args.total_batch_size} sequences ({world} rank(s) x {accum} micro batch(es) "
           f"of {args.device_batch_size}), {device} {args.dtype}{' compiled' if args.compile else ''}")

    elapsed = train_rows[-1]["elapsed_s"] if train_rows else 0.0
    real_tokens, positions, padding = 0, 0, 0
    timed_tokens, timed_flops, timed_seconds, timed_steps = 0, 0.0, 0.0, 0
    step, stopping = start_step, False
    with StopSignals("base_train") as stop:
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
                                        {**meta, "val_bpb": val_bpb, "best_val_bpb": best_bpb}, head)
            if rank == 0 and step > start_step and (step % args.save_every == 0 or last or stopping):
                # train.csv first: a resume reads its rows up to the checkpoint's step, so they must all be there
                write_csv(run_dir / "train.csv", TRAIN_FIELDS, train_rows)
                save_checkpoint(ckpt_dir / "last.pt", model, optimizers, step, loader.state_dict(),
                                {**meta, "val_bpb": last_bpb, "best_val_bpb": best_bpb}, head)
                plot(run_dir, train_rows, val_rows)
            if stopping and not last:
                print0(f"base_train: stopped by {stop.name} at step {step}/{args.num_steps}, saved in "
                       f"{ckpt_dir / 'last.pt'}; continue with: python -m scripts.base_train --resume {run_dir}")
                return stop.exit_code
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
            # the stop request rides on the loss's all-reduce: every rank stops after the same step
            loss_total, stop_votes = all_reduce_sum([loss_sum.item(), float(stop.requested)], device)
            step_loss, stopping = loss_total / global_targets, stop_votes > 0
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
        padding_fraction = padding / positions if positions else None
        if not real_tokens:  # resumed after its last step was saved: the steps' own rows are what is known
            tps, padding_fraction = throughput_from_rows(train_rows)
        summary = {
            "steps": args.num_steps, "train_seconds": elapsed, "tokens_per_sec": tps,
            "mfu": timed_flops / timed_seconds / peak if timed_seconds else float("nan"), "peak_flops": peak, "final_val_bpb": val_rows[-1]["val_bpb"],
            "best_val_bpb": best_bpb, "final_val_loss": val_rows[-1]["val_loss"], "params": model.num_params(),
            "peak_memory_mb": peak_memory_mb(device), "padding_fraction": padding_fraction,
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
