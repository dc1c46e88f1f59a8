"""Checkpoints: save/resume a training run, and load a trained model for inference.

A checkpoint is one .pt file of tensors and plain containers only (no pickled classes), so it loads with
torch.load(weights_only=True): opening a checkpoint someone sent you cannot run code. It holds

    model          the model's state_dict (uncompiled, unwrapped names)
    config         asdict(GPTConfig)
    optimizers     each optimiser's state_dict, in setup_optimizers order
    step           optimisation steps done
    loader         the training loader's position (epoch, batch in epoch)
    rng            torch / cuda / numpy / python RNG states, as tensors and lists
    meta           dataset path, tokenizer dir, val bpb at this step, best val bpb so far, the label rules
    findings       the findings head (echovlm.findings: its sizes, weights and decision thresholds), absent in a
                   run made before the head existed or trained with --no-findings

Training writes run_dir/checkpoints/last.pt (every --save-every steps and at the end) and best.pt (lowest
val bpb), each atomically (a crash mid-save leaves the previous file intact).
"""

import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from echovlm.common import atomic_torch_save
from echovlm.findings import FindingsHead
from echovlm.gpt import GPT, GPTConfig
from echovlm.tokenizer import Tokenizer

FORMAT_VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's own device only: the _all variants would open a CUDA context on every visible GPU
        # from every rank under torchrun
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path, model: GPT, optimizers, step: int, loader_state: dict, meta: dict,
                    findings: FindingsHead | None = None):
    atomic_torch_save({
        **({"findings": findings.to_checkpoint()} if findings is not None else {}),
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "config": asdict(model.config),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "step": step,
        "loader": dict(loader_state),
        "rng": rng_state(),
        "meta": dict(meta),
    }, path)


def read_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) with one-line errors that say which file is wrong and what to do.

    A file holding pickled classes is refused unread, and torch's hint to re-run it with weights_only=False
    never reaches the user: for a file we refuse on purpose that advice is the attack."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} was refused unread: it holds pickled Python objects, which an echovlm checkpoint "
                         "never does (loading it could run code). Use a checkpoint that base_train wrote") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        detail = f"{type(e).__name__}" + (f": {first}" if first and "weights_only" not in first else "")
        raise ValueError(f"{path} is not a readable echovlm checkpoint (truncated or corrupt file, or not a torch "
                         f"checkpoint; {detail}). Use the other checkpoint (best.pt / last.pt) of the run or "
                         "retrain") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION or "model" not in ckpt:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an echovlm checkpoint of format {FORMAT_VERSION} (found {found!r}); "
                         "it was written by another program or another version of echovlm")
    wrong = [k for k in ("model", "config", "meta") if not isinstance(ckpt.get(k, {}), dict)]
    if wrong:
        raise ValueError(f"{path} is damaged: its {', '.join(wrong)} entry is not a mapping; use the run's other "
                         "checkpoint or retrain")
    return ckpt


def build_model(ckpt: dict, path, device) -> GPT:
    try:
        # a model saved before kv_heads has one key/value head per query head
        config = GPTConfig(**{"kv_heads": 0, **ckpt["config"]})
    except TypeError as e:
        raise ValueError(f"{path}: its model config {ckpt['config']} does not fit this version's GPTConfig: {e}") from None
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]  # torch lists every key over several lines; one line suffices
        raise ValueError(f"{path}: the saved weights do not match the model its config describes ({detail}); "
                         "the file was edited or damaged, use the run's other checkpoint or retrain") from None
    return model.to(device)


def resolve(path, which: str = "best") -> Path:
    """A .pt file as is; a run directory -> run/checkpoints/{which}.pt (or last.pt if no best was kept)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a checkpoint file nor a run directory")
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    ckpt_dir = path / "checkpoints"
    for name in (which, "last"):
        if (ckpt_dir / f"{name}.pt").is_file():
            return ckpt_dir / f"{name}.pt"
    raise FileNotFoundError(f"{ckpt_dir} holds no {which}.pt or last.pt: did training of {path} save a checkpoint "
                            "(it does at the first evaluation)?")


def load_model(path, device, which: str = "best"):
    """(model in eval mode on device, its tokenizer, info) from a run directory or a .pt file.

    info: config (dict), step, dataset (path of the prepared dataset it was trained on), tokenizer_dir,
    val_bpb (at that checkpoint), best_val_bpb, checkpoint (the file read), findings (the FindingsHead on
    device, or None for a model without one: it writes free reports only), rules (the label rules it was
    trained with: None for echovlm.clinical's, else the EchoPrime rules file), rules_key.
    """
    file = resolve(path, which)
    ckpt = read_checkpoint(file, map_location="cpu")
    model = build_model(ckpt, file, device)
    model.eval()
    meta = ckpt.get("meta", {})
    tok_dir = Path(meta.get("tokenizer_dir", ""))
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{file} was trained with the tokenizer at {tok_dir}, which is not there any more; "
                                "restore the prepared dataset (and its tokenizer/) at that path")
    tokenizer = Tokenizer.load(tok_dir)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer at {tok_dir} has {tokenizer.vocab_size} tokens but {file} was trained with "
                         f"{model.config.vocab_size}: the tokenizer was retrained after this model; retrain the model")
    info = {"config": dict(ckpt["config"]), "step": ckpt.get("step"), "dataset": meta.get("dataset"),
            "tokenizer_dir": str(tok_dir), "val_bpb": meta.get("val_bpb"), "best_val_bpb": meta.get("best_val_bpb"),
            "checkpoint": str(file), "rules": meta.get("rules"), "rules_key": meta.get("rules_key"),
            "findings": None}
    if "findings" in ckpt:
        info["findings"] = FindingsHead.from_checkpoint(ckpt["findings"], file).to(device)
    if (info["findings"] is None) != (model.config.n_prompt == 0):
        raise ValueError(f"{file}: a model with a findings prompt needs its findings head and one without has none; "
                         "the file was edited or damaged, use the run's other checkpoint or retrain")
    return model, tokenizer, info
