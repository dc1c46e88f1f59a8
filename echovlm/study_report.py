"""One study -> one report: the work behind scripts.generate_report and scripts.serve, in one place.

A `Reporter` holds a trained model (and, once videos are asked for, the EchoPrime video encoder and view
classifier); `Reporter.report(...)` takes one study, given as video files, a precomputed embedding or a test
split index, and returns the report, the findings the clinical evaluator reads in it, each video's view and
the provenance. The CLI makes one Reporter per run of the script; the server keeps one for its lifetime.

With a model that has a findings head (echovlm.findings) the head decides the findings from the study's
embeddings, the user may override any of them (findings=["aortic_stenosis=1", "ejection_fraction=35"]: the
others stay the head's), and the GPT writes the report prompted with them, checked by the evaluator
(echovlm.faithful: values set to the decided ones; where a finding is still misstated, --samples sampled drafts,
then 3x that, and the report assembled from them section by section). The result's
`findings_prompt` lists each finding with the head's probability, the decision or value used, and whether it
came from the head or the user. A model made before the head writes a free report, and says so.

Every fault of the input or of the run is a `ReportError` with a one-line message (code 2: the user's input,
1: a failure while running); the CLI prints it with common.fail, the server shows it on the page.

Progress is reported through a callback, progress(stage, done, total, info): stage "decoding" (info: the file
and, for a skipped one, the reason), "encoding" (clips so far), "generating", "writing"; the CLI draws tqdm
bars from it, the server shows it on the page.

Two guards against a report that looks confident but is not about the study (issue 13):
* a model trained on synthetic embeddings (or whose dataset's source cannot be read) refuses video studies:
  its prefix space is not the EchoPrime encoder's, so the report would say nothing about the videos.
  allow_synthetic_model=True writes it anyway and the result's `warnings` say so.
* a snap whose cosine is below FAR_PERCENTILE of what held-out studies get (the nearest training study of up
  to FAR_SAMPLE val studies of the same dataset, measured in the same pass over the training split) is
  flagged as far from anything the model has seen. Measured on a synthetic dataset (20,000 studies, seed 0;
  2,001 val studies): val studies snap at cosine 0.19-0.34 (median 0.25, 1st percentile 0.211; 0.215 from
  the 256-study sample), 200 random 512-d directions at median 0.166 (max 0.219), and a real echo's video
  embedding on a synthetic model at 0.13. Since a dataset's own held-out studies set the bar, it holds for
  EchoPrime data, whose cosines are on another scale, without a constant tuned on one of them.
"""

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from echovlm.checkpoint import load_model
from echovlm.clinical import BINARY_TRAITS, SECTIONS, TRAITS, extract_labels
from echovlm.dataset import open_dataset
from echovlm.echoprime import EMBED_DIM, ENCODER_WEIGHTS, VIEW_CLASSIFIER_WEIGHTS, WEIGHTS, load_echoprime_rules
from echovlm.engine import Engine
from echovlm.faithful import prompted_reports, states
from echovlm.findings import decide, mean_features, parse_overrides
from echovlm.gpt import PRESENT, UNKNOWN
from echovlm.consistency import contradictions
from echovlm.retrieval import nearest_training_studies
from echovlm.reward import RewardWeights, consensus

# whitespace before a "Section:" header that does not start its own line (a model may drop a newline). Only from
# the run's first character: tried from each character of a long run of spaces, the run was rescanned to its end
# every time (quadratic: 20,000 spaces took 4.7 s); the match, when there is one, is the same whole run.
SECTION_BREAK = re.compile(r"(?<![ \t])[ \t]+(?=(?:" + "|".join(re.escape(s) for s in SECTIONS) + r")\s*:)")
SENTENCE_BREAK = re.compile(r"(?<=[.;!?])\s+(?=\S)")
VIDEO_SOURCES = ("echoprime", "files")  # dataset sources whose embeddings can be EchoPrime video embeddings
FAR_PERCENTILE = 1.0  # a snap less similar than 99% of held-out studies' snaps is "far"
FAR_SAMPLE = 256  # val studies whose nearest training study sets the bar
DECODINGS = ("consensus", "greedy", "sample")
WEIGHT_STUDIES = 2000  # training reports whose labels set the consensus's trait weights (prevalences)


class ReportError(Exception):
    """A study that cannot be reported on, in one line. code 2: the user's input; 1: a failure while running."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class StudyReport:
    result: dict  # what report.json holds
    clips: torch.Tensor | None  # (N, 3, 16, 224, 224) preprocessed clips of the videos used: what the encoder saw
    prefix: np.ndarray  # (k, D) the embedding rows the report was written from: a rewrite reuses them


def section_per_line(report: str) -> str:
    return "\n".join(line.strip() for line in SECTION_BREAK.sub("\n", report).splitlines() if line.strip())


def l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def stated(value) -> bool:
    """A finding the report states: a positive binary trait or a number."""
    return value is not None and value != 0 if isinstance(value, int) else value is not None


def evidence(report: str) -> list[list[tuple[str, list[str]]]]:
    """Per report line, its sentences with the traits each one states on its own (its section header kept).

    The clinical evaluator reads the whole report; reading each sentence alone names the phrase behind each
    finding, which is what the page highlights.
    """
    lines = []
    for line in report.splitlines():
        header = re.match(r"\s*(" + "|".join(re.escape(s) for s in SECTIONS) + r")\s*:", line)
        parts = SENTENCE_BREAK.split(line)
        out = []
        for i, part in enumerate(parts):
            text = part if i == 0 or header is None else f"{header.group(1)}: {part}"
            out.append((part, [t for t, v in extract_labels(text).items() if stated(v)]))
        lines.append(out)
    return lines


def read_embedding(path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ReportError(f"cannot read --embedding {path} as a .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise ReportError(f"--embedding {path} holds {type(arr).__name__} {getattr(arr, 'dtype', '')}; save one "
                          f"numeric array with np.save")
    return arr[None] if arr.ndim == 1 else arr


def check_generation(temperature: float, top_k: int | None, max_tokens: int | None, decode: str = "greedy",
                     samples: int = 2):
    """Sampling settings, checked before any model work (NaN compares False to everything, so say it)."""
    if decode not in DECODINGS:
        raise ReportError(f"--decode must be one of {', '.join(DECODINGS)}, got {decode!r}")
    if decode == "consensus" and samples < 1:
        raise ReportError(f"--decode consensus picks among the greedy report and --samples sampled ones; --samples "
                          f"must be >= 1, got {samples}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ReportError(f"--temperature must be a number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ReportError(f"--top-k must be >= 1 (or left unset for no limit), got {top_k}")
    if max_tokens is not None and max_tokens < 1:
        raise ReportError(f"--max-tokens must be >= 1 (or left unset: what fits in the model's sequence length), "
                          f"got {max_tokens}")


def study_rows(ds, split: str, i: int) -> np.ndarray:
    """The (k, D) float32 embeddings of study i of a split, without reading the whole split."""
    emb, offsets = ds.embedding_block(split)
    return np.asarray(emb[offsets[i]:offsets[i + 1]], dtype=np.float32)


def val_sample_queries(ds) -> torch.Tensor:
    """Normalised mean embeddings of up to FAR_SAMPLE val studies, evenly spread over the split."""
    emb, offsets = ds.embedding_block("val")
    n = len(offsets) - 1
    picks = np.unique(np.linspace(0, n - 1, min(n, FAR_SAMPLE)).round().astype(int)) if n else []
    rows = [np.asarray(emb[offsets[i]:offsets[i + 1]], dtype=np.float32).mean(0) for i in picks]
    return torch.from_numpy(l2norm(np.stack(rows))) if rows else torch.zeros(0, ds.embed_dim)


class Reporter:
    """A loaded model that writes reports; EchoPrime's video models are loaded on the first video study."""

    def __init__(self, run, which: str = "best", device="cpu", echoprime_dir="../EchoPrime"):
        self.device = torch.device(device)
        self.echoprime_dir = Path(echoprime_dir)
        try:
            self.model, self.tokenizer, self.info = load_model(run, self.device, which=which)
        except (FileNotFoundError, ValueError) as e:
            raise ReportError(f"{e} (--run takes a training run directory, with checkpoints/, or a checkpoint .pt "
                              "file)") from None
        self.run = Path(run)
        self.engine = Engine(self.model, self.tokenizer)
        self.head = self.info["findings"]
        # the prompt's fidelity is checked with the rules the head learned; EchoPrime's file must still be there
        self.rules = None
        if self.info.get("rules"):
            try:
                self.rules = load_echoprime_rules(self.info["rules"])
            except (FileNotFoundError, ValueError) as e:
                raise ReportError(f"this model was trained with the label rules {self.info['rules']}, which cannot be "
                                  f"read now ({e}); restore that file") from None
        self.video_models = None  # (encoder, view classifier, provenance) once loaded
        self._dataset = None
        self._weights = None

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    def dataset(self, why: str):
        """The prepared dataset the model was trained on (opened once)."""
        if self._dataset is None:
            path = self.info.get("dataset")
            if not path:
                raise ReportError(f"the checkpoint {self.info['checkpoint']} does not record its dataset, which {why} "
                                  "needs")
            try:
                self._dataset = open_dataset(path)
            except (FileNotFoundError, ValueError) as e:
                raise ReportError(f"{why} needs the dataset the model was trained on, recorded as {path}: {e}") from None
        return self._dataset

    def load_video_models(self):
        from echovlm import video  # heavy (torchvision models); only needed on this path

        if self.video_models is None:
            # the weights first: a missing download fails in milliseconds, not after every video has been decoded
            encoder_file, views_file = self.echoprime_dir / ENCODER_WEIGHTS, self.echoprime_dir / VIEW_CLASSIFIER_WEIGHTS
            try:
                encoder = video.build_encoder(encoder_file).to(self.device)
                views = video.build_view_classifier(views_file).to(self.device)
            except (FileNotFoundError, ValueError) as e:
                raise ReportError(f"{e} (--echoprime-dir, now {self.echoprime_dir}, is the folder that holds "
                                  f"{WEIGHTS.as_posix()})") from None
            provenance = {"video_encoder": str(encoder_file.resolve()), "view_classifier": str(views_file.resolve())}
            self.video_models = encoder, views, provenance
        return self.video_models

    def check_video_model(self, allow_synthetic_model: bool) -> list[str]:
        """Refuse videos on a model not trained on EchoPrime-space embeddings; the warnings an override leaves."""
        if self.embed_dim != EMBED_DIM:
            raise ReportError(f"this model reads {self.embed_dim}-d embeddings, but the EchoPrime video encoder makes "
                              f"{EMBED_DIM}-d ones; use a model trained on {EMBED_DIM}-d embeddings (EchoPrime data) to "
                              "report on videos")
        try:
            source = self.dataset("a video study").meta.get("source")
        except ReportError as e:
            source, why = None, str(e)
        else:
            why = f"its dataset {self._dataset.path} has source {source!r}"
        if source in VIDEO_SOURCES:
            return []
        if not allow_synthetic_model:
            raise ReportError(f"this model was not trained on EchoPrime video embeddings ({why}), so a report for "
                              "videos would not be about them; train on EchoPrime data (--source echoprime), or pass "
                              "--allow-synthetic-model to write one anyway (its header then says so)")
        return [f"NOT A REPORT ABOUT THESE VIDEOS: the model was not trained on EchoPrime video embeddings ({why}); "
                "written only because --allow-synthetic-model was given"]

    def study_from_videos(self, inputs, video_batch: int, progress):
        """(normalised (N, 512) video embeddings, clips, per-video records, skipped-file records, provenance)."""
        from echovlm import video

        encoder, views_model, provenance = self.load_video_models()
        try:
            paths = video.find_videos(inputs)
        except FileNotFoundError as e:
            raise ReportError(str(e)) from None
        if not paths:
            raise ReportError(f"no DICOM/AVI/MP4 files found in {', '.join(map(str, inputs))}; give a study folder or "
                              "the video files")

        def on_file(i, n, path, reason):
            progress("decoding", i, n, {"file": str(path), "reason": reason})

        try:
            clips, kept, skipped = video.load_study(paths, on_file=on_file)
        except video.VideoError as e:
            raise ReportError(f"{e}; give DICOM/AVI/MP4 echo videos of two frames or more") from None
        emb, probs = [], []
        progress("encoding", 0, len(clips), {})
        for start in range(0, len(clips), video_batch):
            batch = clips[start:start + video_batch]
            emb.append(video.encode_clips(encoder, batch, batch_size=len(batch), device=self.device))
            probs.append(video.view_probabilities(views_model, batch, batch_size=len(batch), device=self.device))
            progress("encoding", start + len(batch), len(clips), {})
        emb, probs = torch.cat(emb).numpy(), torch.cat(probs)
        per_video = [{"file": str(p), "view": video.VIEW_CLASSES[int(q.argmax())], "view_confidence": round(float(q.max()), 4),
                      "embedding_norm": float(np.linalg.norm(e))} for p, q, e in zip(kept, probs, emb)]
        return l2norm(emb), clips, per_video, [{"file": str(p), "reason": r} for p, r in skipped], provenance

    def consensus_weights(self) -> RewardWeights:
        """The reward's trait weights from the training reports of the run's dataset (computed once)."""
        if self._weights is None:
            reports = self.dataset("--decode consensus").reports("train")[:WEIGHT_STUDIES]
            self._weights = RewardWeights.from_labels([extract_labels(r) for r in reports])
        return self._weights

    def decode(self, prefix, decode: str, samples: int, temperature: float, top_k, max_tokens, seed) -> list[int]:
        """Report token ids for one study: greedy, one sample, or the consensus of the greedy report and
        `samples` sampled ones (echovlm.reward.consensus: the candidate that agrees best with the others under the
        clinical reward; test_inference measures it against greedy decoding on every evaluation)."""
        if decode == "greedy" or (decode == "sample" and temperature == 0):
            return self.engine.generate([prefix], max_tokens=max_tokens, temperature=0.0)[0][0]
        if decode == "sample":
            return self.engine.generate([prefix], max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                        seed=seed)[0][0]
        weights = self.consensus_weights()
        greedy = self.engine.generate([prefix], max_tokens=max_tokens, temperature=0.0)[0][0]
        drawn = self.engine.generate([prefix], max_tokens=max_tokens, temperature=temperature or 1.0, top_k=top_k,
                                     num_samples=samples, seed=seed)[0]
        candidates = [greedy, *drawn]
        texts = [self.tokenizer.decode(t) for t in candidates]
        pick = consensus([extract_labels(t) for t in texts], weights,
                         np.array([len(contradictions(t)) for t in texts]))
        return candidates[pick]

    def overrides(self, findings) -> dict[str, float]:
        """The user's findings ("name=value" strings) checked against this model: a ReportError for a bad one."""
        if not findings:
            return {}
        if self.head is None:
            raise ReportError("this model has no findings head (it was trained before the head existed, or with "
                              "--no-findings): it writes free reports only; setting findings needs a model retrained "
                              "with scripts.base_train")
        try:
            return parse_overrides(list(findings), self.head)
        except ValueError as e:
            raise ReportError(str(e)) from None

    def report(self, videos=None, embedding=None, study=None, conditioning="snap", decode="consensus", samples=8,
               temperature=1.0, top_k=None, max_tokens=None, seed=0, video_batch=8, allow_synthetic_model=False,
               progress=None, findings=None) -> StudyReport:
        """Exactly one of videos (files/folders), embedding (a .npy path or an array), study (test-split index).
        findings: "name=value" strings that override the head's decisions (checked before any work)."""
        progress = progress or (lambda stage, done, total, info: None)
        if sum([bool(videos), embedding is not None, study is not None]) != 1:
            raise ReportError("give exactly one of: video paths, --embedding FILE, --study N")
        if video_batch < 1:
            raise ReportError(f"--video-batch must be >= 1, got {video_batch}")
        check_generation(temperature, top_k, max_tokens, decode, samples)
        overrides = self.overrides(findings)
        if decode == "consensus" and temperature == 0:  # greedy samples would all be one report: they are drawn at 1
            temperature = 1.0
        info, t0 = self.info, time.time()
        provenance = {"run": str(self.run.resolve()), "checkpoint": str(Path(info["checkpoint"]).resolve()),
                      "step": info["step"], "val_bpb": info["val_bpb"], "model_config": info["config"],
                      "tokenizer": info["tokenizer_dir"], "dataset": info["dataset"], "device": str(self.device),
                      "generation": {"decode": decode, "samples": samples if decode == "consensus" else None,
                                     "temperature": temperature, "top_k": top_k, "max_tokens": max_tokens, "seed": seed}}
        per_video, skipped, reference, snapped, used, clips, warnings = [], [], None, None, None, None, []

        if study is not None:
            ds = self.dataset("--study")
            ids = ds.studies("test")
            if not 0 <= study < len(ids):
                raise ReportError(f"--study {study} is out of range: the test split of {ds.path} has {len(ids)} "
                                  f"studies (0..{len(ids) - 1})")
            prefix = study_rows(ds, "test", study)
            reference = ds.reports("test")[study]
            provenance["input"] = {"test_study": ids[study], "index": study}
            provenance["dataset_source"] = ds.meta.get("source")
        elif embedding is not None:
            if isinstance(embedding, np.ndarray):
                prefix = embedding[None] if embedding.ndim == 1 else embedding
                provenance["input"] = {"embedding": "array"}
            else:
                prefix = read_embedding(embedding)
                provenance["input"] = {"embedding_file": str(Path(embedding).resolve())}
        else:
            warnings += self.check_video_model(allow_synthetic_model)
            ds = self.dataset("--conditioning snap") if conditioning == "snap" else None
            video_emb, clips, per_video, skipped, weights = self.study_from_videos(videos, video_batch, progress)
            query = l2norm(video_emb.mean(0))
            used = conditioning
            if ds is None:
                prefix = query[None]
            else:
                # the val sample rides along in the same pass over the training split and sets the "far" bar
                queries = torch.cat([torch.from_numpy(query[None]).float(), val_sample_queries(ds)]).to(self.device)
                nearest, cosine = nearest_training_studies(ds, queries, 1, self.device)
                idx, sim = int(nearest[0, 0]), float(cosine[0, 0])
                prefix = study_rows(ds, "train", idx)
                bar = float(np.percentile(cosine[1:, 0], FAR_PERCENTILE)) if len(cosine) > 1 else None
                far = bar is not None and sim < bar
                snapped = {"train_study": ds.studies("train")[idx], "cosine": round(sim, 4),
                           "far_threshold": None if bar is None else round(bar, 4), "far": far}
                if far:
                    warnings.append(f"FAR FROM THE TRAINING DATA: the nearest training study has cosine {sim:.3f}, "
                                    f"below what {FAR_PERCENTILE:g}% of held-out studies get ({bar:.3f}); the model has "
                                    "seen nothing like this study, so the report is unlikely to describe it")
                provenance["dataset_source"] = ds.meta.get("source")
            provenance["input"] = {"videos": [v["file"] for v in per_video], "conditioning": used, **weights}

        prefix = np.asarray(prefix, dtype=np.float32)
        finite = bool(np.isfinite(prefix).all())
        if prefix.ndim != 2 or prefix.shape[0] < 1 or prefix.shape[1] != self.embed_dim or not finite:
            raise ReportError(f"the study embedding must be a finite ({self.embed_dim},) or (k, {self.embed_dim}) "
                              f"array, got shape {prefix.shape}{'' if finite else ' with NaN/inf values'}")
        seq_len = self.model.config.sequence_len
        room = seq_len - (prefix.shape[0] + self.model.config.n_prompt + 1)  # prefix rows, prompt, <|bos|> first
        if room < 1:
            raise ReportError(f"the study has {prefix.shape[0]} embedding rows, but this model's sequence length "
                              f"{seq_len} leaves room for a report only after at most "
                              f"{seq_len - self.model.config.n_prompt - 2} rows; give fewer "
                              "rows (e.g. their mean)")
        if max_tokens is not None and max_tokens > room:
            raise ReportError(f"--max-tokens {max_tokens} does not fit: after {prefix.shape[0]} embedding row(s) this "
                              f"model's sequence length {seq_len} leaves room for {room} report tokens; ask for at "
                              "most that, or leave --max-tokens unset")
        progress("generating", 0, 1, {})
        prompt = None
        if self.head is not None:
            decided = decide(self.head, mean_features([prefix]), overrides)
            texts, stated, _ = prompted_reports(
                self.engine, [prefix], decided["codes"], decided["values"],
                lambda ts: [extract_labels(t, self.rules) for t in ts], retries=0 if decode == "greedy" else samples,
                temperature=temperature or 1.0, seed=seed, top_k=top_k, max_tokens=max_tokens)
            text, prompt = texts[0], findings_prompt(decided, stated[0])
        else:
            warnings.append("this model has no findings head (trained before it existed): the report is a free "
                            "report, written from the embedding alone; retrain to get decided, editable findings")
            text = self.tokenizer.decode(self.decode(prefix, decode, samples, temperature, top_k, max_tokens, seed))
        progress("generating", 1, 1, {})
        report = section_per_line(text)
        result = {"report": report, "findings": extract_labels(report), "findings_prompt": prompt,
                  "videos": per_video, "skipped": skipped,
                  "conditioning": used, "snapped_to": snapped, "reference_report": reference, "warnings": warnings,
                  "provenance": provenance, "seconds": round(time.time() - t0, 2)}
        return StudyReport(result, clips, prefix)


def findings_prompt(decided: dict, stated: dict) -> list[dict]:
    """One row per trait of what the report was prompted with (study 0 of decide()'s output): the head's
    probability (binary) or value, the decision or value used, who set it, and whether the report states it."""
    rows = []
    for j, t in enumerate(TRAITS):
        binary = j < len(BINARY_TRAITS)
        code = int(decided["codes"][0, j])
        used = None if code == UNKNOWN else (int(code == PRESENT) if binary else
                                            float(decided["values"][0, j - len(BINARY_TRAITS)]))
        prob = decided["prob"][0, j] if binary else None
        rows.append({"trait": t, "kind": "binary" if binary else "value", "used": used,
                     "probability": None if prob is None or np.isnan(prob) else round(float(prob), 4),
                     "source": "user" if t in decided["edited"] else ("head" if used is not None else "unknown"),
                     "stated": None if used is None else states(stated, t, used)})
    return rows


def markdown(result: dict) -> str:
    """report.md of a result."""
    prov, snapped = result["provenance"], result["snapped_to"]
    md = ["# echovlm report", ""] + [f"> **{w}**\n" for w in result["warnings"]]
    md += ["```", result["report"], "```", ""]
    if result.get("findings_prompt"):
        md += ["Findings the report was written from (head: decided by the findings head; user: set by you):", "",
               "| finding | probability | used | from | stated in the report |", "|---|---|---|---|---|"]
        md += [f"| {r['trait']} | {'' if r['probability'] is None else r['probability']} | {r['used']} | {r['source']} "
               f"| {'' if r['stated'] is None else 'yes' if r['stated'] else 'NO'} |" for r in result["findings_prompt"]]
        md += [""]
    md += ["| finding (read from the report) | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in result["findings"].items()]
    if result["videos"]:
        md += ["", "| video | view | embedding norm |", "|---|---|---|"]
        md += [f"| {v['file']} | {v['view']} | {v['embedding_norm']:.3f} |" for v in result["videos"]]
    if result["skipped"]:
        md += ["", "Skipped files:", ""] + [f"- {s['file']}: {s['reason']}" for s in result["skipped"]]
    if snapped is not None:
        md += ["", f"Conditioned on training study {snapped['train_study']}, the nearest to the videos "
                   f"(cosine {snapped['cosine']})."]
    if result["reference_report"] is not None:
        md += ["", "Reference report of this study:", "", "```", result["reference_report"], "```"]
    md += ["", f"Model: {prov['checkpoint']} (step {prov['step']}, val bpb {prov['val_bpb']}), trained on "
               f"{prov['dataset']}; generated in {result['seconds']:.1f}s."]
    return "\n".join(md) + "\n"


def printed(result: dict) -> list[str]:
    """What the CLI prints: the report, its findings, each video's view."""
    def used(x) -> str:  # a decided LVEF/PASP to one decimal, as a report would state it; 0/1 and None as they are
        return f"{x:.1f}" if isinstance(x, float) else str(x)

    lines = [result["report"]]
    if result.get("findings_prompt"):
        lines.append("\nfindings the report was written from (probability, used, from):")
        lines += [f"  {r['trait']:37s} {'' if r['probability'] is None else format(r['probability'], '.3f'):>6s}  "
                  f"{used(r['used']):>6s}  {r['source']}" for r in result["findings_prompt"]]
    lines.append("\nfindings (echovlm.clinical labels):")
    lines += [f"  {name:37s} {result['findings'][name]}" for name in TRAITS]
    if result["videos"]:
        lines.append("\nviews:")
    lines += [f"  {v['view']:28s} {v['file']}" for v in result["videos"]]
    return lines
