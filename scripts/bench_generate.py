"""Generation speed: batched KV-cached decoding vs one study at a time, in the same run on the same studies.

    python -m scripts.bench_generate --run runs/speedrun/model          # a trained model, its test studies
    python -m scripts.bench_generate --depth 4 --max-tokens 128         # an untrained model of that depth

Both modes decode greedily, so they write the very same tokens (checked here) and the ratio of their speeds is
the whole story. One-at-a-time is timed on the first --single-studies studies only (it is the slow one) and
compared per report. An untrained model rarely says <|eos|>, so its reports run to --max-tokens: a worst case.

Without --run, the untrained model's query heads share one key/value head (the GPT's default); batched
decoding is also timed for the same model with one key/value head per query head (kv_heads 0, the attention
of models made before it), in the same run: what sharing saves when the cached keys and values are read.
"""

import argparse
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

from echovlm.common import autodetect_device, fail, print0
from echovlm.engine import Engine
from echovlm.gpt import GPT, GPTConfig
from echovlm.vocabulary import DEFAULT_VOCAB_SIZE

SCRIPT = "bench_generate"


def timed_generate(engine, embeddings, device, **kwargs):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(embeddings, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="training run directory (or checkpoint .pt); its test studies are the inputs")
    p.add_argument("--which", default="best", choices=["best", "last"],
                   help="checkpoint to load with --run (default: %(default)s)")
    p.add_argument("--depth", type=int, default=4, help="without --run: depth of the untrained model (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="without --run: vocabulary, the 3 special tokens included (default: %(default)s)")
    p.add_argument("--sequence-len", type=int, default=256,
                   help="without --run: the model's sequence length (default: %(default)s)")
    p.add_argument("--embed-dim", type=int, default=512, help="without --run: study embedding size (default: %(default)s)")
    p.add_argument("--k", type=int, default=1, help="without --run: embeddings per study (default: %(default)s)")
    p.add_argument("--studies", type=int, default=64, help="studies generated in batched mode (default: %(default)s)")
    p.add_argument("--single-studies", type=int, default=8,
                   help="of those, how many are also run one at a time (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded together in batched mode (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="report tokens per study (default: fill sequence_len)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained model and its inputs (default: %(default)s)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("depth", "sequence_len", "embed_dim", "k", "studies", "batch_size"):
        if getattr(args, flag) < 1:
            fail(SCRIPT, f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not 1 <= args.single_studies <= args.studies:
        fail(SCRIPT, f"--single-studies must be between 1 and --studies ({args.studies}), got {args.single_studies}")
    if args.vocab_size < 4:
        fail(SCRIPT, f"--vocab-size must be at least 4 (3 special tokens and a word), got {args.vocab_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        fail(SCRIPT, f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.threads is not None and args.threads < 1:
        fail(SCRIPT, f"--threads must be at least 1, got {args.threads}")

    try:
        device = torch.device(autodetect_device(args.device))
    except (RuntimeError, ValueError) as e:
        fail(SCRIPT, str(e) if str(e).startswith("--device") else f"--device {args.device}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.run:
        from echovlm.checkpoint import load_model
        from echovlm.dataset import open_dataset

        try:
            model, tokenizer, info = load_model(args.run, device, which=args.which)
            embeddings = open_dataset(info["dataset"]).embeddings("test")[:args.studies]
        except (FileNotFoundError, ValueError, KeyError) as e:
            fail(SCRIPT, f"--run {args.run}: {e}")
        if len(embeddings) < args.studies:
            fail(SCRIPT, f"the test split has only {len(embeddings)} studies; lower --studies")
        source = f"{args.run} ({args.which})"
    else:
        config = GPTConfig(depth=args.depth, vocab_size=args.vocab_size, embed_dim=args.embed_dim,
                           sequence_len=args.sequence_len)
        model = GPT(config).to(device)
        # an untrained model needs no trained tokenizer, only the special ids, which sit at the top of the vocab
        v = args.vocab_size
        tokenizer = SimpleNamespace(pad_id=v - 3, bos_id=v - 2, eos_id=v - 1)
        rng = np.random.default_rng(args.seed)
        embeddings = [rng.standard_normal((args.k, args.embed_dim)).astype(np.float32) for _ in range(args.studies)]
        source = f"untrained depth-{args.depth} model"
    model.eval()
    engine = Engine(model, tokenizer)
    gen = dict(max_tokens=args.max_tokens, temperature=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"{source}: {n_params / 1e6:.2f}M parameters on {device}, {torch.get_num_threads()} CPU threads")

    engine.generate(embeddings[:2], batch_size=2, **gen)  # warm-up: allocator, kernels, lazy init
    batched, t_batched = timed_generate(engine, embeddings, device, batch_size=args.batch_size, **gen)
    single, t_single = [], 0.0
    for e in embeddings[:args.single_studies]:
        out, dt = timed_generate(engine, [e], device, batch_size=1, **gen)
        single += out
        t_single += dt
    if single != batched[:args.single_studies]:
        fail(SCRIPT, "batched and one-at-a-time greedy outputs differ; the engine is broken", 1)

    n_b, n_s = len(batched), len(single)
    tok_b = sum(len(r[0]) for r in batched)
    tok_s = sum(len(r[0]) for r in single)
    rps_b, rps_s = n_b / t_batched, n_s / t_single
    print0(f"batched (batch {args.batch_size}):  {n_b} reports, {tok_b} tokens in {t_batched:.2f}s: "
           f"{rps_b:.2f} reports/s, {tok_b / t_batched:.0f} tokens/s")
    print0(f"one at a time:        {n_s} reports, {tok_s} tokens in {t_single:.2f}s: "
           f"{rps_s:.2f} reports/s, {tok_s / t_single:.0f} tokens/s")
    print0(f"speed-up: {rps_b / rps_s:.1f}x reports/s, {(tok_b / t_batched) / (tok_s / t_single):.1f}x tokens/s")
    if not args.run and model.config.n_kv_head < model.config.n_head:
        torch.manual_seed(args.seed)
        mha = Engine(GPT(replace(model.config, kv_heads=0)).to(device).eval(), tokenizer)
        mha.generate(embeddings[:2], batch_size=2, **gen)
        out, t_mha = timed_generate(mha, embeddings, device, batch_size=args.batch_size, **gen)
        tok_m = sum(len(r[0]) for r in out)
        print0(f"one key/value head per query head (batch {args.batch_size}): {tok_m} tokens in {t_mha:.2f}s: "
               f"{tok_m / t_mha:.0f} tokens/s; {model.config.n_kv_head} shared by {model.config.n_head} query heads: "
               f"{(tok_b / t_batched) / (tok_m / t_mha):.2f}x tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
