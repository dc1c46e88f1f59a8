"""Train the report tokenizer (rustbpe) and, for a prepared dataset, encode every split for training.

    python -m scripts.tok_train --dataset data/synthetic               # -> data/synthetic/tokenizer_v2000/
    python -m scripts.tok_train --input reports.jsonl --out tok/       # any corpus, no dataset needed

With --dataset the tokenizer is trained on the train reports only (val/test stay unseen) and the output
directory also gets {split}_tokens.npy (uint16, the split's reports concatenated, no special tokens) and
{split}_offsets.npy (int64, N+1: report i is tokens[offsets[i]:offsets[i+1]]) for train, val and test.
The default directory is keyed by the vocabulary size (echovlm.tokenizer.tokenizer_dir), so another size
never replaces a tokenizer that models point at.
--input takes a .txt file (one document per line) or .jsonl (one object per line with "report" or "text").

Everything is written into a temporary directory beside the output and moved into place when complete, so an
interrupted run leaves no half tokenizer and the same command simply runs again. tok_stats.json holds the
printed numbers and a checksum of the inputs and settings: a re-run with the same ones does nothing, and a
directory holding a different tokenizer is only replaced with --force (its other files, e.g. tok_eval's, stay).
"""

import argparse
import io
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from echovlm.common import (atomic_write_bytes, atomic_write_json, fail, make_temp_dir, note_leftovers, print0,
                            replace_dir)
from echovlm.dataset import SPLITS, open_dataset
from echovlm.tokenizer import (CONFIG_FILE, FORMAT_VERSION, RANKS_FILE, STATS_FILE, Tokenizer, input_checksum,
                               read_corpus, tokenizer_dir)
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE

ENCODE_CHUNK = 10_000  # reports per encode_batch call: bounds the memory held as Python int lists
OUTPUTS = (CONFIG_FILE, RANKS_FILE, STATS_FILE, *(f"{s}_{k}.npy" for s in SPLITS for k in ("tokens", "offsets")))


def load_texts(args) -> dict[str, list[str]]:
    """split -> documents; only "train" when the corpus is a plain --input file."""
    if args.input:
        try:
            return {"train": read_corpus(args.input)}
        except (FileNotFoundError, ValueError) as e:
            fail("tok_train", str(e))
    try:
        ds = open_dataset(args.dataset)
        return {split: ds.reports(split) for split in SPLITS}
    except (FileNotFoundError, ValueError) as e:
        fail("tok_train", str(e))


def encode_split(tok: Tokenizer, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16, offsets int64 N+1) of one split, encoded in chunks across threads."""
    parts, lengths = [], []
    for start in range(0, len(docs), ENCODE_CHUNK):
        ids = tok.encode_batch(docs[start:start + ENCODE_CHUNK])
        lengths.extend(len(x) for x in ids)
        parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=sum(map(len, ids))))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    return tokens, offsets


def save_npy(path: Path, array: np.ndarray):
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def length_stats(offsets: np.ndarray) -> dict:
    n = np.diff(offsets)
    if len(n) == 0:
        return {"reports": 0, "tokens": 0}
    return {"reports": int(len(n)), "tokens": int(n.sum()), "min": int(n.min()), "mean": float(n.mean()),
            "max": int(n.max()), "std": float(n.std())}


def up_to_date(out: Path, checksum: str, outputs: list[str], force: bool) -> bool:
    """True if `out` already holds these outputs for this checksum; refuse a different finished tokenizer there
    unless force. Our files without tok_stats.json (the last thing written) are no finished tokenizer."""
    if not (out / STATS_FILE).exists():
        return False
    try:
        previous = json.loads((out / STATS_FILE).read_text()).get("input_sha256")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous == checksum and all((out / f).exists() for f in outputs) and not force:
        return True
    if not force:
        fail("tok_train", f"{out} already holds a tokenizer made from other reports or settings; pass --force to "
                          f"replace it (models trained on it then stop matching it), or choose another --out")
    return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="prepared dataset directory (trains on its train reports)")
    src.add_argument("--input", help=".txt (one document per line) or .jsonl (report/text field) corpus")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="tokens in the vocabulary, the 3 special tokens included (default %(default)s)")
    parser.add_argument("--out", help="tokenizer directory (default <dataset>/tokenizer_v<vocab size>; required "
                                      "with --input)")
    parser.add_argument("--force", action="store_true", help="replace a different tokenizer already in --out")
    args = parser.parse_args(argv)

    if not 259 <= args.vocab_size <= 65536:
        fail("tok_train", f"--vocab-size {args.vocab_size}: must be between 259 (256 bytes + 3 special tokens) and "
                          f"65536 (token ids are stored as uint16)")
    if args.out is None:
        if args.input:
            fail("tok_train", "--out is required with --input")
        args.out = str(tokenizer_dir(args.dataset, args.vocab_size))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        fail("tok_train", f"--out {out} is a file, not a directory; choose another --out")

    texts = load_texts(args)
    if not texts["train"]:
        fail("tok_train", "there are no training reports to learn a tokenizer from")
    settings = {"vocab_size": args.vocab_size, "tokenizer_format": FORMAT_VERSION}
    checksum = input_checksum(texts, settings)
    outputs = list(OUTPUTS if args.dataset else OUTPUTS[:3])
    if up_to_date(out, checksum, outputs, args.force):
        print0(f"{out} is up to date (same reports and settings as before); nothing to do")
        return 0
    note_leftovers(out, "tok_train")

    tmp = make_temp_dir(out, "partial")
    try:
        train(args, texts, checksum, settings, tmp)
        replace_dir(tmp, out, OUTPUTS)
    except OSError as e:  # the input was fine; writing failed (disk full, permissions)
        shutil.rmtree(tmp, ignore_errors=True)
        fail("tok_train", f"writing {out} failed ({e}); what was there before is unchanged", 1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print0(f"wrote {out}")
    return 0


def train(args, texts: dict[str, list[str]], checksum: str, settings: dict, tmp: Path):
    """Train, encode and write every output into the temporary directory tmp; tok_stats.json last."""
    n_chars = sum(len(t) for t in texts["train"])
    n_bytes = sum(len(t.encode("utf-8")) for t in texts["train"])
    print0(f"training on {len(texts['train']):,} reports ({n_bytes / 1e6:.2f} MB), vocab size {args.vocab_size}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts["train"], args.vocab_size)
    train_seconds = time.perf_counter() - t0
    tok.save(tmp)

    per_split = {}
    for split, docs in texts.items():
        tokens, offsets = encode_split(tok, docs)
        per_split[split] = length_stats(offsets)
        if args.dataset:
            save_npy(tmp / f"{split}_tokens.npy", tokens)
            save_npy(tmp / f"{split}_offsets.npy", offsets)
    on_train = per_split["train"]
    stats = {
        "input_sha256": checksum, "settings": settings, "source": args.dataset or args.input,
        "train_seconds": train_seconds, "vocab_size": tok.vocab_size, "vocab_size_requested": args.vocab_size,
        "train_reports": on_train["reports"], "train_bytes": n_bytes,
        "chars_per_token": n_chars / on_train["tokens"], "bytes_per_token": n_bytes / on_train["tokens"],
        **{f"tokens_per_report_{k}": on_train[k] for k in ("min", "mean", "max", "std")},
        "splits": per_split,
    }

    short = "" if tok.vocab_size == args.vocab_size else f" (of {args.vocab_size}: nothing left to merge)"
    print0(f"trained in {train_seconds:.2f} s; vocab size {tok.vocab_size}{short}")
    print0(f"compression on train: {stats['chars_per_token']:.2f} chars/token, "
           f"{stats['bytes_per_token']:.2f} bytes/token")
    for split, s in per_split.items():
        if s["reports"]:
            print0(f"{split:>5}: {s['reports']:,} reports, {s['tokens']:,} tokens; tokens/report min {s['min']} "
                   f"mean {s['mean']:.1f} max {s['max']} std {s['std']:.1f}")
    atomic_write_json(tmp / STATS_FILE, stats)


if __name__ == "__main__":
    sys.exit(main())
