"""A report as (section, sentence) pairs: the reader under the label extractor (echovlm.clinical) and the
contradiction checker (echovlm.consistency), so both cut a report the same way.

A line "<Section>: ..." (one of the report sections of echovlm/vocabulary.py) starts a section; "[SEP]" also
ends one. A line break ends a sentence unless the next line starts in lower case (a wrapped line). Sentences
end at . ; ! ? (not at the point of "2.3 cm"), and where a phrase without a full stop runs into the next one.
Case, spaces and dashes are normalised ("Moderate-to-severe" -> "moderate to severe"), and AS / MS / TS in
capitals read as the stenoses.
"""

import re

from echovlm.vocabulary import SECTIONS

_HEADER_RE = re.compile(r"^(" + "|".join(re.escape(s) for s in SECTIONS) + r")\s*:\s*", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[;!?]|\.(?!\d)")
SEP_RE = re.compile(r"\[sep\]", re.IGNORECASE)


_NORMALISE = [(re.compile(p), r) for p, r in [
    (r"(?<=[a-z])-(?=[a-z])", " "),  # moderate-to-severe, stent-valve
    (r"(?<=[a-z])/(?=mild|moderate|severe|small|large)", " to "),  # mild/moderate
    (r"mm\s*hg", "mmhg"),
    (r"tricuspid aortic valve", "trileaflet aortic valve"),  # morphology, not the tricuspid valve
    (r"between (\d+(?:\.\d+)?)\s*%? and (\d)", r"\1 to \2"),  # "between 50 and 55%" is a range
    (r"\s+", " "),
]]


def normalise(text: str) -> str:
    t = text.lower().replace("\u2013", "-").replace("\u2014", "-").replace("`", "'").replace("\u2019", "'")
    for pattern, replacement in _NORMALISE:
        t = pattern.sub(replacement, t)
    return t.strip()


# words after which a capitalised word is not a new sentence ("mild to Moderate", "by Simpson's")
_RUN_ON_KEEPERS = {"a", "an", "the", "to", "of", "and", "or", "nor", "with", "without", "by", "than", "is", "are",
                   "was", "were", "be", "at", "in", "on", "from", "for", "as", "into", "per", "via", "post", "no", "not",
                   "very", "mm"}


_BEFORE_CAPITAL_RE = re.compile(r"(?<!\S)(\S+)(?= [A-Z][a-z])")


def _split_run_ons(line: str) -> str:
    """Put a full stop where a phrase without one runs into the next: 'No tricuspid stenosis There is ...'.

    Report phrases are often joined without punctuation; the tell is a capitalised word after a word that
    is not capitalised itself (a name, "Simpson's Biplane") and is not a function word ("mild to Moderate")."""
    def stop(m):
        w = m.group(1)
        ends = not w[0].isupper() and (w[-1].isalnum() or w[-1] in "%)") and w not in _RUN_ON_KEEPERS
        return w + "." if ends else w

    return _BEFORE_CAPITAL_RE.sub(stop, line)


_STENOSIS_ABBREVIATIONS = {"AS": "aortic stenosis", "MS": "mitral stenosis", "TS": "tricuspid stenosis"}
_STENOSIS_ABBREVIATION_RE = re.compile(r"\b(?:AS|MS|TS)\b")


def _expand_abbreviations(line: str) -> str:
    """AS / MS / TS in capitals are stenoses; not in an all-capitals line, where AS is the word 'as'."""
    if line.upper() == line:
        return line
    return _STENOSIS_ABBREVIATION_RE.sub(lambda m: _STENOSIS_ABBREVIATIONS[m.group()], line)


def sentences(text: str) -> list[tuple[str | None, str]]:
    """(section or None, normalised sentence) pairs in report order."""
    lines: list[tuple[str | None, list[str]]] = []
    section = None
    for raw in SEP_RE.sub("\n", text).splitlines():
        line = raw.strip()
        if not line:
            continue
        header = _HEADER_RE.match(line)
        if header:
            section, line = header.group(1).lower(), line[header.end():]
            lines.append((section, [line]))
        elif lines and line[0].islower():  # a wrapped line continues its sentence
            lines[-1][1].append(line)  # joined once below: joining here copies the line again per wrap (quadratic)
        else:
            lines.append((section, [line]))
    out = []
    for section, parts in lines:
        line = " ".join(parts)
        out += [(section, s.strip()) for s in _SENTENCE_END_RE.split(normalise(_split_run_ons(_expand_abbreviations(line)))) if s.strip()]
    return out
