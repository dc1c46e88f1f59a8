"""Fine-tune a base run on the clinical reward: sampled reports scored against the study's reference report.

    python -m scripts.rl_train --base runs/speedrun/model
    torchrun --standalone --nproc_per_node=8 -m scripts.rl_train --base runs/base_train
    python -m scripts.rl_train --resume runs/rl                        # continue a killed run

Each step takes --studies-per-step training studies (split over the ranks), samples --samples reports per
study at --temperature, labels each report with the rules test_inference uses (--echoprime-rules for
EchoPrime's), rewards it against the study's reference labels (echovlm.reward: per-trait agreement weighted
so a rare finding counts as much as a common one, closeness of LVEF and PASP, minus --penalty per
contradiction), and makes one policy-gradient step with group-relative advantages (echovlm.rl says why no
KL term or clipping). The learning rates are base_train's times --lr-frac, decayed linearly to zero over
the last --warmdown-frac of the steps. Every --val-every steps the greedy reports of the first --val-studies
val studies are scored the same way; best.pt is the checkpoint with the highest val reward (the base model
itself counts as step 0), last.pt the latest. Each rank samples its share of the studies, and the loss is
normalised by the sampled tokens of the whole global batch, so 1 process and N give the same update for the
same samples.

Ctrl-C or SIGTERM finishes the current step, saves it to checkpoints/last.pt and exits 130 / 143 with the
command that resumes (a second one stops at once, keeping the last checkpoint). --resume takes the settings
the run recorded in its config.json (checked like the command line; a damaged file is refused in one line),
and for a run killed after its last step writes the outputs it had not written yet.

Hardware-aware defaults: on CUDA 200 steps of 64 studies x 8 samples; on CPU 30 steps of 16 studies x 4
samples (~4 minutes on 2 cores). Any flag given overrides its default.

Outputs in run_dir (a new directory under --run-dir, never overwriting a run): config.json, train.csv,
val.csv, train.png, val.png, checkpoints/{last,best}.pt, train_summary.json. test_inference and
generate_report load it exactly like a base run.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from echovlm.checkpoint import load_model, read_checkpoint, save_checkpoint, set_rng_state
from echovlm.clinical import extract_labels
from echovlm.common import (atomic_write_json, compute_cleanup, compute_init, fail, make_autocast, new_run_dir,
                            print0, remove_stale_temps, resolve_dtype, seed_everything)
from echovlm.dataset import open_dataset
from echovlm.echoprime import load_echoprime_rules
from echovlm.engine import Engine
from echovlm.reward import RewardWeights, rewards
from echovlm.rl import advantages, label_and_check, policy_gradient_step, sample_and_score
from echovlm.train import (OPTIM_DEFAULTS, TORCH_DTYPES, StopSignals, all_reduce_sum, lr_multiplier, plot,
                           read_csv, write_csv)

RL_DEFAULTS = {
    "cuda": dict(num_steps=200, studies_per_step=64, samples=8, val_every=25, val_studies=1024, device_batch_size=128,
                 generate_batch_size=512),
    "cpu": dict(num_steps=30, studies_per_step=16, samples=4, val_every=10, val_studies=128, device_batch_size=64,
                generate_batch_size=64),
}
TRAIN_FIELDS = ["step", "reward", "reward_std", "contradictions", "report_tokens", "pg_loss", "lr_mult",
                "reports_per_sec", "elapsed_s"]
VAL_FIELDS = ["step", "val_reward", "val_contradictions_per_1000"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="base_train run directory (or a checkpoint .pt) to fine-tune")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of the base run")
    p.add_argument("--resume", help="run directory of a killed rl_train run: continue it from checkpoints/last.pt "
                                    "with the settings in its config.json (other flags are ignored)")
    p.add_argument("--num-steps", type=int, help="policy-gradient steps (default: 200 on CUDA, 30 on CPU)")
    p.add_argument("--studies-per-step", type=int, help="training studies per step, all ranks together "
                                                        "(default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--samples", type=int, help="reports sampled per study, G >= 2 (default: 8 on CUDA, 4 on CPU)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of those reports")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--penalty", type=float, default=0.25, help="reward lost per contradiction in a report")
    p.add_argument("--lr-frac", type=float, default=0.05, help="learning rates as a fraction of the base run's")
    p.add_argument("--warmdown-frac", type=float, default=0.5, help="fraction of steps at the end decaying the lr to 0")
    p.add_argument("--val-every", type=int, help="steps between val scorings (default: 25 on CUDA, 10 on CPU)")
    p.add_argument("--val-studies", type=int, help="first val studies scored (default: 1024 on CUDA, 128 on CPU)")
    p.add_argument("--weight-studies", type=int, default=5000,
                   help="training reports whose labels set the reward's trait weights (prevalences, spreads)")
    p.add_argument("--device-batch-size", type=int, help="sampled reports per forward pass per rank "
                                                         "(default: 128 on CUDA, 64 on CPU)")
    p.add_argument("--generate-batch-size", type=int, help="rows decoded together (default: 512 on CUDA, 64 on CPU)")
    p.add_argument("--echoprime-rules", help="label with EchoPrime's per_section.json (file or checkout) instead of "
                                             "ours; pass the same to test_inference")
    p.add_argument("--save-every", type=int, help="steps between last.pt saves (default: --val-every)")
    p.add_argument("--log-every", type=int, default=1, help="steps between progress lines")
    p.add_argument("--run-dir", default="runs", help="base directory for run directories")
    p.add_argument("--run-name", default="rl", help="run directory name (a number is appended if taken)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on CUDA and on CPUs with native bf16 matmuls, "
                        "AVX512-BF16 or AMX; fp32 elsewhere)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not args.resume and not args.base:
        p.error("--base is required (or --resume RUNDIR)")
    return args


def apply_defaults(args, device_type: str, world: int):
    for key, value in RL_DEFAULTS["cuda" if device_type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.save_every is None:  # only when not given: --save-every 0 is refused below, not read as "unset"
        args.save_every = args.val_every
    args.dtype = resolve_dtype(args.dtype, device_type)
    error = check_args(args, world)
    if error:
        fail("rl_train", error)


INT_FLAGS = ("num_steps", "studies_per_step", "val_every", "val_studies", "save_every", "log_every", "weight_studies",
             "device_batch_size", "generate_batch_size")


def check_args(args, world: int) -> str | None:
    """What is wrong with a complete set of settings (a new run's after its defaults, or the ones a resumed run
    recorded), as one line naming the flag, or None."""
    for name in INT_FLAGS:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.samples < 2:
        return (f"--samples must be >= 2, got {args.samples}: the advantage compares a report with the other "
                "reports of its study")
    if args.studies_per_step % world:
        return f"--studies-per-step {args.studies_per_step} must be a multiple of the {world} processes"
    for name, low in (("temperature", "> 0"), ("lr_frac", "> 0"), ("penalty", ">= 0")):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
            return f"--{name.replace('_', '-')} must be a finite number {low}, got {value}"
    if not 0 <= args.warmdown_frac <= 1:
        return f"--warmdown-frac must be in [0, 1], got {args.warmdown_frac}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    return None


# settings a run records that may be None: every other one was given or filled in by apply_defaults
NULLABLE = ("top_k", "echoprime_rules")


def resumed_args(run_dir: Path, world: int) -> argparse.Namespace:
    """The settings recorded in run_dir/config.json, each checked as the command line would check it: a damaged
    file (edited by hand, half written by another tool) stops here with one line, not with a traceback later."""
    path = run_dir / "config.json"
    try:
        flags = json.loads(path.read_text())["args"]["flags"]
    except OSError:
        fail("rl_train", f"{run_dir} has no readable config.json; --resume takes a run directory that rl_train made")
    except (ValueError, KeyError, TypeError) as e:
        fail("rl_train", f"{path} is not an rl_train config ({type(e).__name__}: {e}); start a new run without "
                         "--resume")
    if not isinstance(flags, dict):
        fail("rl_train", f"{path} is not an rl_train config (its args.flags is a {type(flags).__name__}); start a "
                         "new run without --resume")
    damaged = f"{path} is damaged"
    restart = "start a new run without --resume"
    for action in build_parser()._actions:
        name = action.dest
        if name in ("help", "resume"):
            continue
        if name not in flags:
            fail("rl_train", f"{damaged}: it lacks --{name.replace('_', '-')}; {restart}")
        value = flags[name]
        if value is None and name in NULLABLE:
            continue
        if action.type is int:
            ok, expected = type(value) is int, "a whole number"
        elif action.type is float:
            ok, expected = type(value) in (int, float), "a number"
        else:
            ok, expected = isinstance(value, str), "a string"
        if ok and action.choices is not None:
            ok, expected = value in action.choices, f"one of {', '.join(action.choices)}"
        if not ok:
            fail("rl_train", f"{damaged}: {name} is {value!r}, expected {expected}; {restart}")
    args = argparse.Namespace(**{**flags, "resume": str(run_dir)})
    error = check_args(args, world)
    if error:
        fail("rl_train", f"{damaged}: it records settings rl_train refuses ({error}); {restart}")
    return args


def base_flags(base: str) -> dict:
    """The base run's learning rates (config.json beside its checkpoints), or base_train's defaults."""
    path = Path(base)
    run = path if path.is_dir() else path.parent.parent
    try:
        flags = json.loads((run / "config.json").read_text())["args"]["flags"]
    except (OSError, ValueError, KeyError, TypeError):
        return dict(OPTIM_DEFAULTS)
    return {k: flags.get(k, v) for k, v in OPTIM_DEFAULTS.items()}


def load_base(args, device):
    """(model, tokenizer, info, dataset, rules) of the base run, each checked, with one-line errors (the rules
    file first: it is the quickest to check)."""
    try:
        rules = load_echoprime_rules(args.echoprime_rules) if args.echoprime_rules else None
    except (FileNotFoundError, ValueError) as e:
        fail("rl_train", f"--echoprime-rules {args.echoprime_rules}: {e}")
    try:
        model, tokenizer, info = load_model(args.base, device, which=args.which)
    except (FileNotFoundError, ValueError) as e:
        fail("rl_train", f"cannot load the base run {args.base}: {e}")
    if not info.get("dataset"):
        fail("rl_train", f"{info['checkpoint']} does not name the dataset it was trained on")
    try:
        dataset = open_dataset(info["dataset"])
    except (FileNotFoundError, ValueError) as e:
        fail("rl_train", f"the base run's dataset {info['dataset']} cannot be opened ({e}); restore it at that path")
    if dataset.embed_dim != model.config.embed_dim:
        fail("rl_train", f"{info['dataset']} has {dataset.embed_dim}-d embeddings but the base model reads "
                         f"{model.config.embed_dim}-d ones: the dataset does not match the run")
    return model, tokenizer, info, dataset, rules


def validate(engine, embeddings, ref_labels, weights, args, rules) -> tuple[float, float]:
    """(mean reward, contradictions per 1,000) of the greedy reports of the fixed val subset."""
    texts = [s[0] for s in engine.generate_text(embeddings, temperature=0.0, batch_size=args.generate_batch_size)]
    labels, n_contra = label_and_check(texts, rules)
    return float(rewards(labels, ref_labels, weights, n_contra).mean()), float(1000 * n_contra.mean())


def main(argv=None):
    args = parse_args(argv)
    ddp, rank, local_rank, world, device = compute_init(args.device)
    try:
        return train(args, ddp, rank, world, device)
    finally:
        compute_cleanup()


# what rl_train writes with echovlm.common's atomic writes, by directory: the temp files a killed save leaves
# of these (and only these) are removed when the run is resumed
RUN_FILES = ("config.json", "train.csv", "val.csv", "train_summary.json")
CHECKPOINT_FILES = ("last.pt", "best.pt")


def train(args, ddp, rank, world, device):
    ckpt = None
    if args.resume:
        run_dir = Path(args.resume)
        args = resumed_args(run_dir, world)
        if rank == 0:  # a resume owns its run directory: nothing else writes there now
            remove_stale_temps(run_dir, RUN_FILES)
            remove_stale_temps(run_dir / "checkpoints", CHECKPOINT_FILES)
        try:
            ckpt = read_checkpoint(run_dir / "checkpoints" / "last.pt")
        except (FileNotFoundError, ValueError) as e:
            fail("rl_train", f"{e}; the run stopped before its first checkpoint: start it again without --resume")
        if ckpt["step"] >= args.num_steps:
            if (run_dir / "train_summary.json").is_file():
                print0(f"{run_dir} finished all {args.num_steps} steps already; nothing to do (start a new run to "
                       "train more)")
            else:  # killed after its final last.pt: the steps are done, the outputs after them are not
                print0(f"{run_dir} finished all {args.num_steps} steps before it was stopped; writing its summary")
                if rank == 0:
                    finish(run_dir, args, read_csv(run_dir / "train.csv", ckpt["step"]),
                           read_csv(run_dir / "val.csv", ckpt["step"]), ckpt["meta"]["best_val_reward"], world, device)
            return 0
    else:
        apply_defaults(args, device.type, world)
    seed_everything(args.seed)
    try:
        setup = prepare(args, ckpt, ddp, rank, world, device)
    except KeyboardInterrupt:  # Ctrl-C while loading, before the loop's signal handling is in place
        fail("rl_train", "interrupted before the first step; nothing was trained" +
             (f" (the run {args.resume} is as it was)" if ckpt is not None else ""), 130)
    return loop(args, ckpt, rank, world, device, **setup)


def prepare(args, ckpt, ddp, rank, world, device) -> dict:
    """Everything the training loop needs: model, optimisers, data, reward weights, and (for a new run, once
    every input is checked) the run directory with its config.json."""
    model, tokenizer, info, dataset, rules = load_base(args, device)
    lrs = {k: v * args.lr_frac if k != "weight_decay" else v for k, v in base_flags(args.base).items()}
    optimizers = model.setup_optimizers(**lrs, ns_dtype=TORCH_DTYPES[args.dtype])
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        set_rng_state(ckpt["rng"])
    train_emb, train_reports = dataset.embeddings("train"), dataset.reports("train")
    n_val = min(args.val_studies, len(dataset.studies("val")))
    if len(train_reports) < args.studies_per_step or n_val < 1:
        fail("rl_train", f"{info['dataset']} has {len(train_reports)} train and {n_val} val studies: at least "
                         f"--studies-per-step ({args.studies_per_step}) and 1 are needed")
    n_weight = min(args.weight_studies, len(train_reports))
    weights = RewardWeights.from_labels([extract_labels(r, rules) for r in train_reports[:n_weight]], args.penalty)
    val_emb = dataset.embeddings("val")[:n_val]
    val_refs = [extract_labels(r, rules) for r in dataset.reports("val")[:n_val]]

    if ckpt is not None:
        run_dir = Path(args.resume)
    else:  # made only now, every input checked: a refused run leaves no directory behind
        name = [str(new_run_dir(args.run_dir, args.run_name)) if rank == 0 else None]
        if ddp:
            torch.distributed.broadcast_object_list(name, src=0)
        run_dir = Path(name[0])
        if rank == 0:
            atomic_write_json(run_dir / "config.json", {
                "args": {"flags": vars(args), "world_size": world}, "stage": "rl",
                "base": {**info, "findings": info.get("findings") is not None},  # the head itself is in the .pt
                "dataset": info["dataset"], "tokenizer_dir": info["tokenizer_dir"], "world_size": world,
                "device": str(device), "torch": torch.__version__, "reward_weights": weights.to_dict(),
                "model": {**info["config"], "params": model.num_params()}})

    model.train()
    ddp_model = None
    if ddp:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return dict(run_dir=run_dir, model=model, ddp_model=ddp_model, optimizers=optimizers, tokenizer=tokenizer,
                info=info, rules=rules, weights=weights, train_emb=train_emb, train_reports=train_reports,
                val_emb=val_emb, val_refs=val_refs)


def loop(args, ckpt, rank, world, device, run_dir, model, ddp_model, optimizers, tokenizer, info, rules, weights,
         train_emb, train_reports, val_emb, val_refs):
    """The policy-gradient steps, from step 0 or the checkpoint's step, with val scoring and checkpoints.

    Ctrl-C or SIGTERM finishes the current step, saves it to last.pt and returns 130 / 143 (as base_train,
    with the same echovlm.train.StopSignals); a second one stops at once, keeping the last checkpoint."""
    engine = Engine(model, tokenizer, args.dtype)  # samples in the precision the step trains in
    train_model = ddp_model if ddp_model is not None else model
    autocast = make_autocast(device, args.dtype)
    ckpt_dir = run_dir / "checkpoints"
    # the base run's label rules and findings head go into every checkpoint unchanged: the head decides the findings
    # a prompted report states (RL trains the free reports only, echovlm.rl), and load_model refuses a prompted
    # model without its head
    meta = {"dataset": info["dataset"], "tokenizer_dir": info["tokenizer_dir"], "base_checkpoint": info["checkpoint"],
            "stage": "rl", "rules": info.get("rules"), "rules_key": info.get("rules_key")}
    head = info.get("findings")
    start_step, best = (ckpt["step"], ckpt["meta"]["best_val_reward"]) if ckpt is not None else (0, -math.inf)
    if ckpt is not None:
        print0(f"resuming {run_dir} at step {start_step}")
    train_rows = read_csv(run_dir / "train.csv", start_step) if rank == 0 else []
    val_rows = read_csv(run_dir / "val.csv", start_step) if rank == 0 else []
    print0(f"run {run_dir}: fine-tuning {info['checkpoint']} (step {info.get('step')}) on the clinical reward, "
           f"{args.num_steps} steps of {args.studies_per_step} studies x {args.samples} samples at temperature "
           f"{args.temperature}, lr x{args.lr_frac}, {world} rank(s), {device} {args.dtype}")

    elapsed = train_rows[-1]["elapsed_s"] if train_rows else 0.0
    last_val = val_rows[-1]["val_reward"] if val_rows else float("nan")
    step, stopping = start_step, False
    with StopSignals("rl_train") as stop:
        while True:
            last = step == args.num_steps
            if (step % args.val_every == 0 or last) and not (ckpt is not None and step == start_step):
                model.eval()
                if rank == 0:  # greedy decoding is deterministic: one rank scores the whole subset
                    last_val, contra = validate(engine, val_emb, val_refs, weights, args, rules)
                    print0(f"step {step:4d}/{args.num_steps} | val reward {last_val:.4f} | val contradictions "
                           f"{contra:.1f} per 1,000")
                    val_rows.append({"step": step, "val_reward": last_val, "val_contradictions_per_1000": contra})
                    write_csv(run_dir / "val.csv", VAL_FIELDS, val_rows)
                    if last_val > best:
                        best = last_val
                        save_checkpoint(ckpt_dir / "best.pt", model, optimizers, step, {"step": step},
                                        {**meta, "val_reward": last_val, "best_val_reward": best}, findings=head)
                model.train()
            if rank == 0 and (step > start_step or step == 0) and (step % args.save_every == 0 or last or stopping):
                # train.csv first: a resume reads its rows up to the checkpoint's step, so they must all be there
                write_csv(run_dir / "train.csv", TRAIN_FIELDS, train_rows)
                save_checkpoint(ckpt_dir / "last.pt", model, optimizers, step, {"step": step},
                                {**meta, "val_reward": last_val, "best_val_reward": best}, findings=head)
                plot(run_dir, train_rows, val_rows, ("reward", "contradictions"), ("val_reward",))
            if stopping and not last:
                print0(f"rl_train: stopped by {stop.name} at step {step}/{args.num_steps}, saved in "
                       f"{ckpt_dir / 'last.pt'}; continue with: python -m scripts.rl_train --resume {run_dir}")
                return stop.exit_code
            if last:
                break

            t0 = time.perf_counter()
            # the global batch of this step: a seeded draw from the train split, known to every rank
            studies = np.random.default_rng([args.seed, step]).choice(len(train_reports), args.studies_per_step,
                                                                      replace=False)[rank::world]
            refs = [extract_labels(train_reports[i], rules) for i in studies]
            model.eval()
            try:
                samples = sample_and_score(engine, [train_emb[i] for i in studies], refs, weights, args.samples,
                                           args.temperature, args.top_k, seed=args.seed * 1_000_003 + step * 1009 + rank,
                                           batch_size=args.generate_batch_size, rules=rules)
            except FloatingPointError as e:
                fail("rl_train", f"step {step}: {e}. Stopped; {ckpt_dir / 'last.pt'} holds the last good state", 1)
            model.train()
            adv = advantages(samples.rewards, args.samples)
            n_tokens = sum(len(t) + 1 for t in samples.tokens)
            lrm = lr_multiplier(step, args.num_steps, 0.0, args.warmdown_frac, 0.0)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            global_tokens, reward_sum, reward_sq, contra_sum, n_reports = all_reduce_sum(
                [n_tokens, samples.rewards.sum(), (samples.rewards ** 2).sum(), samples.contradictions.sum(),
                 len(samples.tokens)], device)
            pg = policy_gradient_step(train_model, ddp_model, model, optimizers, samples, adv, int(global_tokens),
                                      tokenizer, model.config.sequence_len, args.device_batch_size, autocast, world)
            # the stop request rides on the loss's all-reduce: every rank stops after the same step
            pg, stop_votes = all_reduce_sum([pg, float(stop.requested)], device)
            pg, stopping = pg / global_tokens, stop_votes > 0
            dt = time.perf_counter() - t0
            step += 1
            if not math.isfinite(pg) or not all(math.isfinite(p.detach().float().sum()) for p in model.parameters()):
                print0(f"rl_train: the policy-gradient loss became {pg} at step {step} (lr multiplier {lrm:.3g}). "
                       f"Stopped; {ckpt_dir / 'last.pt'} holds the last good state. Lower --lr-frac and start again")
                return 1
            elapsed += dt
            mean = reward_sum / n_reports
            row = {"step": step, "reward": mean, "reward_std": math.sqrt(max(reward_sq / n_reports - mean ** 2, 0.0)),
                   "contradictions": contra_sum / n_reports, "report_tokens": global_tokens / n_reports - 1,
                   "pg_loss": pg, "lr_mult": lrm, "reports_per_sec": n_reports / dt, "elapsed_s": elapsed}
            if rank == 0:
                train_rows.append(row)
            if step % args.log_every == 0 or step == args.num_steps:
                print0(f"step {step:4d}/{args.num_steps} | reward {mean:.4f} | contradictions "
                       f"{row['contradictions']:.3f} | lrm {lrm:.3f} | {row['reports_per_sec']:.1f} reports/s | "
                       f"{elapsed:.0f}s")
                if rank == 0:
                    write_csv(run_dir / "train.csv", TRAIN_FIELDS, train_rows)

    if rank == 0:
        finish(run_dir, args, train_rows, val_rows, best, world, device)
    return 0


def finish(run_dir: Path, args, train_rows: list[dict], val_rows: list[dict], best: float, world: int, device):
    """train.csv, the plots and train_summary.json of a run whose steps are all done (also for a run killed
    after its final checkpoint, from the rows it had written)."""
    write_csv(run_dir / "train.csv", TRAIN_FIELDS, train_rows)
    plot(run_dir, train_rows, val_rows, ("reward", "contradictions"), ("val_reward",))
    elapsed = train_rows[-1]["elapsed_s"] if train_rows else 0.0
    reports = len(train_rows) * args.studies_per_step * args.samples
    summary = {"stage": "rl", "steps": args.num_steps, "train_seconds": elapsed,
               "reports_per_sec": reports / elapsed if elapsed else None,
               "start_val_reward": val_rows[0]["val_reward"] if val_rows else None,
               "final_val_reward": val_rows[-1]["val_reward"] if val_rows else None, "best_val_reward": best,
               "first_reward": train_rows[0]["reward"] if train_rows else None,
               "last_reward": train_rows[-1]["reward"] if train_rows else None,
               "world_size": world, "device": str(device)}
    atomic_write_json(run_dir / "train_summary.json", summary)
    start = f"{summary['start_val_reward']:.4f}" if val_rows else "n/a"
    print0(f"done: {args.num_steps} steps in {elapsed:.0f}s, val reward {start} -> best {best:.4f}, summary in "
           f"{run_dir / 'train_summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
