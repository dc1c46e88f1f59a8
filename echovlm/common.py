"""Shared plumbing: device choice, distributed set-up, logging, seeding, run directories, atomic writes."""

import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist


def is_ddp() -> bool:
    # torchrun sets these for every worker; a plain `python -m` run has none of them
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def get_rank() -> int:
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs):
    """print on rank 0 only, so N workers do not print N copies of every line."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def fail(script: str, message: str, code: int = 2) -> NoReturn:
    """The one way a script stops: one line on stderr, exit 2 for bad usage or input, 1 for a failure while running.

    Callers say what was wrong and what to do; no traceback reaches the user for a fault that is theirs.
    """
    print(f"{script}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def autodetect_device(preferred: str = "auto") -> str:
    if preferred != "auto":
        if preferred.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {preferred} was asked for but torch sees no CUDA GPU; use --device cpu or auto")
        if preferred == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("--device mps was asked for but MPS is not available; use --device cpu or auto")
        return preferred
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(preferred: str = "auto"):
    """Pick the device and, under torchrun, join the process group.

    Returns (ddp, rank, local_rank, world_size, device). NCCL on CUDA, gloo elsewhere, so the same
    script runs as 2 CPU processes in the tests and as 8 GPUs per node in production.
    """
    device_type = autodetect_device(preferred).split(":")[0]
    if not is_ddp():
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device(device_type)
        return False, 0, 0, 1, device
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
    return True, rank, local_rank, world, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(base: str | os.PathLike, name: str) -> Path:
    """Create base/name, or base/name1, name2, ... if taken: an earlier run is never overwritten."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    for i in range(100_000):
        path = base / (name if i == 0 else f"{name}{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not find a free run directory name under {base}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes):
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
