"""Contradictions one report holds about itself, each a named rule (no reference report needed).

A report can be wrong about a study (echovlm/scoring.py measures that against the reference) and also wrong
with itself: "LVEF 25%" beside "normal systolic function", "no mitral regurgitation" and later "severe mitral
regurgitation". The second kind needs no reference, so it can be counted on any report (the reference reports'
own rate is the floor a generator should reach) and penalised in a reward.

The report is cut into (section, sentence) pairs by the label extractor's own reader (echovlm.sentences),
then each sentence into clauses; a clause yields findings, each a structure's state as an interval of grades
0 none/normal, 0.5 trace, 1 mild, 1.5 mild to moderate, 2 moderate, 2.5 moderate to severe, 3 severe:
"no MR" is [0, 0], "no significant MR" [0, 1], "MR is present" [1, 3]. A finding is read as the clinical
extractor reads one: its structure named in the clause, else in the sentence, else the section's; negated
by a negation before it in its clause. A clause that hedges, compares or describes a prosthesis ("cannot
exclude", "previously", "residual", "paravalvular") gives nothing: it may rightly differ from the rest.

Rules (RULES), each tolerant by a whole grade or a band, so reports that merely round differently agree:

  ef_vs_function      an LVEF number outside what the stated LV systolic function allows (normal with
                      EF < 45, severely reduced with EF >= 40, ...)
  present_and_absent  one finding stated absent or normal and elsewhere present (mild or worse), or a
                      device / the bicuspid valve stated and denied
  conflicting_severity two grades a whole grade or more apart for one valve lesion, chamber, effusion or
                      ventricle's function (mild and moderate; not mild and mild to moderate)
  conflicting_values  two LVEFs more than 10 points apart, or two PA systolic pressures more than 15 mmHg
  impossible_value    LVEF outside 5-90 %, PA systolic pressure below 10 or above 150 mmHg (negative included)
  repeated_section    a section header twice

Speed matters (an RL reward calls this on thousands of reports): one prefilter per sentence, then a few
compiled regular expressions per clause; see tests/test_consistency.py for the throughput measured. Time grows
linearly with the report's length, however it repeats itself (tests/test_regex_linear.py).
"""

import bisect
import re
from dataclasses import dataclass

from echovlm.clinical import SECTIONS, VALUES
from echovlm.sentences import sentences


@dataclass(frozen=True)
class Contradiction:
    rule: str
    detail: str  # what disagrees, in words: "mitral regurgitation: absent vs moderate"
    sentences: tuple[str, ...]  # the (normalised) sentences involved, in report order


# ------------------------------------------------------------------ vocabulary

GRADE_WORDS = [  # compound phrases first, so "mild to moderate" is never read as "moderate"
    (r"moderate(?:ly)? (?:to )?(?:severe(?:ly)?|large)", 2.5),
    (r"mild(?:ly)? (?:to )?moderate(?:ly)?|small (?:to )?moderate", 1.5),
    (r"trace (?:to )?mild|minimal to mild", 0.75),
    (r"trace|trivial|minimal(?:ly)?|physiologic(?:al)?", 0.5),
    (r"mild(?:ly)?|small|slight(?:ly)?|1\+", 1.0),
    (r"moderate(?:ly)?|2\+", 2.0),
    (r"severe(?:ly)?|large|massive(?:ly)?|torrential|critical|marked(?:ly)?|[34]\+", 3.0),
]
# one lookbehind for all the alternatives, not one each: the same matches, scanned 3x faster
GRADE_RE = re.compile(r"(?<![\w+])(?:" + "|".join(rf"(?P<g{i}>{p})(?!\w)" for i, (p, _) in enumerate(GRADE_WORDS))
                      + ")")
GRADE_VALUE = [g for _, g in GRADE_WORDS]
NEGATION_RE = re.compile(r"\b(?:no|not|without|absent|negative for|absence of|free of|neither|nor|none)\b")
# a negation of significance caps the grade at mild: "no significant MR", "not more than mild"
CAP_RE = re.compile(r"\b(?:no|not|without)\s+(?:hemodynamically |haemodynamically |clinically )?"
                    r"(?:significant(?:ly)?|more than mild|greater than mild|worse than mild)\b|"
                    r"\bless than moderate\b|\bat most mild\b|\binsignificant\b")
NEGATED_AFTER_RE = re.compile(r"\s*(?:is |are |was |were |has been |have been )?(?:not (?:seen|present|identified|"
                              r"visuali[sz]ed|demonstrated|detected|appreciated|noted|observed)|absent|ruled out)\b")
# a clause that hedges, compares with another study or describes a repair may rightly differ from the rest
HEDGE_RE = re.compile(r"\b(?:cannot|can not|could not|unable|not well|poorly|suboptimal|possibl[ey]|probabl[ey]|"
                      r"likely|may|might|suspect(?:ed)?|questionable|versus|vs|exclude[sd]?|not assessed|"
                      r"not evaluated|inadequate|prior|previous(?:ly)?|compared|comparison|residual|para ?valvular|"
                      r"peri ?valvular|prosthe\w*|history|interval|changed?|since|improved|worse(?:ned)?|"
                      r"pre ?op\w*|post ?op\w*|baseline|at least|at most|up to|no more than|less than|"
                      r"greater than|more than)\b")
DEVICE_HEDGE_RE = re.compile(r"\b(?:cannot|can not|could not|unable|possibl[ey]|probabl[ey]|likely|may|might|"
                             r"suspect(?:ed)?|questionable|versus|vs|exclude[sd]?|removed|removal|explanted|"
                             r"extracted|prior to|before|planned|candidate|consider\w*|evaluat\w*)\b")
# clauses break at punctuation and conjunctions, but not at "and" inside a list of valves ("mitral and tricuspid")
CLAUSE_RE = re.compile(r"[,:;()]|\b(?:but|whereas|although|though|however|while|yet|with|which)\b|"
                       r"\band\b(?! (?:the )?(?:aortic|mitral|tricuspid|pulmonic|pulmonary valve|mr|tr|ar|ai|pr)\b)")

VALVES = {"aortic": r"\baortic\b(?! root| arch| sinus)|\bav\b", "mitral": r"\bmitral\b",
          "tricuspid": r"\btricuspid\b", "pulmonic": r"\bpulmonic\b|\bpulmonary valve\b"}
CHAMBERS = {"left ventricle": r"left ventric(?:le|ular)|\blv\b", "right ventricle": r"right ventric(?:le|ular)|\brv\b",
            "left atrium": r"left atri(?:um|al)|\bla\b", "right atrium": r"right atri(?:um|al)|\bra\b",
            "aortic root": r"aortic root|sinus(?:es)? of valsalva|\broot\b", "ivc": r"\bivc\b|inferior vena cava"}
VENTRICLES = {"left ventricle": CHAMBERS["left ventricle"], "right ventricle": CHAMBERS["right ventricle"]}
SECTION_STRUCTURE = {"left ventricle": "left ventricle", "resting segmental wall motion analysis": "left ventricle",
                     "right ventricle": "right ventricle", "left atrium": "left atrium", "right atrium": "right atrium",
                     "mitral valve": "mitral", "aortic valve": "aortic", "tricuspid valve": "tricuspid",
                     "pulmonic valve": "pulmonic", "pericardium": "pericardium", "aorta": "aortic root", "ivc": "ivc"}
ABBREVIATIONS = {"mr": "mitral", "tr": "tricuspid", "ar": "aortic", "ai": "aortic", "pr": "pulmonic"}
DEPRESSED_RE = re.compile(r"\b(?:depressed|reduced|decreased|impaired|diminished|abnormal|dysfunction)\b")
NORMAL_FUNCTION_RE = re.compile(r"\b(?:normal|preserved|within normal limits)\b")
HYPERDYNAMIC_RE = re.compile(r"\b(?:hyperdynamic|vigorous)\b")
NORMAL_SIZE_RE = re.compile(r"\bnormal(?:ly)? (?:in )?(?:size|sized|caliber|dimensions?)\b|"
                            r"\bsize (?:is )?(?:within )?normal\b|\bnormal(?: [\w']+){1,3}? (?:size|dimensions?)\b")


@dataclass(frozen=True)
class Kind:
    """One family of findings: the words that state it, the structures it belongs to, and what blocks a bare
    mention (a clause naming one of `blockers` is about that, not about the section's structure)."""

    noun: re.Pattern
    structures: dict[str, re.Pattern]
    blockers: re.Pattern | None
    label: str  # "{structure} {label}" names the finding


def _joined(d: dict[str, str]) -> dict[str, re.Pattern]:
    return {k: re.compile(v) for k, v in d.items()}


KINDS = {
    "stenosis": Kind(re.compile(r"\bsteno(?:sis|tic)\b"), _joined(VALVES),
                     re.compile(r"lvot|outflow|subaortic|subvalvular|supravalvular|pulmonary arter|branch|coronary|"
                                r"carotid|renal|\bvein"), "stenosis"),
    "regurgitation": Kind(re.compile(r"\b(?:regurgitation|regurgitant|insufficiency)\b|\b(?:mr|tr|ar|ai|pr)\b"),
                          _joined(VALVES), None, "regurgitation"),
    "dilation": Kind(re.compile(r"\b(?:dilated|enlarged|dilation|dilatation|enlargement)\b|" + NORMAL_SIZE_RE.pattern),
                     _joined(CHAMBERS), re.compile(r"pulmonary arter|\baorta\b|ascending|arch|coronary sinus|hepatic|"
                                                   r"pulmonary vein|\bmain\b"), "size"),
    "effusion": Kind(re.compile(r"\beffusions?\b"), {"pericardium": re.compile(r"pericardi")},
                     re.compile(r"pleural|ascites"), "effusion"),
    "function": Kind(re.compile(r"(?<!diastolic )\b(?:systolic )?function\b|\bdysfunction\b|\bhyperdynamic\b"),
                     _joined(VENTRICLES), re.compile(r"diastolic|valve|prosthe|atrial|sinus|renal|thyroid|diastology"),
                     "systolic function"),
}
DEVICES = {  # stated, or denied ("no pacemaker leads are seen"); "aortic valve bicuspid" denied by "trileaflet"
    "pacemaker": re.compile(r"\b(?:pacemaker|pacer|a?icd|defibrillator)\b|\bpacing (?:leads?|wires?)\b"),
    "tavr": re.compile(r"\btav[ri]\b|transcatheter aortic valve"),
    "mitraclip": re.compile(r"\bmitra ?clips?\b|\bmitral (?:valve )?clips?\b"),
    "impella": re.compile(r"\bimpella\b"),
    "bicuspid aortic valve": re.compile(r"\bbicuspid\b|\bbicommissural\b"),
}
TRILEAFLET_RE = re.compile(r"\btrileaflet\b|\bthree leaflets?\b|\btricuspid aortic\b")
DEVICE_ANY_RE = re.compile("|".join([p.pattern for p in DEVICES.values()] + [TRILEAFLET_RE.pattern]))
NOUNS_RE = re.compile("|".join(k.noun.pattern for k in KINDS.values()))
PREFILTER_RE = re.compile(r"steno|regurg|insuffic|\b(?:mr|tr|ar|ai|pr)\b|dilat|enlarg|normal|effusion|function|"
                          r"hyperdynamic|pacemaker|pacer|icd|defibrillator|pacing|tav|transcatheter|clip|impella|"
                          r"bicuspid|bicommissural|trileaflet|three leaflet")

# ------------------------------------------------------------------ numbers

_GAP = r"(?:(?!gradient|velocity|tapse|collaps|\bef\b|fraction|diameter)[^\d;%]){0,40}?"
_NUMBER = r"(?P<neg>-\s?|minus |negative )?(?P<a>\d{1,3}(?:\.\d+)?)(?:\s*%?\s*(?:-|to)\s*(?P<b>\d{1,3}(?:\.\d+)?))?"
# the number must end in its unit, or end the sentence or clause ("LVEF 55." / "EF 55, ..."), as the extractor
# reads it: "EF by method of discs 4 chamber 55%" is no LVEF of 4
_END = r"(?=\s*(?:$|[,(]))"
VALUE_RULES = {  # name -> (key, number and unit, plausible low, high, tolerance between two statements)
    "LVEF": (re.compile(rf"(?:{'|'.join(VALUES['ejection_fraction'].keys)}){_GAP}{_NUMBER}"
                        rf"(?:\s*(?:%|percent)|{_END})"), 5.0, 90.0, 10.0),
    "PA systolic pressure": (re.compile(rf"(?:{'|'.join(VALUES['pulmonary_artery_pressure_continuous'].keys)}){_GAP}"
                                        rf"{_NUMBER}(?:\s*(?:(?:\+|plus)\s*(?:cvp|rap|ra pressure)\s*)?mmhg|{_END})"),
                             10.0, 150.0, 15.0),
}
# the EF a systolic function grade allows: contradicted at EF >= upper(lowest grade) or EF < lower(highest grade)
EF_UPPER = {0.0: float("inf"), 0.5: 60, 0.75: 60, 1.0: 60, 1.5: 55, 2.0: 50, 2.5: 45, 3.0: 40}
EF_LOWER = {0.0: 45, 0.5: 30, 0.75: 30, 1.0: 30, 1.5: 25, 2.0: 20, 2.5: 10, 3.0: 0}
HYPERDYNAMIC_EF_LOWER = 60

_DIGIT_RE = re.compile(r"\d")
_HEADER_RE = re.compile(r"^\s*(" + "|".join(re.escape(s) for s in SECTIONS) + r")\s*:", re.IGNORECASE)
_LINE_SPLIT_RE = re.compile(r"\n|\[sep\]", re.IGNORECASE)

# ------------------------------------------------------------------ sentence -> findings


@dataclass(frozen=True)
class Finding:
    name: str  # "mitral regurgitation", "left ventricle systolic function", "pacemaker"
    lo: float
    hi: float
    sentence: int  # index into the report's sentences
    hyperdynamic: bool = False


def _grade(text: str, last: bool) -> float | None:
    found = list(GRADE_RE.finditer(text)) if last else [m for m in [GRADE_RE.search(text)] if m]
    if not found:
        return None
    m = found[-1 if last else 0]
    return GRADE_VALUE[int(m.lastgroup[1:])]


def _clauses(sentence: str) -> list[tuple[int, int]]:
    cuts = [0] + [x for m in CLAUSE_RE.finditer(sentence) for x in (m.start(), m.end())] + [len(sentence)]
    return [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2) if sentence[cuts[i]:cuts[i + 1]].strip()]


def _structures(kind: Kind, text: str) -> list[str]:
    return [name for name, pattern in kind.structures.items() if pattern.search(text)]


class _Clause:
    """A clause that states a finding, with what _state asks of it found once.

    A long clause can hold thousands of findings ("mr and tr and mr ..."); reading the whole clause again for
    each of them, as a search of clause[:start] or clause[end:] does, is quadratic (50 KB of "function " took
    minutes). One scan of the clause finds the negations and grades that scans of those stretches find: each is
    a whole word, and a finding's own words start and end on a word boundary, so none straddles a finding's
    edge; the exception, a grade like "3+" ending right where the finding starts ("3+MR"), is looked up directly."""

    __slots__ = ("text", "capped", "first_negation_end", "grade_starts", "grade_ends", "grades", "structures",
                 "blocked", "_after")

    def __init__(self, text: str):
        self.text = text
        self.capped = bool(CAP_RE.search(text))
        first = NEGATION_RE.search(text)
        self.first_negation_end = first.end() if first else None
        self.grade_starts, self.grade_ends, self.grades = [], [], []
        for m in GRADE_RE.finditer(text):
            self.grade_starts.append(m.start())
            self.grade_ends.append(m.end())
            self.grades.append(GRADE_VALUE[int(m.lastgroup[1:])])
        self.structures: dict[str, list[str]] = {}  # kind name -> the structures the clause names
        self.blocked: dict[str, bool] = {}  # kind name -> does the clause name one of its blockers
        self._after = None  # what a systolic function's clause says, found when first asked (see function_words)

    def function_words(self) -> tuple[int, bool, bool, bool]:
        """Where the clause's last negation starts (-1: none), and does it say the function is depressed,
        hyperdynamic, normal?"""
        if self._after is None:
            last = -1
            for m in NEGATION_RE.finditer(self.text):
                last = m.start()
            self._after = (last, *(bool(r.search(self.text)) for r in (DEPRESSED_RE, HYPERDYNAMIC_RE,
                                                                          NORMAL_FUNCTION_RE)))
        return self._after

    def negated_before(self, start: int) -> bool:
        return self.first_negation_end is not None and self.first_negation_end <= start

    def grade_before(self, start: int) -> float | None:
        edge = GRADE_RE.match(self.text, start - 2, start) if start >= 2 else None
        if edge:  # "3+" right before "MR": in clause[:start] nothing follows it; in the clause a letter does
            return GRADE_VALUE[int(edge.lastgroup[1:])]
        i = bisect.bisect_right(self.grade_ends, start) - 1
        return self.grades[i] if i >= 0 else None

    def grade_after(self, end: int) -> float | None:
        i = bisect.bisect_left(self.grade_starts, end)
        return self.grades[i] if i < len(self.grades) else None


def _state(kind_name: str, c: _Clause, start: int, end: int, neighbour_grade) -> tuple[float, float, bool] | None:
    """(lo, hi, hyperdynamic) of the finding at c.text[start:end], or None when the clause settles nothing."""
    clause = c.text
    if c.capped:
        return 0.0, 1.0, False
    negated = c.negated_before(start) or bool(NEGATED_AFTER_RE.match(clause, end))
    if kind_name == "function":
        last_negation, depressed, hyperdynamic, normal = c.function_words()
        if negated or last_negation >= end:  # "no systolic dysfunction", "function is not reduced"
            return 0.0, 0.0, False
        if depressed:
            g = c.grades[-1] if c.grades else None
            return (g, g, False) if g is not None else (1.0, 3.0, False)
        if hyperdynamic:
            return 0.0, 0.0, True
        if normal:
            return 0.0, 0.0, False
        return None
    if negated:
        return 0.0, 0.0, False
    if kind_name == "dilation" and clause[start:end].startswith(("normal", "size")):
        return 0.0, 0.0, False
    g = _grade(clause[start:end], last=True)
    if g is None:
        g = c.grade_before(start)
    if g is None:
        g = c.grade_after(end)
    if g is None:  # "a large, circumferential effusion", "effusion, moderate in size"
        g = neighbour_grade()
    return (g, g, False) if g is not None else (1.0, 3.0, False)


def findings(report: str) -> tuple[list[str], list[Finding]]:
    """The report's normalised sentences, and every settled finding stated in them."""
    sents = sentences(report)
    out = []
    for i, (section, sentence) in enumerate(sents):
        if not PREFILTER_RE.search(sentence):
            continue
        clauses = [sentence[a:b] for a, b in _clauses(sentence)]
        named, lent = {}, {}  # what the sentence's clauses ask of it and of each other, found once
        for j, clause in enumerate(clauses):
            if PREFILTER_RE.search(clause):
                out += _clause_findings(section, sentence, clauses, j, i, named, lent)
    return [s for _, s in sents], out


def _lent_grade(clauses: list[str], k: int, lent: dict[int, float | None]) -> float | None:
    """The grade clause k gives the finding of a clause beside it, if it states no finding of its own and is short
    ("a large, circumferential effusion")."""
    if k not in lent:
        c = clauses[k]
        lent[k] = None if NOUNS_RE.search(c) or len(c.split()) > 4 else _grade(c, last=True)
    return lent[k]


def _clause_findings(section, sentence, clauses, j, i, named, lent) -> list[Finding]:
    """Findings of clause j of sentence i. named: kind name -> the structures the sentence names; lent: clause
    index -> the grade it gives a neighbour (both filled as asked, and shared by the sentence's clauses)."""
    clause, out, c = clauses[j], [], None

    def neighbour_grade():
        return next((g for k in (j - 1, j + 1) if 0 <= k < len(clauses)
                     for g in [_lent_grade(clauses, k, lent)] if g is not None), None)

    for kind_name, kind in KINDS.items() if not HEDGE_RE.search(clause) else ():
        for m in kind.noun.finditer(clause):
            c = c or _Clause(clause)
            if m.group() in ABBREVIATIONS:
                names = [ABBREVIATIONS[m.group()]]
            else:
                if kind_name not in c.structures:
                    c.structures[kind_name] = _structures(kind, clause)
                names = c.structures[kind_name]
                if not names:  # a bare mention: the sentence's structure, else the section's
                    if kind_name not in c.blocked:
                        c.blocked[kind_name] = bool(kind.blockers and kind.blockers.search(clause))
                    if c.blocked[kind_name]:
                        continue
                    if kind_name not in named:
                        named[kind_name] = _structures(kind, sentence)
                    names = named[kind_name][:1] or [s for s in [SECTION_STRUCTURE.get(section)]
                                                     if s in kind.structures]
            if not names:
                continue
            state = _state(kind_name, c, m.start(), m.end(), neighbour_grade)
            if state is not None:
                out += [Finding(f"{n} {kind.label}", state[0], state[1], i, state[2]) for n in names]
    if not DEVICE_ANY_RE.search(clause) or DEVICE_HEDGE_RE.search(clause):
        return out
    for name, pattern in DEVICES.items():
        m = pattern.search(clause)
        if m:
            negated = NEGATION_RE.search(clause[:m.start()]) or NEGATED_AFTER_RE.match(clause[m.end():])
            out.append(Finding(name, 0.0 if negated else 1.0, 0.0 if negated else 1.0, i))
    if TRILEAFLET_RE.search(clause) and not NEGATION_RE.search(clause):
        out.append(Finding("bicuspid aortic valve", 0.0, 0.0, i))
    return out


def values(sents: list[str]) -> dict[str, list[tuple[float, int]]]:
    """name -> [(stated number, sentence index)]: ranges as their midpoint, negatives kept negative."""
    out = {name: [] for name in VALUE_RULES}
    for i, sentence in enumerate(sents):
        if not _DIGIT_RE.search(sentence):
            continue
        for name, (pattern, *_) in VALUE_RULES.items():
            for m in pattern.finditer(sentence):
                if m["a"].startswith("0."):  # "EF 0.55": a fraction, not a percentage
                    continue
                v = (float(m["a"]) + float(m["b"])) / 2 if m["b"] else float(m["a"])
                out[name].append((-v if m["neg"] else v, i))
    return out

# ------------------------------------------------------------------ rules


def _fmt(lo: float, hi: float, name: str = "") -> str:
    if name in DEVICES:
        return "stated" if lo else "denied"
    names = {0.0: "absent/normal", 0.5: "trace", 0.75: "trace to mild", 1.0: "mild", 1.5: "mild to moderate",
             2.0: "moderate", 2.5: "moderate to severe", 3.0: "severe"}
    return names.get(lo, str(lo)) if lo == hi else f"{names.get(lo, lo)} to {names.get(hi, hi)}"


def _pairs(facts: list[Finding]):
    """For each finding name, the first pair of statements a whole grade or more apart (lower one first).

    The first statement that disagrees with a later one, and the first later one it disagrees with. Comparing
    every pair is quadratic in a report that repeats one finding thousands of times; a statement's grades come
    from a handful of intervals, so a walk from the end that keeps where each interval next occurs finds the
    same pair in one pass."""
    by_name: dict[str, list[Finding]] = {}
    for f in facts:
        by_name.setdefault(f.name, []).append(f)
    for name, fs in by_name.items():
        pair = None
        if len(fs) < 2:
            continue
        following: dict[tuple[float, float], int] = {}  # (lo, hi) -> its first index after k
        for k in reversed(range(len(fs))):
            a = fs[k]
            later = [j for (lo, hi), j in following.items() if lo - a.hi >= 1 or a.lo - hi >= 1]
            if later:
                pair = a, fs[min(later)]
            following[a.lo, a.hi] = k
        if pair:
            yield name, *sorted(pair, key=lambda f: f.hi)


def present_and_absent(sents, facts, vals) -> list[Contradiction]:
    return [Contradiction("present_and_absent", f"{name}: {_fmt(a.lo, a.hi, name)} vs {_fmt(b.lo, b.hi, name)}",
                          _quote(sents, a.sentence, b.sentence))
            for name, a, b in _pairs(facts) if a.hi == 0]


def conflicting_severity(sents, facts, vals) -> list[Contradiction]:
    return [Contradiction("conflicting_severity", f"{name}: {_fmt(a.lo, a.hi, name)} vs {_fmt(b.lo, b.hi, name)}",
                          _quote(sents, a.sentence, b.sentence))
            for name, a, b in _pairs(facts) if a.hi > 0]


def ef_vs_function(sents, facts, vals) -> list[Contradiction]:
    first_wrong = {}  # (lo, hi, hyperdynamic) -> the first LVEF it disagrees with: one pass over them per grade
    for f in facts:
        if f.name != "left ventricle systolic function":
            continue
        key = f.lo, f.hi, f.hyperdynamic
        if key not in first_wrong:
            first_wrong[key] = next(((ef, i) for ef, i in vals["LVEF"] if (
                ef < HYPERDYNAMIC_EF_LOWER if f.hyperdynamic else (ef >= EF_UPPER[f.lo] or ef < EF_LOWER[f.hi]))), None)
        if first_wrong[key]:
            ef, i = first_wrong[key]
            what = "hyperdynamic" if f.hyperdynamic else _fmt(f.lo, f.hi)
            # one is enough: the rest repeat the same disagreement
            return [Contradiction("ef_vs_function", f"LVEF {ef:g}% vs {what} LV systolic function",
                                  _quote(sents, f.sentence, i))]
    return []


def conflicting_values(sents, facts, vals) -> list[Contradiction]:
    out = []
    for name, (*_, tolerance) in VALUE_RULES.items():
        stated = [v for v, _ in vals[name]]
        # the first value with a later one more than the tolerance away, and the first such later one; the range
        # of the values after each (one pass from the end) says which is first without comparing every pair
        k, low, high = None, float("inf"), float("-inf")
        for x in reversed(range(len(stated) - 1)):
            low, high = min(low, stated[x + 1]), max(high, stated[x + 1])
            if high - stated[x] > tolerance or stated[x] - low > tolerance:
                k = x
        if k is not None:
            j = next(j for j in range(k + 1, len(stated)) if abs(stated[k] - stated[j]) > tolerance)
            (a, i), (b, j) = vals[name][k], vals[name][j]
            out.append(Contradiction("conflicting_values", f"{name} {a:g} vs {b:g}", _quote(sents, i, j)))
    return out


def impossible_value(sents, facts, vals) -> list[Contradiction]:
    out = []
    for name, (_, low, high, _) in VALUE_RULES.items():
        for v, i in vals[name]:
            if not low <= v <= high:
                out.append(Contradiction("impossible_value", f"{name} {v:g} outside {low:g}-{high:g}", (sents[i],)))
    return out


def repeated_section(report: str) -> list[Contradiction]:
    seen: dict[str, str] = {}
    out = []
    for line in _LINE_SPLIT_RE.split(report):
        m = _HEADER_RE.match(line)
        if not m:
            continue
        name = m.group(1).lower()
        if name in seen:
            out.append(Contradiction("repeated_section", f"section {m.group(1)!r} appears twice",
                                     (seen[name], line.strip())))
        else:
            seen[name] = line.strip()
    return out


def _quote(sents: list[str], i: int, j: int) -> tuple[str, ...]:
    return tuple(sents[k] for k in sorted({i, j}))


RULES = {"ef_vs_function": ef_vs_function, "present_and_absent": present_and_absent,
         "conflicting_severity": conflicting_severity, "conflicting_values": conflicting_values,
         "impossible_value": impossible_value, "repeated_section": None}  # the last reads the raw text


def contradictions(report: str, rules=None) -> list[Contradiction]:
    """Every contradiction in one report, by the named rules (default: all of RULES)."""
    if not isinstance(report, str):
        raise TypeError(f"contradictions expects the report as a str, got {type(report).__name__}")
    rules = list(RULES) if rules is None else list(rules)
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown consistency rules {unknown}; known: {list(RULES)}")
    out = repeated_section(report) if "repeated_section" in rules else []
    rest = [r for r in rules if r != "repeated_section"]
    if rest:
        sents, facts = findings(report)
        vals = values(sents)
        for r in rest:
            out += RULES[r](sents, facts, vals)
    return out


def count(reports: list[str]) -> dict:
    """Contradictions in a set of reports: per 1,000 reports, the share of reports with any, per-rule counts."""
    per_rule = {r: 0 for r in RULES}
    with_any = 0
    for report in reports:
        found = contradictions(report)
        with_any += bool(found)
        for c in found:
            per_rule[c.rule] += 1
    n = len(reports)
    total = sum(per_rule.values())
    return {"n_reports": n, "contradictions": total, "per_1000": round(1000 * total / n, 2) if n else None,
            "reports_with_any": with_any, "per_rule": per_rule}
