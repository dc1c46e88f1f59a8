"""Train the report tokenizer (rustbpe) and, for a prepared dataset, encode every split for training.

    python -m scripts.tok_train --dataset data/synthetic               # -> data/synthetic/tokenizer/
    python -m scripts.tok_train --input reports.jsonl --out tok/       # any corpus, no dataset needed

With --dataset the tokenizer is trained on the train reports only (val/test stay unseen) and the output
directory also gets {split}_tokens.npy (uint16, the split's reports concatenated, no special tokens) and
{split}_offsets.npy (int64, N+1: report i is tokens[offsets[i]:offsets[i+1]]) for train, val and test.
--input takes a .txt file (one document per line) or .jsonl (one object per line with "report" or "text").

tok_stats.json (written last) holds the printed numbers and a checksum of the inputs and settings: a re-run
with the same ones does nothing, and a directory holding a different tokenizer is only replaced with --force.
"""

import argparse
import hashlib
import io
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from echovlm.common import atomic_write_bytes, atomic_write_json, print0
from echovlm.tokenizer import CONFIG_FILE, FORMAT_VERSION, RANKS_FILE, Tokenizer, read_corpus

SPLITS = ("train", "val", "test")
STATS_FILE = "tok_stats.json"
ENCODE_CHUNK = 10_000  # reports per encode_batch call: bounds the memory held as Python int lists


def load_texts(args) -> dict[str, list[str]]:
    """split -> documents; only "train" when the corpus is a plain --input file."""
    if args.input:
        try:
            return {"train": read_corpus(args.input)}
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    from echovlm.dataset import open_dataset  # pandas and friends: only needed on this path

    try:
        ds = open_dataset(args.dataset)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return {split: ds.reports(split) for split in SPLITS}


def input_checksum(texts: dict[str, list[str]], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split, docs in texts.items():
        h.update(f"\0split {split} {len(docs)}\0".encode())
        for doc in docs:
            h.update(doc.encode("utf-8", errors="surrogatepass"))
            h.update(b"\0")
    return h.hexdigest()


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="prepared dataset directory (trains on its train reports)")
    src.add_argument("--input", help=".txt (one document per line) or .jsonl (report/text field) corpus")
    parser.add_argument("--vocab-size", type=int, default=2000,
                        help="tokens in the vocabulary, the 3 special tokens included (default 2000)")
    parser.add_argument("--out", help="tokenizer directory (default <dataset>/tokenizer; required with --input)")
    parser.add_argument("--force", action="store_true", help="replace a different tokenizer already in --out")
    args = parser.parse_args(argv)

    if not 259 <= args.vocab_size <= 65536:
        parser.error("--vocab-size must be between 259 (256 bytes + 3 special tokens) and 65536 "
                     "(token ids are stored as uint16)")
    if args.out is None:
        if args.input:
            parser.error("--out is required with --input")
        args.out = os.path.join(args.dataset, "tokenizer")
    out = Path(args.out)

    texts = load_texts(args)
    if not texts["train"]:
        raise SystemExit("error: there are no training reports to learn a tokenizer from")
    settings = {"vocab_size": args.vocab_size, "tokenizer_format": FORMAT_VERSION}
    checksum = input_checksum(texts, settings)

    stats_path = out / STATS_FILE
    ours = [out / CONFIG_FILE, out / RANKS_FILE, stats_path]
    ours += [out / f"{s}_{k}.npy" for s in SPLITS for k in ("tokens", "offsets")]
    existing = [p for p in ours if p.exists()]
    if existing:
        try:
            previous = json.loads(stats_path.read_text()).get("input_sha256")
        except (OSError, ValueError, AttributeError):
            previous = None
        outputs = [out / CONFIG_FILE, out / RANKS_FILE]
        if args.dataset:
            outputs += [out / f"{s}_{k}.npy" for s in SPLITS for k in ("tokens", "offsets")]
        if previous == checksum and all(p.exists() for p in outputs) and not args.force:
            print0(f"{out} is up to date (same reports and settings as before); nothing to do")
            return 0
        if not args.force:
            raise SystemExit(f"error: {out} already holds a tokenizer made from other reports or settings "
                             f"({', '.join(p.name for p in existing)}); pass --force to replace it, "
                             f"or choose another --out")
        # drop the old outputs first: the stats file is the completion marker, so an interrupted re-run is
        # never taken as up to date, and no token array of the old tokenizer is left behind
        for p in existing:
            p.unlink()

    n_chars = sum(len(t) for t in texts["train"])
    n_bytes = sum(len(t.encode("utf-8")) for t in texts["train"])
    print0(f"training on {len(texts['train']):,} reports ({n_bytes / 1e6:.2f} MB), vocab size {args.vocab_size}")
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts["train"], args.vocab_size)
    train_seconds = time.perf_counter() - t0
    tok.save(out, overwrite=True)

    per_split = {}
    for split, docs in texts.items():
        tokens, offsets = encode_split(tok, docs)
        per_split[split] = length_stats(offsets)
        if args.dataset:
            save_npy(out / f"{split}_tokens.npy", tokens)
            save_npy(out / f"{split}_offsets.npy", offsets)
    train = per_split["train"]
    stats = {
        "input_sha256": checksum, "settings": settings, "source": args.dataset or args.input,
        "train_seconds": train_seconds, "vocab_size": tok.vocab_size, "vocab_size_requested": args.vocab_size,
        "train_reports": train["reports"], "train_bytes": n_bytes,
        "chars_per_token": n_chars / train["tokens"], "bytes_per_token": n_bytes / train["tokens"],
        **{f"tokens_per_report_{k}": train[k] for k in ("min", "mean", "max", "std")},
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
    atomic_write_json(stats_path, stats)
    print0(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
