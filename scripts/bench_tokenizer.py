"""Training speed and compression of our rustbpe against HuggingFace tokenizers (and nanochat's rustbpe).

    python -m scripts.bench_tokenizer                                   # ~4 MB of torch's Python source, vocab 2000
    python -m scripts.bench_tokenizer --input reports.jsonl --vocab-size 4000
    python -m scripts.bench_tokenizer --nanochat-python /tmp/nanorbpe/bin/python

All trainers get the same documents, the same split pattern (ours, GPT-4 style) and the same vocabulary size
(256 byte tokens + merges, no special tokens), and use every CPU core. Each is timed --repeats times and the
best wall-clock and CPU times are kept (the least disturbed by other work on the machine). Compression is
bytes/token of the trained tokenizer re-encoding its own training corpus; "tokens vs ours" > 1 means more
tokens for the same text than ours.

nanochat's rustbpe (PyPI `rustbpe`) has the same module name as ours, so it runs in its own interpreter:
    uv venv /tmp/nanorbpe && uv pip install --python /tmp/nanorbpe/bin/python rustbpe tiktoken
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from echovlm.common import fail, print0
from echovlm.tokenizer import read_corpus
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE

SCRIPT = "bench_tokenizer"

# run by --nanochat-python: argv = corpus.json vocab_size pattern repeats; prints one JSON line
NANOCHAT_SCRIPT = r"""
import json, sys, time
import rustbpe
docs = json.load(open(sys.argv[1]))
vocab_size, pattern, repeats = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
times, cpu = [], []
for _ in range(repeats):
    tok = rustbpe.Tokenizer()
    t0, c0 = time.perf_counter(), time.process_time()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
try:
    import tiktoken
    ranks = {bytes(b): r for b, r in tok.get_mergeable_ranks()}
    enc = tiktoken.Encoding("nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    n_tokens = sum(map(len, enc.encode_ordinary_batch(docs)))
except ImportError:
    n_tokens = None
print(json.dumps({"seconds": min(times), "cpu_seconds": min(cpu), "n_tokens": n_tokens, "vocab_size": len(tok.get_mergeable_ranks())}))
"""


def torch_source(megabytes: float) -> list[str]:
    """The installed torch package's .py files (sorted by path, one document each) up to `megabytes`."""
    spec = importlib.util.find_spec("torch")  # locate it without paying for `import torch`
    if spec is None or spec.origin is None:
        fail(SCRIPT, "torch is not installed; pass --input FILE to benchmark on your own corpus")
    docs, size = [], 0
    for path in sorted(Path(spec.origin).parent.rglob("*.py")):
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(docs[-1].encode("utf-8"))
        if size >= megabytes * 1e6:
            break
    return docs


def best_time(fn, repeats: int):
    """(best wall seconds, best CPU seconds of all threads, last result). CPU time is the steadier of the
    two on a shared machine: waiting for a core does not count."""
    times, cpu, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), min(cpu), result


def bench_ours(docs, vocab_size, pattern, repeats) -> dict:
    def train():
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
        return tok

    seconds, cpu, tok = best_time(train, repeats)
    ranks = {bytes(b): r for b, r in tok.get_mergeable_ranks()}
    enc = tiktoken.Encoding("ours", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    return {"seconds": seconds, "cpu_seconds": cpu, "n_tokens": sum(map(len, enc.encode_ordinary_batch(docs))),
            "vocab_size": len(ranks)}


def bench_hf(docs, vocab_size, pattern, repeats) -> dict:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    def train():
        # the same regex split, then bytes mapped to printable characters: byte-level BPE like ours
        tok = Tokenizer(models.BPE(byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(docs, trainer)
        return tok

    seconds, cpu, tok = best_time(train, repeats)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
    return {"seconds": seconds, "cpu_seconds": cpu, "n_tokens": n_tokens, "vocab_size": tok.get_vocab_size()}


def bench_nanochat(python, docs, vocab_size, pattern, repeats) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.json"
        corpus.write_text(json.dumps(docs))
        # run from the temp dir: `python -c` puts the working directory first on sys.path, and this repository's
        # rustbpe/ source folder would shadow the installed nanochat package
        proc = subprocess.run([python, "-c", NANOCHAT_SCRIPT, str(corpus), str(vocab_size), pattern, str(repeats)],
                              capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(SCRIPT, f"nanochat's rustbpe failed in {python}: {last} (install it there with: "
                     f"uv pip install --python {python} rustbpe tiktoken)", 1)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help=".txt or .jsonl corpus (default: the installed torch's Python source)")
    parser.add_argument("--megabytes", type=float, default=4.0,
                        help="size of the torch source corpus (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="vocabulary size to train, 256 bytes + merges (default: %(default)s, the pipeline's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per trainer, best kept (default: %(default)s)")
    parser.add_argument("--nanochat-python", help="interpreter with nanochat's rustbpe installed, to time it too")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.vocab_size < 256:
        fail(SCRIPT, f"--vocab-size must be at least 256 (the byte tokens), got {args.vocab_size}")
    if args.repeats < 1:
        fail(SCRIPT, f"--repeats must be at least 1, got {args.repeats}")
    if not args.megabytes > 0:  # nan too
        fail(SCRIPT, f"--megabytes must be a number > 0, got {args.megabytes}")

    try:
        docs = read_corpus(args.input) if args.input else torch_source(args.megabytes)
    except (OSError, ValueError) as e:  # a directory, unreadable, not UTF-8, bad JSON lines
        fail(SCRIPT, f"--input {args.input}: {e}" if args.input else str(e))
    if not docs:
        fail(SCRIPT, f"--input {args.input} holds no documents")
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    pattern = rustbpe.Tokenizer().get_pattern()
    print0(f"corpus: {len(docs):,} documents, {n_bytes / 1e6:.2f} MB; vocab size {args.vocab_size}; "
           f"best of {args.repeats} runs")

    results = {"ours (rustbpe)": bench_ours(docs, args.vocab_size, pattern, args.repeats),
               "HF tokenizers": bench_hf(docs, args.vocab_size, pattern, args.repeats)}
    if args.nanochat_python:
        results["nanochat rustbpe"] = bench_nanochat(args.nanochat_python, docs, args.vocab_size, pattern,
                                                     args.repeats)
    ours = results["ours (rustbpe)"]
    print0(f"{'trainer':<18} {'vocab':>6} {'wall s':>8} {'cpu s':>8} {'wall vs ours':>13} {'bytes/token':>12} "
           f"{'tokens vs ours':>15}")
    for name, r in results.items():
        bpt, rel = (n_bytes / r["n_tokens"], r["n_tokens"] / ours["n_tokens"]) if r["n_tokens"] else (np.nan, np.nan)
        print0(f"{name:<18} {r['vocab_size']:>6} {r['seconds']:>8.3f} {r['cpu_seconds']:>8.3f} "
               f"{r['seconds'] / ours['seconds']:>12.2f}x {bpt:>12.3f} {rel:>15.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
