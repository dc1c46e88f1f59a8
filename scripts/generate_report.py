"""Write an echo report for one study: your own videos, a precomputed embedding, or a test-split study.

    python -m scripts.generate_report path/to/study_dir --run runs/speedrun/model --echoprime-dir ../EchoPrime
    python -m scripts.generate_report clip1.dcm clip2.mp4 --run RUN --conditioning direct
    python -m scripts.generate_report --embedding study.npy --run RUN
    python -m scripts.generate_report --study 0 --run RUN           # no weights needed: uses the run's dataset

Videos go through the EchoPrime video encoder (weights from the EchoPrime release, which each user downloads)
and view classifier. The model was trained on one or several 512-d study embeddings per study, so the videos
must become such a prefix. Two ways (--conditioning):
  snap   (default) the training study whose embedding is nearest (cosine) to the normalised mean of the
         video embeddings; what the reference system does, and the safe choice because our model only ever
         saw embeddings from the training distribution.
  direct the normalised mean of the per-video embeddings itself, as one prefix vector.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from echovlm.checkpoint import load_model
from echovlm.clinical import TRAITS, extract_labels
from echovlm.common import atomic_write_json, atomic_write_text, autodetect_device, new_run_dir, print0
from echovlm.dataset import open_dataset
from echovlm.engine import Engine


def l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_train_study(ds, query: np.ndarray, device) -> tuple[int, float]:
    """Cosine nearest neighbour over the training studies (mean of each study's embeddings), in chunks."""
    emb, offsets = ds.embedding_block("train")
    q = torch.from_numpy(l2norm(query.astype(np.float32))).to(device)
    best_sim, best_idx, chunk = -2.0, -1, 65536
    counts = np.diff(offsets)
    for start in range(0, len(counts), chunk):
        stop = min(start + chunk, len(counts))
        rows = torch.from_numpy(np.asarray(emb[offsets[start]:offsets[stop]], dtype=np.float32)).to(device)
        owner = torch.repeat_interleave(torch.arange(stop - start, device=device), torch.from_numpy(counts[start:stop]).to(device))
        means = torch.zeros(stop - start, rows.shape[1], device=device).index_add_(0, owner, rows)
        means = torch.nn.functional.normalize(means, dim=1)
        sims = means @ q
        s, i = sims.max(0)
        if s.item() > best_sim:
            best_sim, best_idx = s.item(), start + i.item()
    return best_idx, best_sim


def study_from_videos(args, device):
    from echovlm import video  # heavy (torchvision models); only needed on this path

    paths = video.find_videos([Path(p) for p in args.inputs])
    if not paths:
        raise SystemExit(f"generate_report: no files found under {', '.join(args.inputs)}")
    clips, kept, skipped = video.load_study(paths, progress=True)
    for path, reason in skipped:
        print0(f"skipped {path}: {reason}")
    weights = Path(args.echoprime_dir) / "model_data" / "weights"
    encoder = video.build_encoder(weights / "echo_prime_encoder.pt").to(device)
    views_model = video.build_view_classifier(weights / "view_classifier.pt").to(device)
    emb = video.encode_clips(encoder, clips, batch_size=args.video_batch, device=device).cpu().numpy()
    views = video.classify_views(views_model, clips, batch_size=args.video_batch, device=device)
    per_video = [{"file": str(p), "view": v, "embedding_norm": float(np.linalg.norm(e))}
                 for p, v, e in zip(kept, views, emb)]
    return l2norm(emb), per_video, [{"file": str(p), "reason": r} for p, r in skipped]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="study folder(s) or DICOM/AVI/MP4 files")
    p.add_argument("--run", required=True, help="training run directory (or a checkpoint .pt file)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to load")
    p.add_argument("--embedding", help="a precomputed study embedding .npy, shape (D,) or (k, D)")
    p.add_argument("--study", type=int, help="index of a study in the test split of the run's dataset")
    p.add_argument("--echoprime-dir", default="../EchoPrime", help="EchoPrime checkout with model_data/weights")
    p.add_argument("--conditioning", default="snap", choices=["snap", "direct"], help="how videos become the prefix")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="default: the model's sequence length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write report.json and report.md into this new directory (never overwritten)")
    args = p.parse_args(argv)
    given = sum([bool(args.inputs), args.embedding is not None, args.study is not None])
    if given != 1:
        p.error("give exactly one of: video paths, --embedding FILE, --study N")

    device = torch.device(autodetect_device(args.device))
    model, tokenizer, info = load_model(args.run, device, which=args.which)
    embed_dim = model.config.embed_dim
    t0 = time.time()
    provenance = {"run": str(args.run), "checkpoint": args.which, "step": info.get("step"),
                  "dataset": info.get("dataset"), "val_bpb": info.get("val_bpb")}
    per_video, skipped, reference, snapped = [], [], None, None

    if args.study is not None:
        ds = open_dataset(info["dataset"])
        ids = ds.studies("test")
        if not 0 <= args.study < len(ids):
            raise SystemExit(f"generate_report: --study {args.study} is out of range: the test split has {len(ids)} studies")
        prefix = ds.embeddings("test")[args.study]
        reference = ds.reports("test")[args.study]
        provenance["study"] = ids[args.study]
    elif args.embedding is not None:
        try:
            prefix = np.load(args.embedding, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SystemExit(f"generate_report: cannot read {args.embedding} as a .npy array ({e})")
        prefix = prefix[None] if prefix.ndim == 1 else prefix
        provenance["embedding_file"] = str(args.embedding)
    else:
        if embed_dim != 512:
            raise SystemExit(f"generate_report: this model reads {embed_dim}-d embeddings, but the EchoPrime video "
                             "encoder makes 512-d ones; train on EchoPrime data to report on videos")
        video_emb, per_video, skipped = study_from_videos(args, device)
        query = l2norm(video_emb.mean(0))
        if args.conditioning == "direct":
            prefix = query[None]
        else:
            ds = open_dataset(info["dataset"])
            idx, sim = nearest_train_study(ds, query, device)
            prefix = ds.embeddings("train")[idx]
            snapped = {"train_study": ds.studies("train")[idx], "cosine": round(sim, 4)}
            print0(f"conditioning: snapped to training study {snapped['train_study']} (cosine {sim:.3f})")
        provenance["conditioning"] = args.conditioning

    prefix = np.asarray(prefix, dtype=np.float32)
    if prefix.ndim != 2 or prefix.shape[1] != embed_dim or not np.isfinite(prefix).all():
        raise SystemExit(f"generate_report: the study embedding must be a finite (k, {embed_dim}) array, "
                         f"got shape {prefix.shape}{'' if np.isfinite(prefix).all() else ' with NaN/inf'}")

    engine = Engine(model, tokenizer)
    tokens = engine.generate([prefix], max_tokens=args.max_tokens, temperature=args.temperature,
                             top_k=args.top_k, num_samples=1, seed=args.seed)[0][0]
    report = tokenizer.decode(tokens)
    findings = extract_labels(report)
    elapsed = time.time() - t0

    print0(report)
    print0("\nfindings (echovlm.clinical labels):")
    for name in TRAITS:
        print0(f"  {name:34s} {findings[name]}")
    for v in per_video:
        print0(f"  view {v['view']:28s} {v['file']}")
    if args.out:
        out = Path(args.out)
        out = new_run_dir(out.parent, out.name)
        result = {"report": report, "findings": findings, "videos": per_video, "skipped": skipped,
                  "snapped_to": snapped, "reference_report": reference, "provenance": provenance,
                  "seconds": round(elapsed, 2)}
        atomic_write_json(out / "report.json", result)
        md = ["# echovlm report", "", "```", report, "```", "", "| finding | value |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in findings.items()]
        if per_video:
            md += ["", "| video | view | embedding norm |", "|---|---|---|"]
            md += [f"| {v['file']} | {v['view']} | {v['embedding_norm']:.3f} |" for v in per_video]
        if reference is not None:
            md += ["", "Reference report of this study:", "", "```", reference, "```"]
        md += ["", f"Model: {provenance['run']} ({args.which}, step {provenance['step']}); generated in {elapsed:.1f}s."]
        atomic_write_text(out / "report.md", "\n".join(md) + "\n")
        print0(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
