"""A local web page for your own echo studies and your runs: upload a study's videos, see each clip as the encoder
saw it with its view, the report with the phrases behind each finding, the findings table; set findings and have
the report rewritten; browse the runs.

    python -m scripts.serve --run runs/speedrun/model --echoprime-dir ../EchoPrime
    python -m scripts.serve --run runs/speedrun/model --host 0.0.0.0 --port 8080 --max-upload-mb 2048

Then open http://127.0.0.1:8000. The model (and the EchoPrime video models, when their weights are there) is
loaded once; requests are served one at a time in the order they arrive, and the page says how many are ahead.
A study is the uploaded files or a test-split study of the run's dataset; the report is written by
echovlm/study_report.py, the same code as scripts.generate_report, so the page and the CLI agree.

POST /api/jobs takes the study as files, study=N (a test-split index) or rewrite=ID (a finished request: the
same study written again from the embedding rows its report was written from, which the server keeps with the
request), and finding=NAME=VALUE as often as needed (generate_report's --finding: it overrides the findings
head's decision); the findings are checked before anything is written or queued, a bad one is a 400.

Safety: binds 127.0.0.1 unless --host says otherwise (the page has no login: only bind other addresses on a
network you trust); answers only requests whose Host is a name it is bound to (DNS rebinding gets a 421) and
refuses a POST from a page of another site (403); uploads above --max-upload-mb are refused with a message,
chunked ones as soon as the count passes it; each request's files go into its own temporary directory, under
names the server makes (an uploaded file name is only ever shown, never used as a path), deleted when the
report is written; a file that is not a usable video, or whose header declares more pixels than
echovlm/video.py decodes, is a message on its card. The run page shows only runs listed under --runs-dir and
only PNG files inside them. Ctrl-C stops it.
"""

import argparse
import ipaddress
import logging
import math
import queue
import re
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile

from echovlm import web
from echovlm.clinical import TRAITS, extract_labels
from echovlm.common import autodetect_device, fail, print0
from echovlm.findings import VALUE_RANGES
from echovlm.report import build_card
from echovlm.study_report import VIDEO_SOURCES, Reporter, ReportError, evidence, markdown
from echovlm.video import few_reasons

SUFFIXES = {".dcm", ".dicom", ".avi", ".mp4"}  # kept on the server's own file names: they choose the reader
KEEP_JOBS = 20  # finished requests kept in memory (their page and downloads)
MAX_FILES = 1000  # per upload: a study has tens of clips
CHUNK = 1 << 20
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
EVERY_INTERFACE = {"0.0.0.0", "::"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
FIELDS = {"study": "a test study number", "conditioning": "snap or direct", "rewrite": "a request id",
          "finding": "NAME=VALUE"}  # the form's text fields: what each holds
# what a rewrite takes from the report it rewrites: the study as that request described it
STUDY_FIELDS = ("videos", "skipped", "conditioning", "snapped_to", "reference_report", "warnings")
log = logging.getLogger("echovlm.serve")


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def upload_name(up: UploadFile) -> str | None:
    """The file name as sent, decoded as UTF-8 with replacement characters where the bytes are not UTF-8.

    Starlette falls back to Latin-1, which shows a name in any other encoding as mojibake; the raw bytes are
    still in the part's Content-Disposition header. The name is only ever shown, never used as a path."""
    for key, value in up.headers.raw:
        if key.lower() == b"content-disposition":
            raw = parse_options_header(value)[1].get(b"filename")
            if raw is not None:
                return raw.decode("utf-8", errors="replace")
    return up.filename


def display_name(name: str | None, i: int) -> str:
    """What the page shows for an uploaded file: its name (a folder upload's relative path), printable, short."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", name or "").strip()
    return name[-200:] if name else f"file {i + 1}"


def run_root(run: Path) -> Path:
    """The run directory whose report card the run page shows: speedrun's RUN for --run RUN/model."""
    run = run if run.is_dir() else run.parent.parent  # a checkpoint file: RUN/checkpoints/best.pt
    for d in (run, run.parent):
        if (d / "report.md").is_file() or (d / "steps.tsv").is_file():
            return d
    return run


class HostGuard:
    """Refuses a request for a host name the server is not bound to, and a state-changing request from a page
    of another site.

    DNS rebinding: a site whose name is made to resolve to 127.0.0.1 reaches this server from the visitor's
    browser with its own name as Host, and could then read the page and the reports. Cross-site submission: any
    page may POST a multipart form to any address (browsers send no CORS preflight for it), with an Origin
    header naming that page. The page itself sends the server's own origin; curl and scripts send none.
    """

    def __init__(self, app, host: str):
        self.app = app
        self.every_interface = host in EVERY_INTERFACE
        self.names = LOOPBACK | {host.strip("[]").lower()} - EVERY_INTERFACE
        if self.every_interface:  # then it is reached by any of the machine's addresses or its own names
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def allowed(self, host: str) -> bool:
        # the port is not compared: an ssh tunnel (-L 9000:localhost:8000) keeps the name and changes it
        try:
            name = (urlsplit("//" + host).hostname or "").rstrip(".")
        except ValueError:  # "[::1" and such
            return False
        if name in self.names:
            return True
        try:
            ipaddress.ip_address(name)  # an address literal cannot be rebound to another machine
            return self.every_interface
        except ValueError:
            return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host, origin = headers.get("host"), headers.get("origin")
            refusal = None
            if host is not None and not self.allowed(host):
                refusal = error(f"this server answers to {', '.join(sorted(self.names))}, not to Host {host[:100]!r}; "
                                "open it by one of those names (serve's --host sets the one it listens on)", 421)
            elif origin is not None and scope["method"] not in SAFE_METHODS and \
                    (host is None or origin.lower().partition("://")[2] != host.lower()):
                refusal = error(f"a page of another site ({origin[:100]}) may not send requests to this server; "
                                "use the page the server itself serves", 403)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TooBig(Exception):
    """The request body went over --max-upload-mb while it was being read."""


class Job:
    def __init__(self, study=None, conditioning="snap", findings=()):
        self.id = uuid.uuid4().hex
        self.study, self.conditioning = study, conditioning
        self.findings = list(findings)  # "name=value" overrides of the findings head, checked before queueing
        self.dir: Path | None = None  # the request's temporary directory, deleted when the report is written
        self.files: list[dict] = []  # per uploaded file: name (shown), disk (server path), then view or reason
        self.state, self.progress, self.error = "queued", {"stage": None, "done": 0, "total": 0}, None
        self.result, self.page, self.previews = None, None, {}
        # the (k, D) rows the report was written from: all a rewrite needs, since the uploads are deleted once the
        # report is written (tens of rows of 512 floats, kept as long as the request)
        self.prefix = None
        self.rewrites: dict | None = None  # the result of the report this request rewrites

    def rewriting(self, parent: "Job"):
        """Make this request a rewrite of parent's report: its rows, and its clips with their previews."""
        self.prefix, self.rewrites, self.previews = parent.prefix, parent.result, parent.previews
        self.files = [{**f, "preview": f["preview"].replace(parent.id, self.id)} if "preview" in f else dict(f)
                      for f in parent.files]

    def public(self, ahead: int) -> dict:
        files = [{k: v for k, v in f.items() if k != "disk"} for f in self.files]
        return {"id": self.id, "state": self.state, "ahead": ahead, "progress": self.progress, "error": self.error,
                "files": files, "result": self.page}


class Service:
    """One model, one worker thread: requests are handled in arrival order."""

    def __init__(self, reporter: Reporter, allow_synthetic_model: bool, video_batch: int):
        self.reporter, self.allow, self.video_batch = reporter, allow_synthetic_model, video_batch
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.waiting: list[str] = []
        self.lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.work, name="echovlm-reports", daemon=True)
        self.thread.start()

    def submit(self, job: Job):
        with self.lock:
            self.jobs[job.id] = job
            self.waiting.append(job.id)
            while len(self.jobs) > KEEP_JOBS + len(self.waiting):
                old = next(j for j in self.jobs if j not in self.waiting)
                del self.jobs[old]
        self.queue.put(job)

    def ahead(self, job: Job) -> int:
        with self.lock:
            return self.waiting.index(job.id) if job.id in self.waiting else 0

    def stop(self):
        self.queue.put(None)
        with self.lock:
            for job in self.jobs.values():
                if job.dir is not None:
                    shutil.rmtree(job.dir, ignore_errors=True)

    def work(self):
        while (job := self.queue.get()) is not None:
            state = "error"
            try:
                state = self.run(job)
            finally:
                # the uploads are deleted before the job says it is finished: a page (or test) that sees "done"
                # or "error" never finds them still on disk
                if job.dir is not None:
                    shutil.rmtree(job.dir, ignore_errors=True)
                job.state = state
                with self.lock:
                    self.waiting.remove(job.id)

    def shown(self, text: str, job: Job) -> str:
        """A message or path with the server's file names replaced by the uploaded names."""
        for f in job.files:
            text = text.replace(f["disk"], f["name"])
        return text.replace(str(job.dir), "upload") if job.dir else text

    def run(self, job: Job) -> str:
        """Write the job's report; returns its final state ("done" or "error"), which work() sets."""
        job.state = "running"
        by_disk = {f["disk"]: f for f in job.files}

        def progress(stage, done, total, info):
            job.progress = {"stage": stage, "done": done, "total": total}
            if info.get("reason") and info["file"] in by_disk:
                by_disk[info["file"]]["reason"] = self.shown(info["reason"], job)

        try:
            if job.rewrites is not None:
                out = self.reporter.report(embedding=job.prefix, findings=job.findings, progress=progress)
                result = rewritten(out.result, job.rewrites)
            else:
                videos = [f["disk"] for f in job.files if not f.get("reason")]
                if job.files and not videos:
                    raise ReportError("no usable echo video in this study: " +
                                      few_reasons([(f["name"], f["reason"]) for f in job.files]))
                out = self.reporter.report(videos=videos or None, study=job.study, conditioning=job.conditioning,
                                           video_batch=self.video_batch, allow_synthetic_model=self.allow,
                                           progress=progress, findings=job.findings)
                progress("writing", 0, 1, {})
                for i, (v, clip) in enumerate(zip(out.result["videos"], out.clips if out.clips is not None else [])):
                    f = by_disk[v["file"]]
                    f.update(view=v["view"], confidence=v["view_confidence"],
                             preview=f"/api/jobs/{job.id}/preview/{i}.jpg")
                    job.previews[i] = web.clip_sprite(clip)
                result = out.result
                for v in result["videos"] + result["skipped"]:
                    v["file"] = by_disk[v["file"]]["name"]
                if "videos" in result["provenance"]["input"]:
                    result["provenance"]["input"]["videos"] = [v["file"] for v in result["videos"]]
            job.prefix, job.result, job.page = out.prefix, result, self.page_of(result)
            return "done"
        except ReportError as e:
            job.error = self.shown(str(e), job)
        except Exception as e:  # never a 500 page: the message goes to the page, the traceback to the log
            log.exception("report for request %s failed", job.id)
            job.error = (f"the report could not be written ({type(e).__name__}: {self.shown(str(e), job)}); "
                         "the server's log has the details")
        return "error"

    def page_of(self, result: dict) -> dict:
        """What the page draws: report lines with the phrases behind findings, findings beside the reference's."""
        reference = result["reference_report"]
        ref = extract_labels(reference) if reference is not None else None
        findings = []
        for t in TRAITS:
            a = result["findings"][t]
            row = {"trait": t, "value": a}
            if ref is not None:
                b = ref[t]
                # a number agrees within 5 (EF points, mmHg): the spread of repeated clinical measurements
                row["reference"] = b
                row["agree"] = a == b if TRAITS[t] == "binary" else (a is None) == (b is None) and (a is None or abs(a - b) <= 5)
            findings.append(row)
        snapped, inp = result["snapped_to"], result["provenance"]["input"]
        if snapped is not None:
            text = (f"snap: conditioned on training study {snapped['train_study']}, the nearest to the clips (cosine "
                    f"{snapped['cosine']:.3f}; held-out studies' 1st percentile {snapped['far_threshold']})")
        elif result["conditioning"] == "direct":
            text = "direct: the normalised mean of the clips' embeddings is the model's prefix"
        elif "test_study" in inp:
            text = f"test study {inp['test_study']} of the run's dataset: its own embeddings are the prefix"
        else:
            text = "the given embedding is the prefix"
        return {**{k: result[k] for k in ("warnings", "seconds", "conditioning", "findings_prompt")},
                "findings": findings, "conditioning_text": text, "lines": evidence(result["report"]),
                "reference_lines": evidence(reference) if reference is not None else None}


def rewritten(result: dict, first: dict) -> dict:
    """A rewrite's result: its own report and findings, and the study as the first request described it (the
    clips and their views, the snap, the reference report, the warnings), since the rewrite was given only the
    embedding rows. Its own warnings are a subset of the first's: the same model, and no videos to warn about."""
    kept = {k: v for k, v in first["provenance"].items() if k in ("input", "dataset_source")}
    return {**result, **{k: first[k] for k in STUDY_FIELDS}, "provenance": {**result["provenance"], **kept}}


def make_app(reporter: Reporter, runs_dir: Path, current_run: Path, max_upload_mb: float,
             allow_synthetic_model: bool = False, video_batch: int = 8, host: str = "127.0.0.1") -> FastAPI:
    """host: the address it listens on; only requests for it (and the loopback names) are answered."""
    limit = int(max_upload_mb * (1 << 20))
    service = Service(reporter, allow_synthetic_model, video_batch)
    runs_dir = runs_dir.resolve()

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.stop()

    app = FastAPI(title="echovlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(HostGuard, host=host)
    missing = f"no such request (the server keeps the last {KEEP_JOBS}; it forgets them when restarted)"

    def info() -> dict:
        try:
            ds = reporter.dataset("the test studies")
            source, tests = ds.meta.get("source"), ds.studies("test")
        except ReportError as e:
            source, tests = f"unknown ({e})", []
        warnings = []
        if source not in VIDEO_SOURCES:
            warnings.append(f"This model was trained on {source} data, not on EchoPrime video embeddings: "
                            + ("reports for uploaded videos are written (--allow-synthetic-model) but are not about them."
                               if allow_synthetic_model else "uploaded videos are refused; test studies work."))
        return {"run_name": current_run.name, "step": reporter.info["step"], "val_bpb": reporter.info["val_bpb"],
                "dataset_source": source, "test_studies": tests, "warnings": warnings,
                "max_upload_mb": max_upload_mb, "value_ranges": VALUE_RANGES}

    def runs() -> dict[str, Path]:
        found = {}
        for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []:
            if any((d / f).exists() for f in ("report.md", "steps.tsv", "model", "checkpoints")):
                found[d.name] = d
        if current_run.resolve().parent == runs_dir:
            found.setdefault(current_run.name, current_run)
        return found

    @app.get("/", response_class=HTMLResponse)
    def page():
        return web.PAGE

    @app.get("/api/info")
    def get_info():
        return info()

    @app.post("/api/jobs")
    async def create_job(request: Request):
        too_big = (f"the upload is larger than the server's limit of {max_upload_mb:g} MB; send fewer files or restart "
                   "the server with a larger --max-upload-mb")
        try:
            if int(request.headers.get("content-length") or 0) > limit + CHUNK:  # + the form's own bytes
                return error(too_big, 413)
        except ValueError:
            return error("a malformed Content-Length header", 400)
        received = 0

        async def counted():
            # a chunked upload has no Content-Length: count while the body streams in and stop reading as soon
            # as it is over, which also makes the form parser close (and so delete) its temporary files
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > limit + CHUNK:  # + the form's own bytes
                raise TooBig
            return message

        try:
            form = await Request(request.scope, counted).form(max_files=MAX_FILES)
        except TooBig:
            return error(too_big, 413)
        except Exception as e:  # not multipart, too many files, a broken body
            return error(f"the upload could not be read as a form ({e}); send the files as multipart/form-data", 400)
        try:
            for field, what in FIELDS.items():
                if any(isinstance(v, UploadFile) for v in form.getlist(field)):
                    return error(f"{field} must be {what}, not a file; send the videos in the field 'files'", 400)
            findings = form.getlist("finding")
            try:
                reporter.overrides(findings)  # a bad one is refused now, not after an upload or a wait in the queue
            except ReportError as e:
                return error(str(e), 400)
            conditioning = form.get("conditioning") or "snap"
            if conditioning not in ("snap", "direct"):
                return error(f"conditioning must be snap or direct, got {conditioning!r}", 400)
            uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
            study, rewrite = form.get("study"), form.get("rewrite")
            if [study is not None, bool(uploads), rewrite is not None].count(True) != 1:
                return error("send either files (DICOM, AVI, MP4), a test study number or the id of a request to "
                             "rewrite: one of them", 400)
            if rewrite is not None:
                parent = service.jobs.get(rewrite)
                if parent is None or parent.state != "done":
                    return error(f"rewrite {rewrite[:40]!r}: " + (missing if parent is None else
                                                                  "that request has no report (yet) to rewrite"), 400)
                if "conditioning" in form:
                    return error("a rewrite keeps the conditioning of the report it rewrites; send none", 400)
                job = Job(findings=findings)
                job.rewriting(parent)
            elif study is not None:
                try:
                    study = int(study)
                except ValueError:
                    return error(f"the test study must be a number, got {study!r}", 400)
                job = Job(study=study, conditioning=conditioning, findings=findings)
            else:
                job = Job(conditioning=conditioning, findings=findings)
                job.dir = Path(tempfile.mkdtemp(prefix="echovlm-serve-"))
                total = 0
                for i, up in enumerate(uploads):
                    name = display_name(upload_name(up), i)
                    suffix = Path(name.replace("\\", "/").split("/")[-1]).suffix.lower()
                    disk = job.dir / f"{i:04d}{suffix if suffix in SUFFIXES else ''}"
                    size = 0
                    with open(disk, "wb") as out:
                        while chunk := await up.read(CHUNK):
                            size += len(chunk)
                            total += len(chunk)
                            if total > limit:
                                shutil.rmtree(job.dir, ignore_errors=True)
                                return error(too_big, 413)
                            out.write(chunk)
                    f = {"name": name, "disk": str(disk)}
                    if size == 0:
                        f["reason"] = "an empty file (0 bytes)"
                    job.files.append(f)
        finally:
            await form.close()
        service.submit(job)
        return {"id": job.id, "ahead": service.ahead(job)}

    def job_of(job_id: str) -> Job | None:
        return service.jobs.get(job_id)

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str):
        job = job_of(job_id)
        return job.public(service.ahead(job)) if job else error(missing, 404)

    @app.get("/api/jobs/{job_id}/preview/{index}.jpg")
    def get_preview(job_id: str, index: int):
        job = job_of(job_id)
        if job is None or index not in job.previews:
            return error("no such preview", 404)
        return Response(job.previews[index], media_type="image/jpeg")

    @app.get("/api/jobs/{job_id}/report.{kind}")
    def download(job_id: str, kind: str):
        job = job_of(job_id)
        if job is None or job.result is None or kind not in ("json", "md"):
            return error(missing if job is None else "no report (yet) for this request", 404)
        headers = {"Content-Disposition": f'attachment; filename="report.{kind}"'}
        if kind == "json":
            return JSONResponse(job.result, headers=headers)
        return Response(markdown(job.result), media_type="text/markdown", headers=headers)

    @app.get("/api/runs")
    def list_runs():
        return {"runs_dir": str(runs_dir), "current": current_run.name,
                "runs": [{"name": n, "has_card": (d / "report.md").is_file()} for n, d in runs().items()]}

    @app.get("/api/runs/{name}/card")
    def run_card(name: str):
        run = runs().get(name)
        if run is None:
            return error(f"no run named {name!r} under {runs_dir}", 404)
        card = run / "report.md"
        md = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else build_card(run)
        return {"html": web.markdown_html(md, lambda rel: f"/api/runs/{quote(name)}/files/{quote(rel)}")}

    @app.get("/api/runs/{name}/files/{rel:path}")
    def run_file(name: str, rel: str):
        run = runs().get(name)
        path = (run / rel).resolve() if run is not None else None
        if path is None or not path.is_relative_to(run.resolve()) or path.suffix != ".png" or not path.is_file():
            return error("no such image", 404)
        return FileResponse(path, media_type="image/png")

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run directory (or a checkpoint .pt file)")
    p.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint to load")
    p.add_argument("--echoprime-dir", default="../EchoPrime", help="EchoPrime checkout with model_data/weights")
    p.add_argument("--runs-dir", help="the runs the run page lists (default: the folder holding --run's run)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=1024, help="largest study upload accepted, in MB")
    p.add_argument("--allow-synthetic-model", action="store_true",
                   help="report on videos with a model not trained on EchoPrime embeddings (the page says so)")
    p.add_argument("--video-batch", type=int, default=None,
                   help="clips per encoder pass (default: 8 on a GPU; 1 on a CPU, where batching gains nothing)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        fail("serve", f"--port must be 0-65535, got {args.port}")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):  # before the model loads: seconds
        fail("serve", f"--max-upload-mb must be a finite number of MB > 0, got {args.max_upload_mb}")
    if args.video_batch is not None and args.video_batch < 1:
        fail("serve", f"--video-batch must be >= 1, got {args.video_batch}")
    try:
        device = torch.device(autodetect_device(args.device))
        reporter = Reporter(args.run, which=args.which, device=device, echoprime_dir=args.echoprime_dir)
        try:
            reporter.load_video_models()
        except ReportError as e:  # test studies still work; an upload shows this message
            print0(f"serve: videos cannot be reported on until this is fixed: {e}")
    except ReportError as e:
        fail("serve", str(e), e.code)
    except RuntimeError as e:
        fail("serve", str(e))
    except KeyboardInterrupt:
        print0("serve: stopped while loading the model")
        return 130
    root = run_root(Path(args.run))
    runs_dir = Path(args.runs_dir) if args.runs_dir else root.parent
    batch = args.video_batch or (8 if device.type == "cuda" else 1)
    app = make_app(reporter, runs_dir, root, args.max_upload_mb, args.allow_synthetic_model, batch, args.host)
    print0(f"serving {root.name} on http://{args.host}:{args.port} (Ctrl-C stops)")
    # uvicorn turns Ctrl-C / SIGTERM into a graceful shutdown, which runs the app's lifespan end (temp dirs go)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    print0("serve: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
