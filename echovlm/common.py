"""Shared plumbing: device choice, distributed set-up, logging, seeding, run directories, atomic writes."""

import glob
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterable
from contextlib import nullcontext
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


def bf16_native(device_type: str) -> bool:
    """Whether this device multiplies bf16 matrices in hardware: CUDA, or a CPU with AVX512-BF16 or AMX tiles.

    "auto" precision (training and generation) is bf16 autocast where this holds and fp32 elsewhere. On the
    development machine's AMD EPYC cores (AVX512-BF16) a bf16 matmul of the training step's shape runs 3.9x
    fp32's and a depth-4 training step 1.8x (scripts.bench_train --dtype bf16 against --dtype fp32); a CPU
    without those instructions emulates bf16 (echovlm/optim.py: 3x slower Muon steps on an AVX2 machine). torch
    says which CPU features it found only through private torch.cpu helpers: one that is missing counts as no.
    """
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))


def resolve_dtype(dtype: str, device_type: str) -> str:
    """A --dtype flag's value: "auto" becomes bf16 where bf16_native, else fp32; "bf16" and "fp32" are kept."""
    return dtype if dtype != "auto" else ("bf16" if bf16_native(device_type) else "fp32")


def make_autocast(device, dtype: str):
    """The context a resolved dtype computes in: bf16 autocast on that device, or nothing (fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


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


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only read by setting)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | os.PathLike, directory: bool = False):
    """Give a mkstemp/mkdtemp result the mode a plain open()/mkdir() would have had (0666/0777 less the umask).

    mkstemp and mkdtemp create 0600/0700 whatever the umask, and a rename keeps the mode: without this a team
    sharing data/ or runs/ could not read each other's files.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def make_temp_dir(beside: str | os.PathLike, tag: str) -> Path:
    """An empty directory `.NAME.TAG-XXXX` next to `beside`, mode as mkdir would give it: build there, then
    rename into place with replace_dir."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.{tag}-"))
    chmod_as_created(tmp, directory=True)
    return tmp


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike, ours: Iterable[str]):
    """Move the complete directory `tmp` to `out` (one rename: a reader sees the old directory or the new one).

    An existing `out` is renamed aside first; whatever in it is not one of the file names `ours` (a later
    step's output, a user's file) is then moved into the new directory, and only our old files are deleted.
    A crash between those renames leaves the old directory whole in `.OUT.old-XXXX` beside `out`.
    """
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    ours = set(ours)
    for entry in sorted(old.iterdir()):
        if entry.name not in ours:
            os.rename(entry, out / entry.name)
    shutil.rmtree(old)


def note_leftovers(out: str | os.PathLike, script: str):
    """Say what an interrupted make_temp_dir/replace_dir left beside `out`. Not deleted here: another run of
    `script` may be writing its partial directory right now, and an old one may hold a user's files."""
    out = Path(out)
    partial = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if partial:
        print0(f"note: {', '.join(map(str, partial))} left by an interrupted {script}; delete when none is running")
    aside = sorted(out.parent.glob(f".{out.name}.old-*"))
    if aside:
        print0(f"note: {', '.join(map(str, aside))} holds what {out} held before an interrupted replacement; move "
               f"back what you need from it, then delete it")


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
        chmod_as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_temps(directory: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the `.NAME.XXXXXXXX.tmp` files (mkstemp's 8 random characters) that atomic writes of `names` in
    `directory` left when their process was killed mid-write (SIGKILL, power loss: no except clause ran), and
    return them.

    Only for a directory that no other process is writing, e.g. a run's own directory when the run is resumed;
    anything not named by `names` is left alone.
    """
    removed = []
    for name in names:
        for tmp in sorted(Path(directory).glob(f".{glob.escape(name)}.{'?' * 8}.tmp")):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def atomic_torch_save(obj, path: str | os.PathLike):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        chmod_as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
