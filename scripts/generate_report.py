"""Write an echo report for one study: your own videos, a precomputed embedding, or a test-split study.

    python -m scripts.generate_report path/to/study_dir --run runs/speedrun/model --echoprime-dir ../EchoPrime
    python -m scripts.generate_report clip1.dcm clip2.mp4 --run RUN --conditioning direct
    python -m scripts.generate_report --embedding study.npy --run RUN
    python -m scripts.generate_report --study 0 --run RUN --out report   # no weights needed: uses the run's dataset

Videos (DICOM, AVI, MP4; folders are searched recursively, files that are not videos are skipped with the
reason) go through the EchoPrime video encoder and view classifier, whose weights each user downloads from
the EchoPrime release (`python -m scripts.fetch_echoprime`). The model was trained on one or several 512-d
study embeddings per study, so the videos must become such a prefix. Two ways (--conditioning):
  snap   (default) the embeddings of the training study whose mean embedding is nearest (cosine) to the
         normalised mean of the normalised video embeddings; what the reference system does, and the safe
         choice because our model only ever saw embeddings from the training distribution. Needs the run's
         prepared dataset.
  direct that normalised mean itself, as one prefix vector (the projector has no bias and is followed by an
         RMSNorm, so the scale of a prefix vector does not matter, only its direction).

Prints the report (one section per line), the findings the clinical label extractor reads from it, and the
view of every video. --out DIR writes report.json (report, findings, per-video view and embedding norm,
skipped files, the snapped training study, model and data provenance), report.md and report.txt into a new
directory: DIR, or DIR1, DIR2, ... if DIR exists (nothing is ever overwritten; the path used is printed).
"""

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from echovlm.checkpoint import load_model
from echovlm.clinical import SECTIONS, TRAITS, extract_labels
from echovlm.common import atomic_write_json, atomic_write_text, autodetect_device, new_run_dir, print0
from echovlm.dataset import open_dataset
from echovlm.engine import Engine
from echovlm.retrieval import nearest_training_studies

# whitespace before a "Section:" header that does not start its own line (a model may drop a newline)
SECTION_BREAK = re.compile(r"[ \t]+(?=(?:" + "|".join(re.escape(s) for s in SECTIONS) + r")\s*:)")


def fail(message: str):
    raise SystemExit(f"generate_report: {message}")


def section_per_line(report: str) -> str:
    return "\n".join(line.strip() for line in SECTION_BREAK.sub("\n", report).splitlines() if line.strip())


def l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def open_run_dataset(info: dict, why: str):
    path = info.get("dataset")
    if not path:
        fail(f"the checkpoint {info['checkpoint']} does not record its dataset, which {why} needs")
    try:
        return open_dataset(path)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{why} needs the dataset the model was trained on, recorded as {path}: {e}")


def study_rows(ds, split: str, i: int) -> np.ndarray:
    """The (k, D) float32 embeddings of study i of a split, without reading the whole split."""
    emb, offsets = ds.embedding_block(split)
    return np.asarray(emb[offsets[i]:offsets[i + 1]], dtype=np.float32)


def study_from_videos(args, device):
    """(normalised (N, 512) video embeddings, per-video records, skipped-file records, weights provenance)."""
    from echovlm import video  # heavy (torchvision models); only needed on this path

    # the weights first: a missing download fails in milliseconds, not after every video has been decoded
    weights = Path(args.echoprime_dir) / "model_data" / "weights"
    encoder_file, views_file = weights / "echo_prime_encoder.pt", weights / "view_classifier.pt"
    try:
        encoder = video.build_encoder(encoder_file).to(device)
        views_model = video.build_view_classifier(views_file).to(device)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e} (--echoprime-dir, now {args.echoprime_dir}, is the folder that holds model_data/weights)")
    try:
        paths = video.find_videos(args.inputs)
    except FileNotFoundError as e:
        fail(str(e))
    if not paths:
        fail(f"no DICOM/AVI/MP4 files found in {', '.join(args.inputs)}; give a study folder or the video files")
    try:
        clips, kept, skipped = video.load_study(paths, progress=True)
    except video.VideoError as e:
        fail(f"{e}; give DICOM/AVI/MP4 echo videos of two frames or more")
    for path, reason in skipped:
        print0(f"skipped {path}: {reason}")
    emb, views = [], []
    with tqdm(total=len(clips), desc="encoding videos", unit="video") as bar:
        for start in range(0, len(clips), args.video_batch):
            batch = clips[start:start + args.video_batch]
            emb.append(video.encode_clips(encoder, batch, batch_size=len(batch), device=device))
            views += video.classify_views(views_model, batch, batch_size=len(batch), device=device)
            bar.update(len(batch))
    emb = torch.cat(emb).numpy()
    per_video = [{"file": str(p), "view": v, "embedding_norm": float(np.linalg.norm(e))}
                 for p, v, e in zip(kept, views, emb)]
    provenance = {"video_encoder": str(encoder_file.resolve()), "view_classifier": str(views_file.resolve())}
    return l2norm(emb), per_video, [{"file": str(p), "reason": r} for p, r in skipped], provenance


def read_embedding(path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        fail(f"cannot read --embedding {path} as a .npy array ({e})")
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        fail(f"--embedding {path} holds {type(arr).__name__} {getattr(arr, 'dtype', '')}; save one numeric "
             f"array with np.save")
    return arr[None] if arr.ndim == 1 else arr


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
    p.add_argument("--max-tokens", type=int, default=None, help="default: what fits in the model's sequence length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--video-batch", type=int, default=8, help="videos per encoder forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write report.json, report.md and report.txt into this new directory")
    args = p.parse_args(argv)
    given = sum([bool(args.inputs), args.embedding is not None, args.study is not None])
    if given != 1:
        p.error("give exactly one of: video paths, --embedding FILE, --study N")
    if args.video_batch < 1:
        p.error("--video-batch must be >= 1")

    device = torch.device(autodetect_device(args.device))
    try:
        model, tokenizer, info = load_model(args.run, device, which=args.which)
    except (FileNotFoundError, ValueError) as e:
        fail(f"{e} (--run takes a training run directory, with checkpoints/, or a checkpoint .pt file)")
    embed_dim = model.config.embed_dim
    t0 = time.time()
    provenance = {"run": str(Path(args.run).resolve()), "checkpoint": str(Path(info["checkpoint"]).resolve()),
                  "step": info["step"], "val_bpb": info["val_bpb"], "model_config": info["config"],
                  "tokenizer": info["tokenizer_dir"], "dataset": info["dataset"], "device": str(device),
                  "generation": {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens,
                                 "seed": args.seed}}
    per_video, skipped, reference, snapped, conditioning = [], [], None, None, None

    if args.study is not None:
        ds = open_run_dataset(info, "--study")
        ids = ds.studies("test")
        if not 0 <= args.study < len(ids):
            fail(f"--study {args.study} is out of range: the test split of {ds.path} has {len(ids)} studies "
                 f"(0..{len(ids) - 1})")
        prefix = study_rows(ds, "test", args.study)
        reference = ds.reports("test")[args.study]
        provenance["input"] = {"test_study": ids[args.study], "index": args.study}
        provenance["dataset_source"] = ds.meta.get("source")
    elif args.embedding is not None:
        prefix = read_embedding(args.embedding)
        provenance["input"] = {"embedding_file": str(Path(args.embedding).resolve())}
    else:
        if embed_dim != 512:
            fail(f"this model reads {embed_dim}-d embeddings, but the EchoPrime video encoder makes 512-d ones; "
                 "use a model trained on 512-d embeddings (EchoPrime data) to report on videos")
        ds = open_run_dataset(info, "--conditioning snap") if args.conditioning == "snap" else None
        video_emb, per_video, skipped, weights = study_from_videos(args, device)
        query = l2norm(video_emb.mean(0))
        conditioning = args.conditioning
        if ds is None:
            prefix = query[None]
        else:
            nearest, cosine = nearest_training_studies(ds, torch.from_numpy(query[None]).float().to(device), 1, device)
            idx, sim = int(nearest[0, 0]), float(cosine[0, 0])
            prefix = study_rows(ds, "train", idx)
            snapped = {"train_study": ds.studies("train")[idx], "cosine": round(sim, 4)}
            print0(f"conditioning: snapped to training study {snapped['train_study']} (cosine {sim:.3f})")
            provenance["dataset_source"] = ds.meta.get("source")
        provenance["input"] = {"videos": [v["file"] for v in per_video], "conditioning": conditioning, **weights}

    prefix = np.asarray(prefix, dtype=np.float32)
    if prefix.ndim != 2 or prefix.shape[0] < 1 or prefix.shape[1] != embed_dim or not np.isfinite(prefix).all():
        fail(f"the study embedding must be a finite ({embed_dim},) or (k, {embed_dim}) array, got shape "
             f"{prefix.shape}{'' if np.isfinite(prefix).all() else ' with NaN/inf values'}")

    engine = Engine(model, tokenizer)
    try:
        tokens = engine.generate([prefix], max_tokens=args.max_tokens, temperature=args.temperature,
                                 top_k=args.top_k, num_samples=1, seed=args.seed)[0][0]
    except ValueError as e:  # too many prefix rows or --max-tokens for the sequence length, bad sampling flags
        fail(str(e))
    report = section_per_line(tokenizer.decode(tokens))
    findings = extract_labels(report)
    elapsed = time.time() - t0

    print0(report)
    print0("\nfindings (echovlm.clinical labels):")
    for name in TRAITS:
        print0(f"  {name:37s} {findings[name]}")
    if per_video:
        print0("\nviews:")
    for v in per_video:
        print0(f"  {v['view']:28s} {v['file']}")
    if args.out:
        want = Path(args.out)
        out = new_run_dir(want.parent, want.name)
        if out != want:
            print0(f"--out {want} exists; writing into {out} instead")
        result = {"report": report, "findings": findings, "videos": per_video, "skipped": skipped,
                  "conditioning": conditioning, "snapped_to": snapped, "reference_report": reference,
                  "provenance": provenance, "seconds": round(elapsed, 2)}
        atomic_write_json(out / "report.json", result)
        atomic_write_text(out / "report.txt", report + "\n")
        md = ["# echovlm report", "", "```", report, "```", "", "| finding | value |", "|---|---|"]
        md += [f"| {k} | {v} |" for k, v in findings.items()]
        if per_video:
            md += ["", "| video | view | embedding norm |", "|---|---|---|"]
            md += [f"| {v['file']} | {v['view']} | {v['embedding_norm']:.3f} |" for v in per_video]
        if skipped:
            md += ["", "Skipped files:", ""] + [f"- {s['file']}: {s['reason']}" for s in skipped]
        if snapped is not None:
            md += ["", f"Conditioned on training study {snapped['train_study']}, the nearest to the videos "
                       f"(cosine {snapped['cosine']})."]
        if reference is not None:
            md += ["", "Reference report of this study:", "", "```", reference, "```"]
        md += ["", f"Model: {info['checkpoint']} (step {info['step']}, val bpb {info['val_bpb']}), trained on "
                   f"{info['dataset']}; generated in {elapsed:.1f}s."]
        atomic_write_text(out / "report.md", "\n".join(md) + "\n")
        print0(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
