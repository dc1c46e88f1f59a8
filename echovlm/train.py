"""Training machinery shared by the training CLIs (scripts.base_train, scripts.rl_train) and scripts.bench_train.

The set-up of a run from its flags, one optimisation step over a rank's micro batches, the learning-rate
schedule, the val loss in bits per byte, throughput helpers (peak FLOPs, peak memory) and the CSV/plot
files every run writes. The CLIs parse flags, own the run directory and the loop's logging.
"""

import csv
import json
import math
import os
import resource
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from echovlm.common import atomic_write_text, get_rank, resolve_dtype
from echovlm.dataset import open_dataset
from echovlm.echoprime import load_echoprime_rules
from echovlm.labels import dataset_labels
from echovlm.gpt import GPT, GPTConfig
from echovlm.loader import DeviceSplit, TrainLoader
from echovlm.tokenizer import CONFIG_FILE, STATS_FILE, Tokenizer, check_tokens_current, tokenizer_dir
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, DEFAULT_VOCAB_SIZE

# dense bf16 peak of the accelerators we know; MFU is left out (nan) elsewhere rather than guessed
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}

# CPU: a val evaluation costs about 6 s on 2 cores, as much as 2-3 steps; every 100 steps is 4 of them in a run.
# 360 steps fit the 20-minute speedrun with bf16 (echovlm.common.bf16_native); at 300 the GPT left the prompts
# of 2-3 findings unwritten and the free report under the GPT-only model's (README, Results)
HARDWARE_DEFAULTS = {
    "cuda": dict(depth=8, total_batch_size=256, device_batch_size=64, epochs=2.0, num_steps=None, eval_every=250,
                 eval_studies=4096),
    "cpu": dict(depth=4, total_batch_size=32, device_batch_size=32, epochs=None, num_steps=360, eval_every=100,
                eval_studies=256),
}
# the optimiser flags' defaults (base_train's --matrix-lr etc.; bench_train builds its rows from the same)
OPTIM_DEFAULTS = dict(matrix_lr=0.02, embedding_lr=0.2, projector_lr=0.02, unembedding_lr=0.004, weight_decay=0.0)
TRAIN_FIELDS = ["step", "loss", "lr", "lr_mult", "tokens_per_sec", "padding_fraction", "mfu", "elapsed_s"]
VAL_FIELDS = ["step", "val_loss", "val_bpb"]


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # a resolved --dtype


def apply_hardware_defaults(args, device_type: str, world: int):
    """Fill the size and precision flags left as None with HARDWARE_DEFAULTS for this device; a given
    --num-steps excludes the default --epochs and the other way round."""
    defaults = HARDWARE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key) is None and not (key == "epochs" and args.num_steps is not None) \
                and not (key == "num_steps" and args.epochs is not None):
            setattr(args, key, value)
    if args.device_batch_size * world > args.total_batch_size:
        args.device_batch_size = max(1, args.total_batch_size // world)
    args.dtype = resolve_dtype(args.dtype, device_type)
    if args.compile is None:
        args.compile = device_type == "cuda"


class InputError(ValueError):
    """A training input (dataset, tokenizer, token files, batch sizes) is missing, damaged or does not fit: the
    message says which file or flag and what to do. The CLIs print it as one line (common.fail, exit 2)."""


def setup_training(args, device, rank: int, world: int):
    """Tokenizer, train/val splits, loader, model and optimizers for complete args (defaults applied).

    Fills in args.sequence_len, args.num_steps and args.vocab_size (absent or None: the dataset's only
    tokenizer) where they were left to the data. scripts.bench_train builds its runs here too, so it times the
    very set-up that trains. Every input is checked before anything is built or written: a missing, truncated,
    pickled, stale or mismatched one is an InputError whose message says which and what to do.
    """
    try:
        dataset = open_dataset(args.dataset)
        tok_dir = find_tokenizer(dataset.path, getattr(args, "vocab_size", None))
        args.vocab_size = json.loads((tok_dir / STATS_FILE).read_text())["settings"]["vocab_size"]
        # the reports hashed again against tok_train's checksum: never train on tokens of edited reports
        check_tokens_current(dataset, tok_dir)
        tokenizer = Tokenizer.load(tok_dir)
        pad_multiple = 32 if args.compile else 1  # fewer distinct batch shapes for torch.compile to specialise on
        # a run from before the findings prompt has none of these flags: it is a model without one
        findings = getattr(args, "findings", False)
        labels = run_labels(dataset, getattr(args, "echoprime_rules", None), rank) if findings else {}
        train_split = _device_split(dataset, "train", tok_dir, tokenizer, args.sequence_len, device, pad_multiple,
                                    labels.get("train"))
        args.sequence_len = train_split.sequence_len
        val_split = _device_split(dataset, "val", tok_dir, tokenizer, args.sequence_len, device, pad_multiple,
                                  labels.get("val"))
        loader = TrainLoader(train_split, args.total_batch_size, args.device_batch_size, rank, world, args.seed,
                             length_grouping=args.length_grouping,
                             prompt_dropout=getattr(args, "prompt_dropout", 0.0) if findings else 0.0,
                             swap_embeddings=getattr(args, "swap_embeddings", 0.0) if findings else 0.0,
                             balance_findings=getattr(args, "balance_findings", 0.0) if findings else 0.0)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from e
    if args.num_steps is None:
        args.num_steps = max(1, round(args.epochs * loader.batches_per_epoch))

    config = GPTConfig(depth=args.depth, vocab_size=tokenizer.vocab_size, embed_dim=train_split.embed_dim,
                       sequence_len=args.sequence_len, n_findings=len(BINARY_TRAITS) if findings else 0,
                       n_values=len(CONTINUOUS_TRAITS) if findings else 0)
    model = GPT(config).to(device)
    optimizers = model.setup_optimizers(matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                        projector_lr=args.projector_lr, unembedding_lr=args.unembedding_lr,
                                        weight_decay=args.weight_decay, ns_dtype=TORCH_DTYPES[args.dtype])
    return tok_dir, tokenizer, train_split, val_split, loader, config, model, optimizers


def find_tokenizer(dataset_path: Path, vocab_size: int | None) -> Path:
    """The dataset's tokenizer directory of `vocab_size` (scripts.tok_train's layout); with None its only one, or
    of several the one of the default size (DEFAULT_VOCAB_SIZE, what tok_train makes when not told a size)."""
    train = f"`python -m scripts.tok_train --dataset {dataset_path}"
    if vocab_size is not None:
        tok_dir = tokenizer_dir(dataset_path, vocab_size)
        if not (tok_dir / STATS_FILE).is_file():
            raise FileNotFoundError(f"no finished tokenizer of vocab size {vocab_size} in {tok_dir}: run "
                                    f"{train} --vocab-size {vocab_size}` first")
        return tok_dir
    found = sorted(d for d in dataset_path.glob("tokenizer*") if (d / CONFIG_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"no tokenizer in {dataset_path}: run {train}` first")
    if len(found) > 1:
        default = tokenizer_dir(dataset_path, DEFAULT_VOCAB_SIZE)  # the one tok_train makes when not told a size
        if default in found:
            return find_tokenizer(dataset_path, DEFAULT_VOCAB_SIZE)
        raise ValueError(f"{dataset_path} holds several tokenizers ({', '.join(d.name for d in found)}); say which "
                         "one with --vocab-size")
    if not (found[0] / STATS_FILE).is_file():
        raise FileNotFoundError(f"{found[0]} has no {STATS_FILE}: tok_train never finished there; run {train}` again")
    return found[0]


def read_split_tokens(tok_dir: Path, split: str, n_studies: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of one split as scripts.tok_train wrote them, checked against the dataset's split size
    and the tokenizer's vocabulary, so a truncated, pickled, swapped or stale file is a clear ValueError."""
    retrain = _retrain_hint(tok_dir)
    arrays = []
    for kind in ("tokens", "offsets"):
        path = tok_dir / f"{split}_{kind}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `python -m scripts.tok_train --dataset {tok_dir.parent}` "
                                    "to train the tokenizer and encode the reports")
        try:
            a = np.load(path, mmap_mode="r" if kind == "tokens" else None, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise ValueError(f"{path} cannot be read as a .npy array (truncated, damaged or pickled: {e}); "
                             f"{retrain}") from None
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"{path} is not a 1-D integer array (found {getattr(a, 'dtype', type(a).__name__)} "
                             f"{getattr(a, 'shape', '')}); {retrain}")
        arrays.append(a)
    tokens, offsets = arrays
    if len(offsets) != n_studies + 1:
        raise ValueError(f"{tok_dir}/{split}_offsets.npy covers {len(offsets) - 1} reports but the dataset's {split} "
                         f"split has {n_studies} studies (truncated, or files of another split or dataset); {retrain}")
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(tokens):
        raise ValueError(f"{tok_dir}/{split}_offsets.npy does not describe {split}_tokens.npy ({len(tokens)} tokens; "
                         f"offsets from {offsets[0]} to {offsets[-1]}): one of them is truncated or edited; {retrain}")
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{tok_dir}/{split}_tokens.npy holds token id {int(tokens.max())}, beyond the tokenizer's "
                         f"{vocab_size} tokens: it was encoded with another tokenizer; {retrain}")
    return tokens, offsets


def _retrain_hint(tok_dir: Path) -> str:
    try:
        size = f" --vocab-size {int(json.loads((tok_dir / STATS_FILE).read_text())['settings']['vocab_size'])}"
    except (OSError, ValueError, KeyError, TypeError):
        size = ""
    return f"re-encode with `python -m scripts.tok_train --dataset {tok_dir.parent}{size} --out {tok_dir} --force`"


def run_labels(dataset, rules_path, rank: int) -> dict:
    """{"train", "val": (N, 25) label matrices} of the reference reports (echovlm.labels, cached beside the
    dataset): the findings prompts' training targets. Rank 0 computes a missing cache while the others wait."""
    rules = load_echoprime_rules(rules_path) if rules_path else None
    if dist.is_initialized() and rank != 0:
        dist.barrier()
    labels = dataset_labels(dataset, rules)
    if dist.is_initialized() and rank == 0:
        dist.barrier()
    return {split: labels[slice(*dataset._split(split))] for split in ("train", "val")}


def _device_split(dataset, split, tok_dir, tokenizer, sequence_len, device, pad_multiple, labels=None):
    emb, emb_offsets = dataset.embedding_block(split)
    tokens, offsets = read_split_tokens(tok_dir, split, len(emb_offsets) - 1, tokenizer.vocab_size)
    return DeviceSplit(tokens, offsets, emb, emb_offsets, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                       sequence_len, device, name=split, pad_multiple=pad_multiple, labels=labels)


class StopSignals:
    """SIGINT/SIGTERM caught while training, so a run stops at the end of a step with its state saved.

        with StopSignals("base_train") as stop:
            for step in ...:
                ... one step ...
                if stop.requested:       # under DDP: all-reduce float(stop.requested) so every rank agrees
                    save the checkpoint, print how to resume
                    return stop.exit_code

    The first signal only sets .signum (and says the step will finish and be saved); a second one stops at
    once without saving (SystemExit with exit_code; the last checkpoint written stays). exit_code is 128 +
    the signal number, as a shell reports a process killed by it: 130 for SIGINT, 143 for SIGTERM (and 143 on
    a rank that learned of the stop from another rank). Outside the `with` the previous handlers are back.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, script: str):
        self.script, self.signum, self._previous = script, None, {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            self._say(f"{name} again: stopping now without saving (the last checkpoint written is kept)")
            raise SystemExit(128 + signum)
        self.signum = signum
        self._say(f"{name}: finishing this step and saving it (send it again to stop at once)")

    def _say(self, message: str):
        # straight to the file descriptor: the signal may have interrupted a print, which must not be re-entered
        if get_rank() == 0:
            try:
                os.write(sys.stderr.fileno(), f"{self.script}: {message}\n".encode())
            except (OSError, ValueError):
                pass

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)


def train_step(train_model, ddp_model, model, optimizers, batches, global_targets: int, autocast, world: int):
    """One optimisation step over this rank's micro batches of the global batch; returns their summed loss.

    ddp_model: the DistributedDataParallel wrapper (None without DDP), whose no_sync() skips the all-reduce of
    every micro batch but the last. scripts.base_train trains with it, scripts.bench_train times it.
    """
    loss_sum = torch.zeros((), device=batches[0].ids.device)
    for a, b in enumerate(batches):
        sync = nullcontext() if ddp_model is None or a == len(batches) - 1 else ddp_model.no_sync()
        with sync, autocast:
            loss = train_model(b.ids, b.prefix, b.prefix_mask, b.targets, loss_reduction="sum", **b.prompt)
        # DDP averages gradients over ranks: x world makes the result the global-batch token mean
        (loss * (world / global_targets)).backward()
        loss_sum += loss.detach()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum


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
            loss = model(b.ids, b.prefix, b.prefix_mask, b.targets, loss_reduction="none", **b.prompt)
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


def plot(run_dir: Path, train_rows: list[dict], val_rows: list[dict], train_keys=("loss",),
         val_keys=("val_loss", "val_bpb")):
    """train.png and val.png: one panel per key against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, rows, keys in (("train", train_rows, train_keys), ("val", val_rows, val_keys)):
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
