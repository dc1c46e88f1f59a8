"""How well does the report tokenizer compress, and would a bigger vocabulary help?

    python -m scripts.tok_eval --dataset data/synthetic                  # -> data/synthetic/tokenizer_v2000/tok_eval.*
    python -m scripts.tok_eval --dataset data/synthetic --out runs/x/tok_eval
    python -m scripts.tok_eval --input reports.jsonl --tokenizer tok/

1. Compression table on held-out reports (the val split; with --input the last 10% of the documents):
   bytes/token of ours next to GPT-2's and GPT-4o's (o200k_base) encodings. Those two come from tiktoken's
   download cache; offline and uncached they are skipped with a one-line note.
2. Vocabulary sweep: tokenizers trained at several sizes on (a subset of) the training reports, scored on
   the same held-out reports. The plot marks where compression stops improving: the first size after which
   the next one gains less than --plateau (relative bytes/token) per 1000 extra tokens.
Writes tok_eval.json and tok_eval.png into --out (default: the tokenizer directory).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt
import numpy as np
import tiktoken

from echovlm.common import atomic_write_json, fail, print0
from echovlm.tokenizer import Tokenizer, read_corpus, tokenizer_dir
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE

SCRIPT = "tok_eval"

REFERENCE_ENCODINGS = {"gpt2": "GPT-2", "o200k_base": "GPT-4o"}


def load_corpus(args) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents)."""
    if args.input:
        docs = read_corpus(args.input)
        if len(docs) < 2:
            raise ValueError(f"{args.input} needs at least 2 documents (some to train on, some held out)")
        cut = len(docs) - max(1, len(docs) // 10)
        return docs[:cut], docs[cut:]
    from echovlm.dataset import open_dataset  # pandas and friends: only needed on this path

    ds = open_dataset(args.dataset)
    held_out = ds.reports("val") or ds.reports("test")
    if not held_out:
        raise ValueError(f"{args.dataset} has no val or test reports to evaluate compression on")
    return ds.reports("train"), held_out


def compression(encode_batch, docs: list[str]) -> dict:
    lengths = np.array([len(ids) for ids in encode_batch(docs)])
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"bytes_per_token": n_bytes / lengths.sum(), "chars_per_token": sum(map(len, docs)) / lengths.sum(),
            "tokens_per_report_mean": float(lengths.mean())}


def reference_encoding(name: str):
    """tiktoken's encoding, or None with a one-line note when it is neither cached nor downloadable."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline: requests' ConnectionError; also blocked proxies, partial caches
        print0(f"{REFERENCE_ENCODINGS[name]} ({name}): skipped, tiktoken could not load it "
               f"({type(e).__name__}; it downloads the ranks once, so this machine is probably offline)")
        return None


def plateau(sweep: list[dict], threshold: float) -> int | None:
    """First reached vocab size after which the next gains < threshold relative bytes/token per 1000 tokens."""
    points = sorted({(s["vocab_size"], s["bytes_per_token"]) for s in sweep})
    for (v0, b0), (v1, b1) in zip(points, points[1:]):
        if (b1 / b0 - 1) * 1000 / (v1 - v0) < threshold:
            return v0
    if any(s["vocab_size"] < s["vocab_size_requested"] for s in sweep):
        return points[-1][0]  # the corpus ran out of merges: nothing more to gain at all
    return None


def plot(path: Path, sweep: list[dict], ours: dict, references: dict, plateau_at: int | None, threshold: float):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [s["vocab_size"] for s in sweep]
    ax.plot(xs, [s["bytes_per_token"] for s in sweep], "o-", label="rustbpe sweep (train subset)")
    ax.plot([ours["vocab_size"]], [ours["bytes_per_token"]], "r*", markersize=14, label="our tokenizer")
    for (name, r), style in zip(references.items(), ("--", ":")):
        ax.axhline(r["bytes_per_token"], color="gray", linestyle=style,
                   label=f"{REFERENCE_ENCODINGS[name]} ({r['vocab_size']:,} tokens)")
    if plateau_at is not None:
        ax.axvline(plateau_at, color="green", alpha=0.5,
                   label=f"gains < {threshold:.0%} per 1000 tokens beyond {plateau_at}")
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("bytes per token on held-out reports (higher = better)")
    ax.set_title("Report tokenizer compression vs vocabulary size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="prepared dataset directory (held out: its val reports)")
    src.add_argument("--input", help=".txt or .jsonl corpus (held out: its last 10%% of documents)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="with --dataset: which of its tokenizers, by size, as tok_train made it (default: %(default)s)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default <dataset>/tokenizer_v<vocab size>, where "
                                            "tok_train writes it; required with --input)")
    parser.add_argument("--out", help="where tok_eval.json/png go (default: the tokenizer directory)")
    parser.add_argument("--sweep", default="500,1000,2000,3000,4000",
                        help="comma-separated vocab sizes to train and compare (default %(default)s)")
    parser.add_argument("--sweep-docs", type=int, default=20000,
                        help="train each sweep tokenizer on this many random training reports (default %(default)s)")
    parser.add_argument("--plateau", type=float, default=0.02,
                        help="relative bytes/token gain per 1000 tokens below which compression has stopped "
                             "improving (default %(default)s)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        sizes = sorted({int(v) for v in args.sweep.split(",")})
    except ValueError:
        fail(SCRIPT, f"--sweep must be comma-separated integers, got {args.sweep!r}")
    if sizes[0] < 259:
        fail(SCRIPT, f"--sweep sizes must be at least 259 (256 bytes + 3 special tokens), got {sizes[0]}")
    if args.sweep_docs < 1:
        fail(SCRIPT, f"--sweep-docs must be at least 1, got {args.sweep_docs}")
    if not args.plateau > 0:  # nan too
        fail(SCRIPT, f"--plateau must be a number > 0, got {args.plateau}")
    if args.tokenizer is None:
        if args.input:
            fail(SCRIPT, "--tokenizer is required with --input (the directory tok_train wrote)")
        args.tokenizer = str(tokenizer_dir(args.dataset, args.vocab_size))
    out = Path(args.out or args.tokenizer)

    try:
        tok = Tokenizer.load(args.tokenizer)
    except (OSError, ValueError) as e:
        fail(SCRIPT, str(e))
    try:
        train_docs, held_out = load_corpus(args)
    except (OSError, ValueError) as e:
        fail(SCRIPT, str(e))
    print0(f"held-out: {len(held_out):,} reports; sweep trains on {min(len(train_docs), args.sweep_docs):,} "
           f"of {len(train_docs):,} training reports")

    ours = {"vocab_size": tok.vocab_size, **compression(tok.encode_batch, held_out)}
    references = {}
    for name in REFERENCE_ENCODINGS:
        enc = reference_encoding(name)
        if enc is not None:
            references[name] = {"vocab_size": enc.n_vocab, **compression(enc.encode_ordinary_batch, held_out)}
    print0(f"{'tokenizer':<22} {'vocab':>8} {'bytes/token':>12} {'chars/token':>12} {'tokens/report':>14}")
    for label, r in [("ours (rustbpe)", ours)] + [(f"{REFERENCE_ENCODINGS[n]} ({n})", r) for n, r in references.items()]:
        print0(f"{label:<22} {r['vocab_size']:>8,} {r['bytes_per_token']:>12.2f} {r['chars_per_token']:>12.2f} "
               f"{r['tokens_per_report_mean']:>14.1f}")

    rng = np.random.default_rng(0)
    pick = rng.choice(len(train_docs), size=min(len(train_docs), args.sweep_docs), replace=False)
    subset = [train_docs[i] for i in sorted(pick)]
    sweep = []
    for size in sizes:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # stopping early is reported in the table instead
            sweep_tok = Tokenizer.train(subset, size)
        seconds = time.perf_counter() - t0
        sweep.append({"vocab_size_requested": size, "vocab_size": sweep_tok.vocab_size, "train_seconds": seconds,
                      **compression(sweep_tok.encode_batch, held_out)})
        s = sweep[-1]
        reached = "" if s["vocab_size"] == size else f" (reached {s['vocab_size']}: nothing left to merge)"
        print0(f"sweep vocab {size:>6}{reached}: {s['bytes_per_token']:.3f} bytes/token, trained in {seconds:.2f} s")
    plateau_at = plateau(sweep, args.plateau)
    print0(f"compression stops improving at vocab size {plateau_at}" if plateau_at is not None else
           "compression is still improving at the largest sweep size; try larger --sweep sizes")

    out.mkdir(parents=True, exist_ok=True)
    plot(out / "tok_eval.png", sweep, ours, references, plateau_at, args.plateau)
    atomic_write_json(out / "tok_eval.json", {
        "source": args.dataset or args.input, "tokenizer": str(args.tokenizer), "held_out_reports": len(held_out),
        "ours": ours, "references": references,
        "references_skipped": [n for n in REFERENCE_ENCODINGS if n not in references],
        "sweep": sweep, "sweep_docs": len(subset), "plateau_threshold": args.plateau, "plateau_vocab_size": plateau_at,
    })
    print0(f"wrote {out / 'tok_eval.json'} and {out / 'tok_eval.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
