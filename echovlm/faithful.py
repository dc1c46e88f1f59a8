"""Reports that state what was decided: the findings-prompted report, checked and repaired by the evaluator.

The GPT reads the decided findings in its prefix (echovlm.gpt) but, trained for minutes, does not always write
them: greedy decoding picks each token's mode, and "There is no pericardial effusion." is one string where a
present effusion is spread over many wordings ("a small ...", "Moderate circumferential ..."), so an absent
wording can win even when the prompt says present. And it reads a value embedding but writes digits, which it
learns late: most stated LVEFs land near, not at, the prompted value. Both are checked with the evaluator the
findings were decided by (`label`: echovlm.clinical's rules or EchoPrime's), treated as a black box, so the
same code serves any rule set:

1. Values: where the report states LVEF or PASP away from the prompted value, the number the evaluator read is
   rewritten to the decided one in the GPT's own sentence (a range "50-55%" keeps its width, centred on it).
   A rewrite is kept only if the evaluator then reads the decided value, every other label is unchanged and
   the report does not contradict itself more than before.
2. Findings: where the report still misstates its prompt (or contradicts itself, echovlm.consistency), the
   GPT writes sampled drafts of the same study and prompt, and the report is assembled section by section
   ("Section: ..." lines, the layout of both the synthetic reports and EchoPrime's): starting from the draft
   that misstates least, each section is replaced by another draft's version of it where that lowers the
   misstatements + contradictions of the whole report. Every sentence is still the GPT's, written for this
   study and prompt; sections make the search per section instead of per report (a report with 3 of 15
   sections wrong in one draft and the others right in another is repaired, where picking whole drafts would
   need one draft with all 15 right). Drafts come in rounds, more for the reports still wrong after a round.

fidelity() measures the result: the share of prompted findings the final report states as prompted.
"""

import re
from collections import defaultdict

import numpy as np

from echovlm.consistency import contradictions
from echovlm.gpt import PRESENT, UNKNOWN
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, SECTIONS

NB = len(BINARY_TRAITS)
CONTRADICTION = 100  # the cost of one contradiction, above any number of misstated findings (25 at most)
TOLERANCE = 2.0  # a stated value within this of the prompted one states it (LVEF points, PASP mmHg)
HEADER = re.compile(r"^\s*(" + "|".join(re.escape(s) for s in SECTIONS) + r")\s*:", re.IGNORECASE)
# a number or a range of two, not part of a longer number ("1.2" is one number, "50-55" one range)
NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?:(\s*(?:-|–|to)\s*)(\d+(?:\.\d+)?))?(?![\d.]*\d)")


def states(labels: dict, trait: str, used: float, tolerance: float = TOLERANCE) -> bool:
    """Whether a report's extracted labels state one prompted finding: the same 0/1, or a value within tolerance."""
    if trait in BINARY_TRAITS:
        return labels.get(trait) == used
    return labels.get(trait) is not None and abs(labels[trait] - used) <= tolerance


def misstated(labels: dict, codes: np.ndarray, values: np.ndarray, tolerance: float = TOLERANCE) -> int:
    """How many prompted findings one report's extracted labels (extract_labels) do not state as prompted."""
    wrong = sum(not states(labels, t, int(codes[j] == PRESENT), tolerance)
                for j, t in enumerate(BINARY_TRAITS) if codes[j] != UNKNOWN)
    return wrong + sum(not states(labels, t, values[j], tolerance)
                       for j, t in enumerate(CONTINUOUS_TRAITS) if codes[NB + j] != UNKNOWN)


def fidelity(labels: list[dict], codes: np.ndarray, values: np.ndarray, tolerance: float = TOLERANCE) -> dict:
    """How faithfully reports state their prompts: the share of prompted (study, binary finding) pairs whose
    extracted label equals the prompt, and per value the share of reports stating it within `tolerance`."""
    out = {"tolerance": tolerance}
    agree = [labels[i].get(t) == (1 if codes[i, j] == PRESENT else 0)
             for i in range(len(labels)) for j, t in enumerate(BINARY_TRAITS) if codes[i, j] != UNKNOWN]
    out["findings"] = {"pairs": len(agree), "agree": float(np.mean(agree)) if agree else None}
    for j, t in enumerate(CONTINUOUS_TRAITS):
        rows = [i for i in range(len(labels)) if codes[i, NB + j] != UNKNOWN]
        diff = [abs(labels[i][t] - values[i, j]) if labels[i].get(t) is not None else np.inf for i in rows]
        out[t] = {"reports": len(rows), "within": float(np.mean(np.array(diff) <= tolerance)) if rows else None,
                  "not_stated": int(np.sum(np.isinf(diff)))}
    return out


def _written(value: float, like: str) -> str:
    """value written as the report wrote the number it replaces: with one decimal if that had a point."""
    return f"{value:.1f}" if "." in like else str(int(round(value)))


def set_values(text: str, codes: np.ndarray, values: np.ndarray, label, tolerance: float = TOLERANCE) -> str:
    """text with each prompted value it states away from the prompt rewritten to the prompted one, where the
    evaluator `label` (one text -> its labels) then reads it, nothing else changes and no contradiction is added
    (an LVEF of 42% set in a report that calls the function normal: the misstated value costs less, as in
    cost_of); else text as it was."""
    labels, n_contradictions = label(text), None
    for j, trait in enumerate(CONTINUOUS_TRAITS):
        want = float(values[j])
        if codes[NB + j] == UNKNOWN or labels[trait] is None or abs(labels[trait] - want) <= tolerance:
            continue
        for m in NUMBER.finditer(text):  # which number the evaluator read is its own business: try each
            if m.group(3):
                width = float(m.group(3)) - float(m.group(1))
                lo = round(want - width / 2)
                new = _written(lo, m.group(1)) + m.group(2) + _written(lo + width, m.group(3))
            else:
                new = _written(want, m.group(1))
            candidate = text[:m.start()] + new + text[m.end():]
            got = label(candidate)
            if (got[trait] is not None and abs(got[trait] - want) <= tolerance
                    and all(got[t] == labels[t] for t in labels if t != trait)):
                if n_contradictions is None:  # checked only once a rewrite is on the table: most reports need none
                    n_contradictions = len(contradictions(text))
                if len(contradictions(candidate)) <= n_contradictions:
                    text, labels = candidate, got
                break
    return text


def sections(text: str) -> list[tuple[str, str]]:
    """(section name lower-cased, its lines) in order; lines before the first header belong to section ''."""
    out: list[list[str]] = []
    for line in text.split("\n"):
        m = HEADER.match(line)
        if m or not out:
            out.append([m.group(1).lower() if m else "", line])
        else:
            out[-1][1] += "\n" + line
    return [(name, body) for name, body in out]


def cost_of(text: str, labels: dict, codes: np.ndarray, values: np.ndarray, below: float = np.inf) -> int:
    """What a report is scored by while it is repaired: its misstated prompted findings, and its contradictions
    each counted as more than every finding could be (a report that contradicts itself is never traded for one
    that states one more finding: a user reads the contradiction, the evaluator may not see the misstatement).
    A report whose misstatements alone reach `below` gets just their count: it cannot win, and the
    contradiction check is half the cost of a trial."""
    wrong = misstated(labels, codes, values)
    return wrong if wrong >= below else wrong + CONTRADICTION * len(contradictions(text))


def assemble(drafts: list[str], codes: np.ndarray, values: np.ndarray, label) -> tuple[str, int]:
    """(report, its cost) from drafts of one study's report: the draft with the lowest cost (cost_of; the first
    on a tie), then each of its sections in turn replaced by another draft's version of that section wherever
    the whole report's cost goes down. A section written twice in one
    draft counts as one version (its lines together), so a repeated section is repaired like any other."""
    def cost(text, below=np.inf):
        return cost_of(text, label(text), codes, values, below)

    versions: dict[str, list[str]] = defaultdict(list)
    for d in drafts:
        grouped: dict[str, list[str]] = defaultdict(list)
        for name, body in sections(d):
            grouped[name].append(body)
        for name, bodies in grouped.items():
            body = "\n".join(bodies)
            if body not in versions[name]:
                versions[name].append(body)
    costs = [cost(d) for d in drafts]
    best = int(np.argmin(costs))
    parts: dict[str, str] = {}
    for name, body in sections(drafts[best]):
        parts[name] = parts[name] + "\n" + body if name in parts else body
    current = costs[best]
    for name in list(parts):
        for body in versions[name]:
            if current == 0:
                return "\n".join(parts.values()), 0
            if body == parts[name]:
                continue
            trial = {**parts, name: body}
            c = cost("\n".join(trial.values()), below=current)
            if c < current:
                parts, current = trial, c
    return "\n".join(parts.values()), current


def prompted_reports(engine, embeddings, codes: np.ndarray, values: np.ndarray, label, retries: int = 4,
                     temperature: float = 1.0, seed: int = 0, **generate) -> tuple[list[str], list[dict], int]:
    """(texts, their labels, reports generated) for each study's prompt: the greedy report with its values set
    (set_values); where it still misstates its prompt or contradicts itself, `retries` sampled drafts and the
    report assembled from them (assemble), then 3 x `retries` more drafts for the reports still wrong.
    retries 0: the greedy report with its values set. label(list of texts) -> list of label dicts is the
    evaluator the prompt was decided with."""
    def one(text):
        return label([text])[0]

    texts = [s[0] for s in engine.generate_text(embeddings, prompts=(codes, values), temperature=0.0, **generate)]
    texts = [set_values(t, codes[i], values[i], one) for i, t in enumerate(texts)]
    generated = len(texts)
    drafts: list[list[str]] = [[] for _ in texts]  # each study's sampled drafts, every round's together
    cost = np.array([cost_of(t, one(t), codes[i], values[i]) for i, t in enumerate(texts)])
    for round_, n in enumerate((retries, 3 * retries) if retries > 0 else ()):
        redo = np.flatnonzero(cost > 0)
        if not len(redo):
            break
        sampled = engine.generate_text([embeddings[i] for i in redo], prompts=(codes[redo], values[redo]),
                                       temperature=temperature, num_samples=n, seed=seed + round_,
                                       **generate)
        generated += len(redo) * n
        for i, new in zip(redo, sampled):
            drafts[i] += [set_values(t, codes[i], values[i], one) for t in new]
            # the report so far comes first: it is kept unless the new drafts lower its cost
            texts[i], cost[i] = assemble([texts[i]] + drafts[i], codes[i], values[i], one)
    return texts, label(texts), generated
