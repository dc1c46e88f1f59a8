"""Training machinery shared by the training CLIs (scripts.base_train, scripts.rl_train) and scripts.bench_train.

The set-up of a run from its flags, one optimisation step over a rank's micro batches, the learning-rate
schedule, the val loss in bits per byte, throughput helpers (peak FLOPs, peak memory) and the CSV/plot
files every run writes. The CLIs parse flags, own the run directory and the loop's logging.
"""

import csv
import math
import resource
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from echovlm.common import atomic_write_text
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
# the optimiser flags' defaults (base_train's --matrix-lr etc.; bench_train builds its rows from the same)
OPTIM_DEFAULTS = dict(matrix_lr=0.02, embedding_lr=0.2, projector_lr=0.02, unembedding_lr=0.004, weight_decay=0.0)
TRAIN_FIELDS = ["step", "loss", "lr", "lr_mult", "tokens_per_sec", "padding_fraction", "mfu", "elapsed_s"]
VAL_FIELDS = ["step", "val_loss", "val_bpb"]


def make_autocast(device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


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
    args.dtype = args.dtype if args.dtype != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    if args.compile is None:
        args.compile = device_type == "cuda"


def setup_training(args, device, rank: int, world: int):
    """Tokenizer, train/val splits, loader, model and optimizers for complete args (defaults applied).

    Fills in args.sequence_len and args.num_steps where they were left to the data. scripts.bench_train
    builds its runs here too, so it times the very set-up that trains. A missing tokenizer is FileNotFoundError.
    """
    dataset = open_dataset(args.dataset)
    tok_dir = Path(args.dataset) / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"no tokenizer in {tok_dir}: run `python -m scripts.tok_train --dataset "
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


def train_step(train_model, ddp_model, model, optimizers, batches, global_targets: int, autocast, world: int):
    """One optimisation step over this rank's micro batches of the global batch; returns their summed loss.

    ddp_model: the DistributedDataParallel wrapper (None without DDP), whose no_sync() skips the all-reduce of
    every micro batch but the last. scripts.base_train trains with it, scripts.bench_train times it.
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
