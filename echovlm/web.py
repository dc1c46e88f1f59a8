"""What scripts.serve shows in a browser: the one HTML page, report cards as HTML, clip previews.

The page is self-contained (inline CSS and JS, no CDN, no fonts, no internet: it must work inside a hospital
network). It talks to the server's /api endpoints only, and never sends a server path: a study is uploaded
bytes, a test-split index or the id of a request to rewrite, a run is a name from the server's own list.

Below a report, the findings it was written from (the findings head's decisions and probabilities) can be
changed and the report rewritten: the page sends the findings the user set, the server writes the same study
again with them, and the new report's panel marks them as the user's.
"""

import html
import re

import cv2
import numpy as np

from echovlm import video

PREVIEW = 112  # pixels per preview frame: half the encoder's 224


def clip_sprite(clip) -> bytes:
    """A preprocessed (3, 16, 224, 224) clip as one JPEG strip of its 16 frames, as the encoder saw them.

    Undoes only the normalisation, so the crop, the sector mask and the zero-padding of short videos (which
    shows as the dataset's mean grey) are what they were at the encoder's input.
    """
    x = clip.numpy() * np.array(video.STD, np.float32)[:, None, None, None] + np.array(video.MEAN, np.float32)[:, None, None, None]
    frames = np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 3, 0)  # (16, 224, 224, RGB)
    strip = np.concatenate([cv2.resize(f, (PREVIEW, PREVIEW), interpolation=cv2.INTER_AREA) for f in frames], axis=1)
    _, data = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return data.tobytes()


def _inline(text: str, image_url) -> str:
    """Escaped text with markdown images, `code` and **bold**."""
    out, last = [], 0
    # bounded alt text and path: an unbounded [^\]]* rescans to the end from every "![" (quadratic on "![![![...")
    for m in re.finditer(r"!\[([^\]\n]{0,300})\]\(([^)\s]{1,1000})\)", text):
        out.append(_emphasis(text[last:m.start()]))
        out.append(f'<img alt="{html.escape(m.group(1))}" src="{html.escape(image_url(m.group(2)))}">')
        last = m.end()
    out.append(_emphasis(text[last:]))
    return "".join(out)


def _emphasis(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_html(md: str, image_url) -> str:
    """The markdown the report card is written in (headings, tables, lists, code blocks, images, paragraphs)
    as HTML; image_url(relative path) -> the URL the page fetches it from."""
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
        elif m := re.match(r"(#{1,4})\s+(.*)", line):
            level = len(m.group(1))
            out.append(f"<h{level + 1}>{_inline(m.group(2), image_url)}</h{level + 1}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            if not rows:  # only separator lines: nothing to show (and no header row to index)
                continue
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c, image_url)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c, image_url)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
        elif re.match(r"\s*[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*] ", lines[i]):
                items.append("<li>" + _inline(re.sub(r"^\s*[-*] ", "", lines[i]), image_url) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif line.strip():
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(```|#|\||\s*[-*] )", lines[i]):
                para.append(lines[i])
                i += 1
            out.append("<p>" + _inline(" ".join(para), image_url) + "</p>")
        else:
            i += 1
    return "\n".join(out)


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>echovlm</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:center}
header b{font-size:17px} header a{color:#cfd8e6;text-decoration:none} header a.on{color:#fff;border-bottom:2px solid #6cb4ff}
main{padding:16px 20px;max-width:1200px} .muted{color:#667085} .err{color:#b42318}
.box{background:#fff;border:1px solid #d9dee7;border-radius:8px;padding:14px;margin:0 0 14px}
#drop{border:2px dashed #9aa7bb;border-radius:8px;padding:22px;text-align:center;background:#fff}
#drop.over{background:#eaf3ff;border-color:#2f80ed}
button{background:#2f80ed;color:#fff;border:0;border-radius:6px;padding:7px 14px;font:inherit;cursor:pointer}
button:disabled{background:#9aa7bb} select,input{font:inherit}
.warn{background:#fef3f2;border:1px solid #fda29b;color:#912018;padding:8px 12px;border-radius:6px;margin:0 0 10px;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d9dee7;border-radius:8px;padding:8px;width:180px}
.card.bad{border-color:#fda29b;background:#fffbfa}
.clip{width:112px;height:112px;margin:0 auto 6px;animation:play 1.6s steps(16) infinite;background-repeat:no-repeat}
@keyframes play{from{background-position:0 0}to{background-position:-1792px 0}}
.name{font-weight:600;word-break:break-all} .view{color:#175cd3;font-weight:600}
.cols{display:flex;gap:14px;flex-wrap:wrap} .cols>div{flex:1;min-width:320px}
.report p{margin:0 0 4px} mark{background:#fff1b8;border-radius:3px;padding:0 1px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #d9dee7;padding:3px 8px;text-align:left}
th{background:#eef1f6} td.no{background:#fef3f2} td.yes{background:#ecfdf3}
pre{background:#f2f4f7;padding:8px;white-space:pre-wrap} img{max-width:100%}
#runlist li.cur{font-weight:600} progress{width:300px}
.bar{display:inline-block;width:60px;height:8px;background:#eef1f6;border-radius:4px;vertical-align:middle}
.bar i{display:block;height:100%;background:#2f80ed;border-radius:4px}
#prompt input[type=number]{width:70px} .you{color:#6941c6;font-weight:600} tr.user td:first-child{border-left:4px solid #6941c6}
tr.unstated td{background:#fffaeb} tr.changed td.from::after{content:" → yours on rewrite";color:#6941c6}
</style></head>
<body>
<header><b>echovlm</b><a href="#study" id="tab-study">Study</a><a href="#runs" id="tab-runs">Runs</a>
<span class="muted" id="model"></span></header>
<main>
<section id="page-study">
 <div id="banner"></div>
 <div class="box">
  <div id="drop">Drop DICOM / AVI / MP4 files or a folder here, or
   <input type="file" id="files" multiple> <label>a folder: <input type="file" id="folder" webkitdirectory multiple></label>
   <div class="muted" id="chosen">no files chosen</div>
   <button id="go" disabled>Write report</button></div>
  <p>or a study of the test split of the model's dataset: <select id="study"></select>
   <button id="go-study">Write report for this test study</button>
   &nbsp; conditioning <select id="conditioning"><option>snap</option><option>direct</option></select></p>
  <p class="muted" id="limits"></p>
 </div>
 <div class="box" id="status" hidden></div>
 <div id="result"></div>
</section>
<section id="page-runs" hidden>
 <div class="box"><b>Runs</b> <span class="muted" id="runsdir"></span><ul id="runlist"></ul></div>
 <div class="box" id="card"></div>
</section>
</main>
<script>
const $ = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
let info = null, picked = [], shown = null;  // shown: the finished request on the page, what a rewrite rewrites

async function api(path, opts) {
  const r = await fetch(path, opts);
  let body; try { body = await r.json(); } catch (e) { body = {error: r.status + " " + r.statusText}; }
  if (!r.ok) throw new Error(body.error || body.detail || r.statusText);
  return body;
}

function route() {
  const runs = location.hash.startsWith("#runs");
  $("page-study").hidden = runs; $("page-runs").hidden = !runs;
  $("tab-study").className = runs ? "" : "on"; $("tab-runs").className = runs ? "on" : "";
  if (runs) showRuns(decodeURIComponent(location.hash.slice(6)) || (info && info.run_name));
}
window.addEventListener("hashchange", route);

async function start() {
  info = await api("/api/info");
  $("model").textContent = `model ${info.run_name} (step ${info.step}, trained on ${info.dataset_source} data)`;
  $("banner").innerHTML = info.warnings.map(w => `<div class="warn">${esc(w)}</div>`).join("");
  $("study").innerHTML = info.test_studies.map((s, i) => `<option value="${i}">${i}: ${esc(s)}</option>`).join("");
  $("go-study").disabled = !info.test_studies.length;
  $("limits").textContent = `Uploads up to ${info.max_upload_mb} MB per study. One model serves one request at a time; ` +
    `requests wait in the order they arrive.`;
  route();
}

function choose(list) {
  picked = Array.from(list).filter(f => !f.name.startsWith("."));
  $("chosen").textContent = picked.length ? picked.map(f => f.webkitRelativePath || f.name).join(", ") : "no files chosen";
  $("go").disabled = !picked.length;
}
$("files").onchange = e => choose(e.target.files);
$("folder").onchange = e => choose(e.target.files);
const drop = $("drop");
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = async e => {
  e.preventDefault(); drop.classList.remove("over");
  const files = [], walk = async entry => {
    if (entry.isFile) files.push(await new Promise((ok, no) => entry.file(ok, no)));
    else if (entry.isDirectory) {
      const reader = entry.createReader(); let batch;
      do { batch = await new Promise((ok, no) => reader.readEntries(ok, no)); for (const x of batch) await walk(x); }
      while (batch.length);
    }
  };
  const entries = Array.from(e.dataTransfer.items).map(i => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (entries.length) { for (const x of entries) await walk(x); choose(files); } else choose(e.dataTransfer.files);
};

// the report on the page stays until the server takes the request: a refused rewrite keeps the user's edits
async function submit(form) {
  $("go").disabled = $("go-study").disabled = true;
  if ($("rewrite")) $("rewrite").disabled = true;
  setStatus(form.has("files") ? "uploading..." : "sending...");
  try { const job = await api("/api/jobs", {method: "POST", body: form}); $("result").innerHTML = ""; poll(job.id); }
  catch (e) { setStatus(`<span class="err" id="error">${esc(e.message)}</span>`); done(); }
}
function fresh() { const f = new FormData(); f.append("conditioning", $("conditioning").value); return f; }
$("go").onclick = () => { const f = fresh(); picked.forEach(x => f.append("files", x, x.webkitRelativePath || x.name)); submit(f); };
$("go-study").onclick = () => { const f = fresh(); f.append("study", $("study").value); submit(f); };
function done() {
  $("go").disabled = !picked.length; $("go-study").disabled = !(info && info.test_studies.length);
  if ($("rewrite")) $("rewrite").disabled = false;
}
function setStatus(h) { $("status").hidden = false; $("status").innerHTML = h; }

const STAGES = {decoding: "decoding videos", encoding: "encoding clips", generating: "writing the report", writing: "preparing the page"};
async function poll(id) {
  let job;
  try { job = await api(`/api/jobs/${id}`); } catch (e) { setStatus(`<span class="err">${esc(e.message)}</span>`); return done(); }
  if (job.state === "queued") {
    setStatus(`waiting: ${job.ahead} request(s) ahead of yours (one model serves requests in the order they arrive)`);
  } else if (job.state === "running") {
    const p = job.progress;
    setStatus(`${esc(STAGES[p.stage] || "starting")} ${p.total ? `${p.done}/${p.total}` : ""} <progress value="${p.done}" max="${p.total || 1}"></progress>`);
  }
  if (job.state === "done" || job.state === "error") { render(job); return done(); }
  setTimeout(() => poll(id), 300);
}

function line(parts) {
  return "<p>" + parts.map(([text, traits]) => traits.length ? `<mark title="${esc(traits.join(", "))}">${esc(text)}</mark>` : esc(text)).join(" ") + "</p>";
}

function render(job) {
  const r = job.result, files = job.files;
  let h = "";
  shown = job.state === "done" ? job : null;
  if (job.state === "error") {
    setStatus(`<span class="err" id="error">${esc(job.error)}</span>`);
    h += `<div class="cards">${files.map(f => card(f)).join("")}</div>`;
    $("result").innerHTML = h; return;
  }
  setStatus(`done in ${r.seconds.toFixed(1)} s &middot; <a href="/api/jobs/${job.id}/report.json" download>report.json</a> &middot; <a href="/api/jobs/${job.id}/report.md" download>report.md</a>`);
  h += r.warnings.map(w => `<div class="warn">${esc(w)}</div>`).join("");
  if (files.length) h += `<div class="box"><b>Clips</b><div class="cards" id="cards">${files.map(f => card(f)).join("")}</div></div>`;
  h += `<div class="box muted" id="conditioning-used">${esc(r.conditioning_text)}</div>`;
  h += `<div class="cols"><div class="box report" id="report"><b>Generated report</b>${r.lines.map(line).join("")}</div>`;
  if (r.reference_lines) h += `<div class="box report" id="reference"><b>Reference report</b>${r.reference_lines.map(line).join("")}</div>`;
  h += `</div><div class="box"><b>Findings</b> <span class="muted">(what the clinical evaluator reads in the report; highlighted above)</span>` +
    `<table id="findings"><tr><th>finding</th><th>generated</th>${r.reference_lines ? "<th>reference</th>" : ""}</tr>` +
    r.findings.map(f => `<tr><td>${esc(f.trait)}</td><td class="${f.agree === false ? "no" : f.agree ? "yes" : ""}">${esc(f.value)}</td>` +
      (r.reference_lines ? `<td>${esc(f.reference)}</td>` : "") + "</tr>").join("") + "</table></div>";
  h += promptPanel(r.findings_prompt);
  $("result").innerHTML = h;
}

// what the report was prompted with: the head's decisions, each editable; the findings the user set go back on a rewrite
function promptPanel(rows) {
  const title = "<b>Findings the report was written from</b> ";
  if (!rows) return `<div class="box" id="prompt">${title}<p class="muted" id="no-head">This model has no findings head: ` +
    "it writes free reports from the study's embeddings alone, so there are no findings to set. Setting findings and " +
    "rewriting the report needs a model retrained with scripts.base_train.</p></div>";
  return `<div class="box" id="prompt">${title}<span class="muted">(decided by the model's findings head from the ` +
    "study's embeddings, present above each finding's own threshold, set on the validation split; or set by you: " +
    "change any and rewrite the report; clear a number to leave it to the head)</span>" +
    `<table id="prompt-table"><tr><th>finding</th><th>head's probability</th><th>used</th><th>from</th><th>in the report</th></tr>` +
    rows.map(promptRow).join("") + `</table><button id="rewrite">Rewrite report</button></div>`;
}

function promptRow(r) {
  const off = r.used === null ? "disabled" : "", p = r.probability, t = esc(r.trait);
  const prob = p === null ? "" : `<span class="bar"><i style="width:${(100 * p).toFixed(0)}%"></i></span> ${(100 * p).toFixed(0)}%`;
  let control;
  if (r.kind === "binary") {
    control = `<label><input type="checkbox" data-trait="${t}" data-initial="${r.used ? 1 : 0}" ${r.used ? "checked" : ""} ${off}> present</label>`;
  } else {
    const [lo, hi] = info.value_ranges[r.trait] || ["", ""], v = r.used === null ? "" : +r.used.toFixed(1);
    control = `<input type="number" step="any" min="${lo}" max="${hi}" data-trait="${t}" data-initial="${v}" value="${v}" ${off}>`;
  }
  const from = r.source === "user" ? `<span class="you">edited by you</span>` : r.source === "head" ? "head" :
    `<span class="muted">unknown: the model's rules never define it</span>`;
  const said = r.stated === null ? "" : r.stated ? "stated" : `<span class="err">not stated as prompted</span>`;
  return `<tr data-trait="${t}" class="${r.source === "user" ? "user" : ""} ${r.stated === false ? "unstated" : ""}">` +
    `<td>${t}</td><td>${prob}</td><td>${control}</td><td class="from">${from}</td><td>${said}</td></tr>`;
}

const valueOf = x => x.type === "checkbox" ? (x.checked ? "1" : "0") : x.value.trim();
$("result").addEventListener("input", e => {
  const x = e.target;
  if (x.dataset.trait) x.closest("tr").classList.toggle("changed", valueOf(x) !== x.dataset.initial);
});
// a rewrite sends every finding the user set: changed now, or set on an earlier rewrite (still the user's)
$("result").addEventListener("click", e => {
  if (e.target.id !== "rewrite" || !shown) return;
  const f = new FormData();
  f.append("rewrite", shown.id);
  for (const x of document.querySelectorAll("#prompt-table input[data-trait]")) {
    const v = valueOf(x), mine = x.closest("tr").classList.contains("user");
    if (!x.disabled && v !== "" && (mine || v !== x.dataset.initial)) f.append("finding", `${x.dataset.trait}=${v}`);
  }
  submit(f);
});

function card(f) {
  if (f.reason) return `<div class="card bad"><div class="name">${esc(f.name)}</div><div class="err">skipped: ${esc(f.reason)}</div></div>`;
  if (!f.view) return `<div class="card"><div class="name">${esc(f.name)}</div><div class="muted">not processed</div></div>`;
  return `<div class="card clipcard"><div class="clip" style="background-image:url(${esc(f.preview)})"></div>` +
    `<div class="name">${esc(f.name)}</div><div class="view">${esc(f.view)}</div>` +
    `<div class="muted">view confidence ${(100 * f.confidence).toFixed(0)}%</div></div>`;
}

async function showRuns(name) {
  const runs = await api("/api/runs");
  $("runsdir").textContent = `under ${runs.runs_dir}`;
  $("runlist").innerHTML = runs.runs.map(r => `<li class="${r.name === name ? "cur" : ""}"><a href="#runs/${encodeURIComponent(r.name)}">${esc(r.name)}</a>` +
    ` <span class="muted">${r.has_card ? "" : "(no report card yet)"}</span></li>`).join("");
  if (!name) { $("card").innerHTML = ""; return; }
  try { $("card").innerHTML = (await api(`/api/runs/${encodeURIComponent(name)}/card`)).html; }
  catch (e) { $("card").innerHTML = `<span class="err">${esc(e.message)}</span>`; }
}
start().catch(e => setStatus(`<span class="err">${esc(e.message)}</span>`));
</script></body></html>
"""
