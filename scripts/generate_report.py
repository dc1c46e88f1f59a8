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

With a model that has a findings head (every model base_train makes now), the head decides the findings from
the study's embeddings (thresholds set on val for balanced accuracy), --finding NAME=VALUE overrides any of
them (the others stay the head's), and the report is written prompted with them and checked by the evaluator
(echovlm.faithful): greedy, its LVEF/PASP numbers set to the decided values, and where it still misstates a
prompted finding or contradicts itself, --samples sampled drafts (then 3x that) from which the report is
assembled section by section (--decode greedy: no drafts). The findings used are printed with the head's probabilities and who set them.
A model made before the head writes a free report, decoded by consensus (--decode): the greedy report and
--samples sampled reports are labelled, and the one that agrees best with the others under the clinical
reward (echovlm.reward) is written.

Prints the report (one section per line), the findings the clinical label extractor reads from it, and the
view of every video. --out DIR writes report.json (report, findings, per-video view and embedding norm,
skipped files, the snapped training study, model and data provenance), report.md and report.txt into a new
directory: DIR, or DIR1, DIR2, ... if DIR exists (nothing is ever overwritten; the path used is printed).

A model trained on synthetic embeddings refuses videos (its reports would not be about them) unless
--allow-synthetic-model is given, and then says so above the report; a snap to a training study less similar
than what 99% of held-out studies get says the study is far from anything the model has seen. The work is
echovlm/study_report.py, which scripts.serve calls too.
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from echovlm.common import atomic_write_json, atomic_write_text, autodetect_device, fail, new_run_dir, print0
from echovlm.study_report import DECODINGS, Reporter, ReportError, markdown, printed

BARS = {"decoding": ("reading videos", "file"), "encoding": ("encoding videos", "video")}


class Bars:
    """tqdm bars from Reporter's progress callback; a skipped file is one line as soon as it is read."""

    def __init__(self):
        self.stage, self.bar = None, None

    def __call__(self, stage, done, total, info):
        if stage != self.stage:
            self.close()
            self.stage = stage
            if stage in BARS:
                desc, unit = BARS[stage]
                self.bar = tqdm(total=total, desc=desc, unit=unit)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        if info.get("reason"):
            tqdm.write(f"skipped {info['file']}: {info['reason']}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="study folder(s) or DICOM/AVI/MP4 files")
    p.add_argument("--run", required=True, help="training run directory (or a checkpoint .pt file)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to load")
    p.add_argument("--embedding", help="a precomputed study embedding .npy, shape (D,) or (k, D)")
    p.add_argument("--study", type=int, help="index of a study in the test split of the run's dataset")
    p.add_argument("--echoprime-dir", default="../EchoPrime", help="EchoPrime checkout with model_data/weights")
    p.add_argument("--conditioning", default="snap", choices=["snap", "direct"], help="how videos become the prefix")
    p.add_argument("--allow-synthetic-model", action="store_true",
                   help="report on videos with a model not trained on EchoPrime embeddings (the report says so)")
    p.add_argument("--decode", default="consensus", choices=DECODINGS,
                   help="consensus: of the greedy report and --samples sampled ones, the one that agrees best with the "
                        "others under the clinical reward (the most accurate findings: see test_inference); greedy; or "
                        "sample: one report at --temperature")
    p.add_argument("--samples", type=int, default=8, help="sampled reports the consensus picks among, with the greedy one (a "
                                                              "model with a findings head: the drafts its report is "
                                                              "assembled from where the greedy one is wrong, then 3x)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (consensus, sample); 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: what fits in the model's sequence length")
    p.add_argument("--finding", action="append", default=[], metavar="NAME=VALUE",
                   help="set a finding instead of the findings head's decision, e.g. --finding aortic_stenosis=1 "
                        "--finding ejection_fraction=35 (binary findings 0/1, LVEF 5-90, PASP 5-150); repeatable, "
                        "the findings not named stay the head's")
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

    bars = Bars()
    try:
        device = torch.device(autodetect_device(args.device))
        reporter = Reporter(args.run, which=args.which, device=device, echoprime_dir=args.echoprime_dir)
        done = reporter.report(videos=args.inputs or None, embedding=args.embedding, study=args.study,
                               conditioning=args.conditioning, decode=args.decode, samples=args.samples,
                               temperature=args.temperature, top_k=args.top_k,
                               max_tokens=args.max_tokens, seed=args.seed, video_batch=args.video_batch,
                               allow_synthetic_model=args.allow_synthetic_model, progress=bars,
                               findings=args.finding)
    except ReportError as e:
        bars.close()
        fail("generate_report", str(e), e.code)
    except RuntimeError as e:  # autodetect_device: a --device this machine does not have
        fail("generate_report", str(e))
    bars.close()
    result = done.result
    if result["snapped_to"] is not None:
        snapped = result["snapped_to"]
        print0(f"conditioning: snapped to training study {snapped['train_study']} (cosine {snapped['cosine']:.3f})")
    for warning in result["warnings"]:
        print0(f"WARNING: {warning}")
    for line in printed(result):
        print0(line)
    if args.out:
        want = Path(args.out)
        out = new_run_dir(want.parent, want.name)
        if out != want:
            print0(f"--out {want} exists; writing into {out} instead")
        atomic_write_json(out / "report.json", result)
        atomic_write_text(out / "report.txt", result["report"] + "\n")
        atomic_write_text(out / "report.md", markdown(result))
        print0(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'report.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
