"""Clinical labels from report text (echovlm/scoring.py compares two sets of them).

Every report, generated or reference, goes through the same extractor, so a model is scored on what its
reports *say*: 23 binary traits (positive only at moderate or worse where the trait is graded) and two
numbers, LVEF (%) and PA systolic pressure (mmHg).

How a binary trait is read (all rules are our own regular expressions, in the tables below):

1. (echovlm/sentences.py) A line "<Section>: ..." (one of the 16 report sections) starts a section; "[SEP]"
   also ends one. A line break ends a sentence unless the next line starts in lower case (a wrapped line).
   Sentences end at . ; ! ? (not at the point of "2.3 cm"), and where a phrase without a full stop runs into
   the next one ("No tricuspid stenosis There is moderate regurgitation": a capitalised word after a
   lower-case word that is not a function word such as "to" in "mild to Moderate"). Then case, spaces and
   dashes are normalised ("Moderate-to-severe" -> "moderate to severe").
2. In each sentence, a finding is an explicit phrase ("moderate aortic stenosis", "the left atrium is
   severely dilated") or a bare one ("moderate stenosis") that is read as the structure the sentence is
   about: the section's structure, or the one the sentence names. A bare phrase whose clause names another
   structure (another valve, for a valve finding) belongs to that one and is skipped. Section headers are
   context only: an explicit phrase counts in any section.
3. The finding's clause runs from the previous boundary (, : ; and but with whereas although however while)
   to the next one. The finding is negated by no / not / without / absent / ruled out / no evidence of ...
   before it in its clause (across "or", so "no stenosis or regurgitation" negates both; not across a comma
   or "and", so "no stenosis, moderate regurgitation" keeps the regurgitation), or by "is not seen",
   "is absent", "was ruled out" right after it. "No change" and "not changed" are not negations. A finding
   left open ("cannot rule out tamponade", "... cannot be excluded") does not count; a possible bicuspid
   valve does, as the trait asks.
4. A graded finding needs a severity of moderate or worse in its clause: the word inside the phrase, else
   the nearest one before it (not past another finding: in "severe TR can lead to RA enlargement" the
   "severe" is the TR's), else the first after it ("aortic stenosis is severe", "effusion, moderate in
   size"). "Mild to moderate", "small to moderate", "trace", "trivial", "not severe" are below moderate.

Numbers: the first statement in the report wins, a range gives its midpoint ("55-60%", "between 55 and 60%"
-> 57.5), and values outside 0-100 (EF) or 0-200 mmHg (PASP) are None. RVSP counts as PASP (with no pulmonic
stenosis they are the same number, and reports often give only the RVSP), but an explicit PA systolic
pressure is preferred. "40 + CVP mmHg" reads as 40, the stated number, as EchoPrime's rules read it.

echovlm.echoprime.load_echoprime_rules() reads EchoPrime's own phrase list from the user's checkout instead,
for numbers that are comparable with published tables; extract_labels(text, rules=...) applies either. The
sections and traits are echovlm/vocabulary.py's, shared with the synthetic generator.
"""

import bisect
import functools
import itertools
import re
from dataclasses import dataclass

# the traits extract_labels returns; importers of this module may take them from here
from echovlm.sentences import sentences
from echovlm.vocabulary import BINARY_TRAITS, CONTINUOUS_TRAITS, SECTIONS, TRAITS  # noqa: F401

# ------------------------------------------------------------------ vocabulary

# The structures a sentence can be about; a section header stands for one of them.
STRUCTURES = {
    "left ventricle": r"left ventric(?:le|ular)|\blv\b",
    "right ventricle": r"right ventric(?:le|ular)|\brv\b",
    "left atrium": r"left atri(?:um|al)|\bla\b",
    "right atrium": r"right atri(?:um|al)|\bra\b",
    "atrial septum": r"atrial sept(?:um|al)|\bias\b",
    "mitral valve": r"\bmitral\b",
    "aortic valve": r"\baortic\b(?! root| arch| sinus)|\bav\b",
    "tricuspid valve": r"\btricuspid\b",
    "pulmonic valve": r"\bpulmonic\b|pulmonary valve",
    "pericardium": r"pericardi",
    "aorta": r"aortic root|sinus(?:es)? of valsalva|\broot\b",
    "ivc": r"\bivc\b|inferior vena cava",
    "pulmonary artery": r"pulmonary arter|\bpa\b",
    "pulmonary veins": r"pulmonary vein",
    # not sections, but a bare "stenosis" or "effusion" next to them is theirs, not the section's
    "other": r"pleural|\blvot\b|outflow tract|subaortic|subvalvular|supravalvular|coronary|septal defect|"
             r"(?:ascending|descending|abdominal|thoracic) aorta|aortic arch|sinotubular",
}
SECTION_STRUCTURE = {s.lower(): s.lower() for s in SECTIONS} | {"resting segmental wall motion analysis": "left ventricle"}
VALVES = ("aortic valve", "mitral valve", "tricuspid valve", "pulmonic valve", "other")
ALL_STRUCTURES = tuple(STRUCTURES)

# Severity words, compound phrases first so "mild to moderate" is never read as "moderate".
SEVERITY = [
    (r"(?:not|less than|no more than|at most) (?:mild|moderate|severe)(?:ly)?|"
     r"mild(?:ly)? (?:to )?moderate(?:ly)?|small (?:to )?moderate|trace (?:to )?mild|[12]\+", "low"),
    (r"moderate(?:ly)? (?:to )?severe(?:ly)?|moderate(?:ly)? (?:to )?large|at least moderate(?:ly)?|"
     r"very (?:severe|large)|[34]\+", "high"),
    (r"trace|trivial|minimal(?:ly)?|mild(?:ly)?|small|tiny|physiologic(?:al)?|borderline|slight(?:ly)?", "low"),
    (r"moderate(?:ly)?|severe(?:ly)?|large|critical|massive(?:ly)?|marked(?:ly)?|torrential|huge", "high"),
]
# one lookbehind for all the alternatives, not one each: the same matches, scanned 2x faster
SEVERITY_RE = re.compile(r"(?<![\w+])(?:" + "|".join(rf"(?P<{level}{i}>{p})(?!\w)" for i, (p, level) in enumerate(SEVERITY))
                         + ")")
# "cannot rule out X" and "X cannot be excluded" leave X unsettled, so they do not count either
NEGATION_RE = re.compile(r"\b(?:no|not|without|absent|negative for|absence of|free of|rule out|ruled out|"
                         r"exclude|excluded|neither|nor|never)\b")
PSEUDO_NEGATION_RE = re.compile(r"\bno (?:significant |interval )*change|\bnot (?:significantly )?changed")
NEGATED_AFTER_RE = re.compile(r"\s*(?:is |are |was |were |has been |have been |cannot be |can not be |could not be )?"
                              r"(?:not (?:seen|visuali[sz]ed|"
                              r"present|identified|demonstrated|detected|appreciated|noted|observed)|absent|"
                              r"ruled out|excluded|removed|removal|explanted|extracted)\b")
BOUNDARY_RE = re.compile(r"[,:;]|\b(?:and|but|with|whereas|although|though|however|while|yet)\b")
# a severity word qualifies the next finding: one before these words is theirs ("severe TR can lead to RA enlargement")
FINDING_WORD_RE = re.compile(r"\b(?:regurgitation|insufficiency|stenosis|effusion|dilation|dilatation|enlargement|"
                             r"calcification|hypertrophy|dysfunction|hypokinesis|dilated|enlarged|calcified|thickened|"
                             r"hypertrophied|sclerotic|reduced|depressed|impaired)\b")
SEV = "|".join(p for p, _ in SEVERITY)
SEVERITY_AFTER_COMMA_RE = re.compile(rf",\s*(?:which |that )?(?:(?:is|are|was|appears?|seems?) )?(?:to be )?"
                                     rf"(?P<s>{SEV})(?: in (?:size|severity|degree))?\s*(?:,|$)")
SEVERITY_BEFORE_COMMA_RE = re.compile(rf"(?<![\w+])(?P<s>{SEV})\s*$")


# up to three words between a structure and its state: "the left atrium is at least moderately dilated"
_FILLER = r"(?: (?!and\b|but\b|with\b|or\b)[\w'+]+){0,3}?"
_VERB = r"(?:,? which)? (?:is|are|was|were|appears?|seems?|remains?|looks?|has become)(?: to be)?"


def phrases(subject: str, nouns: str = "", adjectives: str = "") -> tuple[str, ...]:
    """The usual ways a report ties a state to a structure: 'dilated left atrium', 'the left atrium is
    moderately dilated', 'left atrial enlargement', 'dilation of the left atrium'."""
    forms = []
    if adjectives:
        forms += [rf"\b(?:{adjectives}) (?:{subject})", rf"(?:{subject}){_VERB}{_FILLER} (?:{adjectives})\b"]
    if nouns:
        forms += [rf"(?:{subject}) (?:{nouns})\b", rf"\b(?:{nouns}) (?:of|involving) the (?:{subject})"]
    return tuple(forms)


VALVE_WORDS = {"aortic": r"aortic", "mitral": r"mitral", "tricuspid": r"tricuspid", "pulmonic": r"pulmonic|pulmonary"}
STENOSIS = r"stenosis"
REGURGITATION = r"regurgitation|insufficiency|regurgitant jet"


# At most this many other valves listed before (and after) the one a finding is about. Unbounded, a run of other
# valves' names with no finding at its end was rescanned from each of its words, which is quadratic (50 KB of
# "aortic, " before "stenosis" took 8 s); four valves, each named twice at most, fit.
LIST_ITEMS = 6


def valve(name: str, nouns: str, adjective: str) -> tuple[str, ...]:
    """A valve finding, also inside a list of valves: 'moderate mitral and tricuspid regurgitation'."""
    others = "|".join(w for v, w in VALVE_WORDS.items() if v != name)
    joint = r"(?:,? and|,|,? or)"
    subject = (rf"\b(?:(?:{others})(?: valve)?{joint} ){{0,{LIST_ITEMS}}}(?:{VALVE_WORDS[name]})(?: valve)?"
               rf"(?:{joint} (?:{others})(?: valve)?){{0,{LIST_ITEMS}}}")
    if nouns != REGURGITATION:
        return phrases(subject, nouns, adjective)
    # "severe MR and TR"
    short = {"aortic": r"ar|ai", "mitral": r"mr", "tricuspid": r"tr", "pulmonic": r"pr"}
    others = "|".join(w for v, w in short.items() if v != name)
    return phrases(subject, nouns, adjective) + (
        rf"\b(?:(?:{others}){joint} ){{0,{LIST_ITEMS}}}(?:{short[name]})(?:{joint} (?:{others})){{0,{LIST_ITEMS}}}\b",)


DILATED = r"dilated|enlarged"
DILATION = r"dilation|dilatation|enlargement"
DEPRESSED = r"depressed|reduced|decreased|impaired|diminished"
RV_FUNCTION = r"(?:rv|right ventricular) (?:global )?(?:systolic )?function|systolic function of the right ventricle"
LA = r"left atri(?:um|al)(?: cavity| size| volume(?: index)?)?|\bla\b"
RA = r"right atri(?:um|al)(?: cavity| size| volume(?: index)?)?|\bra\b"
RV = r"right ventric(?:le|ular)(?: cavity| size)?|\brv\b"
ROOT = r"aortic root(?: at the sinus(?:es)? of valsalva)?|sinus(?:es)? of valsalva"
IVC = r"\bivc\b|inferior vena cava"
LA_PRESSURE = (r"left atrial pressures?|\bla pressures?|\blap\b|\blvedp\b|(?:lv|left ventricular) (?:end diastolic |"
               r"filling )?pressures?|(?<!right sided )(?<!right )filling pressures?")


@dataclass(frozen=True)
class Finding:
    """How one binary trait is stated.

    words: a quick test, words any statement of the finding contains (only sentences with one are read);
    graded: phrases that count only at moderate or worse; present: phrases that count whenever stated and
    not negated; bare: the short form ("stenosis", "dilated") read as the `about` structure in a sentence
    about it (its section, or a sentence naming it), unless the clause names one of `blocked_by`;
    at_least_cm: a diameter of the `about` structure at or above this value also counts (IVC).
    """

    words: str
    graded: tuple[str, ...] = ()
    present: tuple[str, ...] = ()
    bare: str = ""
    about: tuple[str, ...] = ()
    blocked_by: tuple[str, ...] = ALL_STRUCTURES
    at_least_cm: float | None = None


BIATRIAL = r"biatrial|both atria|left and right atria"
ENLARGED = rf"\b(?:{DILATED}|{DILATION})\b"
ENLARGED_WORDS = r"dilat|enlarg"
STENOSIS_WORDS = r"stenosis|stenotic"
REGURGITATION_WORDS = r"regurgita|insufficiency|\b(?:mr|ar|ai|tr|pr)\b"

FINDINGS = {
    "pacemaker": Finding(
        words=r"pacemaker|pacer|icd\b|defibrillator|lead|wire",
        present=(r"\b(?:pacemaker|pacer|a?icd|defibrillator)(?: (?:leads?|wires?))?\b|"
                 r"\b(?:pacing|device) (?:leads?|wires?)\b",),
        bare=r"\b(?:leads?|wires?)\b(?! to\b)", about=("right atrium", "right ventricle"), blocked_by=()),
    "impella": Finding(words=r"impella", present=(r"\bimpella",)),
    "tavr": Finding(
        words=r"tav[ri]|transcatheter|stent|bioprosthe|corevalve|evolut|sapien",
        present=(r"\btav[ri]\b|transcatheter aortic valve|stent valve(?!(?: \w+){0,3}? in (?:the )?(?:pulmonic|pulmonary|"
                 r"mitral|tricuspid) position)|"
                 r"bioprosthe(?:tic|sis)(?: valve)? (?:is )?(?:present |seen |noted )?in the aortic position|"
                 r"bioprosthetic (?:aortic valve|avr)|aortic (?:valve )?bioprosthesis|\b(?:corevalve|evolut|sapien)\b",),
        bare=r"bioprosthe(?:tic|sis)", about=("aortic valve",), blocked_by=VALVES),
    "mitraclip": Finding(words=r"clip", present=(r"(?:mitra ?clips?|mitral (?:valve )?clips?)\b"
                                                 r"(?!(?: \w+){0,3}? in the tricuspid position)",),
                         bare=r"\bclips?\b", about=("mitral valve",), blocked_by=VALVES),
    "aortic_root_dilation": Finding(words=ENLARGED_WORDS, graded=phrases(ROOT, DILATION, DILATED), bare=ENLARGED,
                                    about=("aorta",)),
    "left_atrium_dilation": Finding(words=ENLARGED_WORDS,
                                    graded=phrases(LA, DILATION, DILATED) + phrases(BIATRIAL, DILATION, DILATED),
                                    bare=ENLARGED, about=("left atrium",)),
    "right_atrium_dilation": Finding(words=ENLARGED_WORDS,
                                     graded=phrases(RA, DILATION, DILATED) + phrases(BIATRIAL, DILATION, DILATED),
                                     bare=ENLARGED, about=("right atrium",)),
    "right_ventricle_dilation": Finding(words=ENLARGED_WORDS, graded=phrases(RV, DILATION, DILATED), bare=ENLARGED,
                                        about=("right ventricle",)),
    "aortic_stenosis": Finding(words=STENOSIS_WORDS, graded=valve("aortic", STENOSIS, "stenotic"),
                               bare=r"\b(?:stenosis|stenotic)\b", about=("aortic valve",), blocked_by=VALVES),
    "mitral_stenosis": Finding(words=STENOSIS_WORDS, graded=valve("mitral", STENOSIS, "stenotic"),
                               bare=r"\b(?:stenosis|stenotic)\b", about=("mitral valve",), blocked_by=VALVES),
    "tricuspid_stenosis": Finding(words=STENOSIS_WORDS, graded=valve("tricuspid", STENOSIS, "stenotic"),
                                  bare=r"\b(?:stenosis|stenotic)\b", about=("tricuspid valve",), blocked_by=VALVES),
    "aortic_regurgitation": Finding(words=REGURGITATION_WORDS, graded=valve("aortic", REGURGITATION, "regurgitant"),
                                    bare=rf"\b(?:{REGURGITATION})\b", about=("aortic valve",), blocked_by=VALVES),
    "mitral_regurgitation": Finding(words=REGURGITATION_WORDS, graded=valve("mitral", REGURGITATION, "regurgitant"),
                                    bare=rf"\b(?:{REGURGITATION})\b", about=("mitral valve",), blocked_by=VALVES),
    "tricuspid_valve_regurgitation": Finding(
        words=REGURGITATION_WORDS, graded=valve("tricuspid", REGURGITATION, "regurgitant"),
        bare=rf"\b(?:{REGURGITATION})\b", about=("tricuspid valve",), blocked_by=VALVES),
    "pulmonic_valve_regurgitation": Finding(
        words=REGURGITATION_WORDS, graded=valve("pulmonic", REGURGITATION, "regurgitant"),
        bare=rf"\b(?:{REGURGITATION})\b", about=("pulmonic valve",), blocked_by=VALVES),
    "mitral_annular_calcification": Finding(
        words=r"calcifi|\bmac\b",
        graded=phrases(r"mitral annul(?:us|ar)", r"calcification", r"calcified") + (r"\bmac\b",),
        bare=r"\bannul(?:us|ar)(?: calcification| (?:is )?(?:\w+ )?calcified)", about=("mitral valve",),
        blocked_by=VALVES),
    "bicuspid_aov_morphology": Finding(words=r"bicuspid|bicommissural", present=(r"\bbicuspid\b|\bbicommissural\b",)),
    "dilated_ivc": Finding(words=rf"{ENLARGED_WORDS}|plethoric|\d\s*(?:cm|mm)\b",
                           present=phrases(IVC, DILATION, rf"{DILATED}|plethoric"),
                           bare=rf"\b(?:{DILATED}|plethoric)\b", about=("ivc",), at_least_cm=2.0),
    "pericardial_effusion": Finding(words=r"effusion|tamponade",
                                    graded=(r"pericardial effusion", r"effusion (?:in|within) the pericardi"),
                                    present=(r"tamponade",), bare=r"\beffusion\b", about=("pericardium",)),
    "rv_systolic_function_depressed": Finding(
        words=rf"{DEPRESSED}|dysfunction|hypokine|mcconnell",
        graded=phrases(RV_FUNCTION, adjectives=DEPRESSED)
        + phrases(RV, nouns=r"(?:free wall )?hypokinesis|(?:systolic )?dysfunction", adjectives=r"hypokinetic")
        + (rf"(?:{RV}) (?:has|shows|with|demonstrates){_FILLER} (?:{DEPRESSED}) (?:global )?systolic function",),
        present=(r"mcconnell'?s? sign",),
        bare=rf"\b(?:{DEPRESSED}) (?:global )?systolic function|systolic function (?:is )?(?:\w+ ){{0,3}}?(?:{DEPRESSED})",
        about=("right ventricle",)),
    "elevated_left_atrial_pressure": Finding(words=r"pressure|\blap\b|lvedp",
                                             present=phrases(LA_PRESSURE, adjectives=r"elevated|increased|high|raised")),
    "wall_motion_hypokinesis": Finding(words=r"hypokine", present=(r"hypokine(?:sis|sia|tic)",)),
    "atrial_septum_hypertrophy": Finding(words=r"lipomatous|hypertroph", graded=(r"lipomatous",),
                                         bare=r"\bhypertroph(?:y|ied)\b", about=("atrial septum",)),
}

NUMBER = (r"(?P<a>\d{1,3}(?:\.\d+)?)(?:\s*%?\s*(?:-|to)\s*(?P<b>\d{1,3}(?:\.\d+)?))?"
          r"(?:\s*(?:\+/-|\+-|\u00b1)\s*\d{1,2}(?:\.\d+)?)?")  # "55 +/- 5%" is 55


@dataclass(frozen=True)
class Value:
    """A number stated after one of `keys` (earlier groups preferred), within a short gap, with its unit."""

    keys: tuple[str, ...]
    unit: str
    low: float
    high: float
    unit_optional: bool = False  # a number right after the key, ending the sentence, may omit it ("fraction of 35.")


VALUES = {
    "ejection_fraction": Value(
        keys=(r"(?<!rv )(?<!right ventricular )\b(?:lvef|lv ef|ef|(?:lv |left ventricular )?ejection fraction)\b",),
        unit=r"%|percent", low=0, high=100, unit_optional=True),
    "pulmonary_artery_pressure_continuous": Value(
        keys=(r"(?<!mean )\b(?:pulmonary arter(?:y|ial)|pa) (?:peak )?(?:systolic )?pressure|\bpasp\b|\bspap\b|"
              r"\bpa systolic\b",
              r"\brvsp\b|(?:right ventricular|rv) systolic pressure"),
        # "40 + CVP mmHg": the stated number, as EchoPrime's own rules read it
        unit=r"(?:(?:\+|plus)\s*(?:cvp|rap|(?:the )?(?:ra|right atrial) pressure)\s*)?mmhg", low=0, high=200,
        unit_optional=True),
}
# the words a key's number may not be separated from it by: they start another measurement
_GAP = r"(?:(?!pressure|gradient|velocity|shortening|strain|collaps|\bef\b|fraction)[^;%]){0,80}?"

# ------------------------------------------------------------------ our rules


def _level(m: re.Match) -> str:
    """'low' or 'high' for a match of SEVERITY_RE."""
    return m.lastgroup.rstrip("0123456789")


def _severity(text: str, last: bool) -> str | None:
    """'low' or 'high' for the last (or first) severity word in text, None if it has none."""
    found = list(SEVERITY_RE.finditer(text)) if last else [m for m in [SEVERITY_RE.search(text)] if m]
    return _level(found[-1 if last else 0]) if found else None


# how far back the end of a stretch is read again (see _Sentence), and how far before a comma "a large,
# circumferential effusion" looks: the longest severity phrase ("no more than moderately") is 23 characters, and a
# normalised sentence has one space at most before the comma
SEVERITY_WIDTH = 32


class _Sentence:
    """A sentence with the matches _affirmed asks about found once, in one scan each.

    _affirmed reads the stretch of the sentence around each finding: its clause, and the negations and severity
    words before and after the finding. Scanning that stretch again for every finding is quadratic in a long
    sentence that repeats one ("tr, tr, ..." for 50 KB took a minute); with the sentence scanned once, each
    question is a bisect. The sentence's scan finds what a stretch's own scan finds, as each of these matches is
    a whole word (or punctuation) and never straddles the edge of a clause or a finding; except at the end of the
    stretch before a finding, where the stretch stops and the sentence goes on: "3+MR", "severeleft atrium" hold a
    severity word only when cut there. Those last few characters are read again as the stretch reads them.
    """

    def __init__(self, text: str):
        self.text = text
        self.blocked: dict[tuple, bool] = {}  # (blockers pattern, lo, hi) -> does the clause name a blocker

    # each scan is made when first asked for: most sentences read hold no finding, and need none of them
    @functools.cached_property
    def bounds(self) -> tuple[list[int], list[int]]:
        found = [m.span() for m in BOUNDARY_RE.finditer(self.text)]
        return [a for a, _ in found], [b for _, b in found]

    @functools.cached_property
    def negations(self) -> tuple[list[int], list[int]]:
        # a pseudo-negation ("no change") is blanked out, not removed, so positions stay those of the text
        blanked = PSEUDO_NEGATION_RE.sub(lambda m: " " * len(m.group()), self.text)
        found = [m.span() for m in NEGATION_RE.finditer(blanked)]
        return [a for a, _ in found], [b for _, b in found]

    @functools.cached_property
    def finding_word_ends(self) -> list[int]:
        return [m.end() for m in FINDING_WORD_RE.finditer(self.text)]

    @functools.cached_property
    def severities(self) -> tuple[list[int], list[int], list[str]]:
        found = list(SEVERITY_RE.finditer(self.text))
        return [m.start() for m in found], [m.end() for m in found], [_level(m) for m in found]

    def clause(self, start: int, end: int) -> tuple[int, int]:
        """The clause around text[start:end]: from the last boundary before it to the first after it."""
        starts, ends = self.bounds
        i = bisect.bisect_right(ends, start)
        lo = ends[i - 1] if i else 0
        if self.ends_at(BOUNDARY_RE, lo, start, width=8):
            lo = start  # "andleft atrium": a boundary word where the text before the finding stops
        j = bisect.bisect_left(starts, end)
        return lo, starts[j] if j < len(starts) else len(self.text)

    def runs_into(self, start: int) -> bool:
        """Does the text before `start` run into it without a space? Only then can a scan of the text cut there
        find what the sentence's scan does not (sentences are normalised: words are one space apart)."""
        return start > 0 and not self.text[start - 1].isspace()

    def ends_at(self, pattern: re.Pattern, lo: int, start: int, width: int) -> bool:
        """Does a match of pattern (at most `width` long) within text[lo:start] end right at `start`?"""
        return self.runs_into(start) and any(m.end() == start for m in pattern.finditer(self.text, max(lo, start - width),
                                                                                         start))

    def negated_before(self, lo: int, end: int) -> bool:
        """Does a negation (not a pseudo-negation) lie within text[lo:end]?"""
        starts, ends = self.negations
        i = bisect.bisect_left(starts, lo)
        return i < len(starts) and ends[i] <= end

    def last_finding_word_end(self, lo: int, start: int) -> int:
        """Where the last finding word within text[lo:start] ends (lo if there is none)."""
        if self.ends_at(FINDING_WORD_RE, lo, start, width=16):
            return start  # "dilatedleft atrium": a finding word where the text before the finding stops
        i = bisect.bisect_right(self.finding_word_ends, start) - 1
        return max(lo, self.finding_word_ends[i]) if i >= 0 else lo

    def severity_before(self, lo: int, start: int) -> str | None:
        """The level of the last severity word within text[lo:start]."""
        starts, ends, levels = self.severities
        q = start
        if self.runs_into(start):  # the end of the stretch is scanned again, from a point outside any match
            q = max(lo, start - SEVERITY_WIDTH)
            i = bisect.bisect_right(starts, q) - 1
            if i >= 0 and ends[i] > q:
                q = max(lo, starts[i])
            tail = list(SEVERITY_RE.finditer(self.text, q, start))
            if tail:
                return _level(tail[-1])
        i = bisect.bisect_right(ends, q) - 1
        return levels[i] if i >= 0 and starts[i] >= lo else None

    def severity_after(self, end: int, hi: int) -> str | None:
        """The level of the first severity word within text[end:hi]."""
        starts, ends, levels = self.severities
        i = bisect.bisect_left(starts, end)
        if i < len(starts) and ends[i] <= hi:
            return levels[i]
        edge = SEVERITY_RE.match(self.text, hi - 2, hi) if hi - 2 >= end else None  # "3+and": cut at the boundary
        return _level(edge) if edge else None

    def names_blocker(self, blockers: re.Pattern, lo: int, hi: int) -> bool:
        key = (blockers, lo, hi)  # one search per clause, however many bare findings it holds
        if key not in self.blocked:
            self.blocked[key] = bool(blockers.search(self.text[lo:hi]))
        return self.blocked[key]


def _affirmed(s: _Sentence, start: int, end: int, graded: bool) -> bool:
    """Is the finding at s.text[start:end] stated (not negated), and at moderate or worse when graded?"""
    sentence = s.text
    lo, hi = s.clause(start, end)
    if s.negated_before(lo, end) or NEGATED_AFTER_RE.match(sentence, end, hi):
        return False
    if not graded:
        return True
    level = (_severity(sentence[start:end], last=True) or s.severity_before(s.last_finding_word_end(lo, start), start)
             or s.severity_after(end, hi))
    if level is None and sentence[lo - 1:lo] == ",":  # "a large, circumferential effusion"
        m = SEVERITY_BEFORE_COMMA_RE.search(sentence, max(0, lo - 1 - SEVERITY_WIDTH), lo - 1)
        level = m and _severity(m.group("s"), last=True)
    if level is None and sentence[hi:hi + 1] == ",":  # "pericardial effusion, moderate in size"
        m = SEVERITY_AFTER_COMMA_RE.match(sentence, hi)
        level = m and _severity(m.group("s"), last=True)
    return level == "high"


SIZE_RE = re.compile(r"(?<![<\d.])(?<!< )(?<!less than )(\d+(?:\.\d+)?)\s*(cm|mm)\b")  # "< 2.1 cm" is no size


class _Compiled:
    """A Finding with its regular expressions compiled, alternatives joined so each is one scan."""

    def __init__(self, f: Finding):
        def joined(patterns):
            return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

        self.words = re.compile(f.words)
        self.phrases = [(p, graded) for p, graded in ((joined(f.graded), True), (joined(f.present), False)) if p]
        self.bare, self.graded, self.at_least_cm = joined([f.bare] if f.bare else []), bool(f.graded), f.at_least_cm
        self.about_names, self.about = f.about, joined([STRUCTURES[s] for s in f.about])
        self.blockers = joined([STRUCTURES[s] for s in f.blocked_by if s not in f.about])


def _stated(f: _Compiled, section: str | None, s: _Sentence) -> bool:
    sentence = s.text
    for pattern, graded in f.phrases:
        if any(_affirmed(s, m.start(), m.end(), graded) for m in pattern.finditer(sentence)):
            return True
    named = f.about.search(sentence) if f.about else None
    if not (named or SECTION_STRUCTURE.get(section) in f.about_names):
        return False
    if f.bare:
        for m in f.bare.finditer(sentence):
            lo, hi = s.clause(m.start(), m.end())
            if f.blockers and s.names_blocker(f.blockers, lo, hi):
                continue
            if _affirmed(s, m.start(), m.end(), f.graded):
                return True
    if f.at_least_cm is not None:
        size = SIZE_RE.search(sentence, named.end() if named else 0)
        if size and float(size.group(1)) * (0.1 if size.group(2) == "mm" else 1.0) >= f.at_least_cm:
            return True
    return False


def _value_patterns(v: Value) -> list[list[re.Pattern]]:
    """Per key group: the number with its unit, and (where allowed) a number right after the key without one."""
    groups = []
    for key in v.keys:
        forms = [re.compile(rf"(?:{key}){_GAP}{NUMBER}\s*(?:{v.unit})")]
        if v.unit_optional:
            forms.append(re.compile(rf"(?:{key})[^\d%]{{0,40}}?{NUMBER}(?=\s*(?:$|[,(]))"))
        groups.append(forms)
    return groups


def _value(groups: list[list[re.Pattern]], low: float, high: float, sents) -> float | None:
    for forms in groups:
        for _, sentence in sents:
            found = [m for form in forms for m in [form.search(sentence)] if m]
            if found:
                # the number nearest the key: "EF 55 +/- 5%" is 55, not 5
                m = min(found, key=lambda m: m.start("a"))
                value = (float(m["a"]) + float(m["b"])) / 2 if m["b"] else float(m["a"])
                return value if low <= value <= high else None
    return None


class Rules:
    """Our rule tables, compiled. extract_labels() uses RULES; build a Rules from edited tables to try a variant."""

    def __init__(self, findings: dict[str, Finding], values: dict[str, Value]):
        self.findings, self.values = findings, values
        self._findings = {t: _Compiled(f) for t, f in findings.items()}
        self._values = {t: (_value_patterns(v), v.low, v.high) for t, v in values.items()}

    def labels(self, text: str) -> dict:
        sents = sentences(text)
        whole = "\n".join(s for _, s in sents)
        starts = list(itertools.accumulate((len(s) + 1 for _, s in sents), initial=0))
        out = {t: None for t in TRAITS}
        candidates = {}  # words regex -> sentences it occurs in; several findings share one
        read: dict[int, _Sentence] = {}  # sentence index -> the sentence read once, for every finding that looks at it

        def sentence(i: int) -> _Sentence:
            if i not in read:
                read[i] = _Sentence(sents[i][1])
            return read[i]

        for trait, f in self._findings.items():
            # one search over the whole report picks the few sentences worth a closer look
            if f.words not in candidates:
                candidates[f.words] = sorted({bisect.bisect_right(starts, m.start()) - 1 for m in f.words.finditer(whole)})
            out[trait] = int(any(_stated(f, sents[i][0], sentence(i)) for i in candidates[f.words]))
        for trait, (groups, low, high) in self._values.items():
            out[trait] = _value(groups, low, high, sents)
        return out


RULES = Rules(FINDINGS, VALUES)


def extract_labels(text: str, rules=None) -> dict[str, int | float | None]:
    """trait -> 0/1 (binary; not mentioned = 0) or a float / None (continuous, None = not stated).

    rules: None for our rules (RULES), or what echoprime.load_echoprime_rules() returned. A trait the rules do not
    cover is None.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_labels expects the report as a str, got {type(text).__name__}")
    return (rules or RULES).labels(text)
