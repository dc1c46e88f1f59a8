"""Read the EchoPrime release (on the user's machine; never copied into this repository) as studies, reports
and L2-normalised study embeddings.

The release stores each report as a sequence of (section_index, phrase_index, value) triples over the phrase
table assets/all_phr.json ({section: {subheading: [phrase, ...]}}): section_index counts the sections in file
order, phrase_index counts that section's phrases with all subheading lists concatenated in file order, and
the phrase's <numerical> / <string> placeholders are filled with str(value). Consecutive triples of one section
form one line "<Section>: phrase phrase ..." (EchoPrime joins sections with [SEP]; we use newlines).

    python -m scripts.fetch_echoprime --dest ../EchoPrime      # downloads the release
    release = EchoPrimeRelease("../EchoPrime")
    for report in release.iter_reports(): ...
    for block in release.iter_embeddings(65536): ...          # (rows, 512) float32, L2-normalised

load_echoprime_rules() reads the checkout's phrase rules (assets/per_section.json) for extract_labels(text,
rules=...) in echovlm/clinical.py, for numbers comparable with EchoPrime's published tables.

The pickle is read with an allow-list unpickler: a list of reports needs containers, numbers, strings and
numpy/pandas reconstruction, so anything else (os.system, eval, arbitrary classes) is refused.
"""

import json
import math
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from echovlm.clinical import VALUES
from echovlm.sentences import SEP_RE
from echovlm.vocabulary import TRAITS

try:
    import resource  # POSIX only
except ImportError:
    resource = None

# The release's layout under an EchoPrime checkout: the one home of these names (fetch_echoprime downloads and
# checks them, this reader and the video encoder read them).
RELEASE = "v1.0.0"
PUBLISHED_STUDIES = 1_230_676  # the count the release's authors state; fetch_echoprime notes a different one
EMBED_DIM = 512  # the width of the release's study embeddings and of the video encoder's output
PHRASES = Path("assets") / "all_phr.json"
PHRASE_RULES = Path("assets") / "per_section.json"  # read by load_echoprime_rules, not by the dataset
MODEL_DATA = Path("model_data")  # unpacked from the release asset model_data.zip
CANDIDATES = MODEL_DATA / "candidates_data"
STUDIES_CSV = CANDIDATES / "candidate_studies.csv"
REPORTS_PKL = CANDIDATES / "candidate_reports.pkl"
EMBEDDING_FILES = (CANDIDATES / "candidate_embeddings_p1.pt", CANDIDATES / "candidate_embeddings_p2.pt")  # also assets
WEIGHTS = MODEL_DATA / "weights"
ENCODER_WEIGHTS = WEIGHTS / "echo_prime_encoder.pt"
VIEW_CLASSIFIER_WEIGHTS = WEIGHTS / "view_classifier.pt"
EXAMPLE_STUDY = MODEL_DATA / "example_study"
PLACEHOLDERS = ("<numerical>", "<string>")
FETCH_HINT = "it comes with the EchoPrime release: run `python -m scripts.fetch_echoprime --dest {dir}`"


class EchoPrimeError(ValueError):
    pass


class UnsafePickleError(EchoPrimeError):
    pass


# every global a pickled list/Series/DataFrame of report triples can name, across numpy 1/2 and pandas 1-3
_NUMPY = {("numpy", "ndarray"), ("numpy", "dtype")}
_NUMPY |= {(m, f) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for f in ("_reconstruct", "scalar")}
_NUMPY |= {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
_PANDAS = {("pandas", c) for c in ("Series", "DataFrame", "Index", "RangeIndex", "StringDtype")}
_PANDAS |= {("pandas.core.series", "Series"), ("pandas.core.frame", "DataFrame"),
            ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
            ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.internals.managers", "BlockManager"),
            ("pandas.core.internals.managers", "SingleBlockManager"), ("pandas.core.internals.blocks", "new_block"),
            ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.internals", "BlockPlacement"),
            ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"), ("pandas.arrays", "StringArray"),
            ("pandas.core.arrays.string_", "StringArray"), ("pandas.core.arrays.string_", "StringDtype")}
# not bytes/bytearray: the format has none (a pickle's bytes are opcodes), and bytearray(20e9) fills 20 GB
_BUILTINS = {("builtins", c) for c in ("list", "tuple", "dict", "set", "frozenset", "int", "float", "complex", "bool",
                                       "str", "slice")}
_BUILTINS |= {("collections", "OrderedDict")}
ALLOWED_GLOBALS = frozenset(_NUMPY | _PANDAS | _BUILTINS)


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS: unpickling can then build data, never run code."""

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"the pickle asks for the global {module}.{name}, which a list of reports never "
                                    f"needs; refusing to load it (is it really the EchoPrime release file?)")
        return super().find_class(module, name)


# The allow-list still lets a few bytes of pickle ask for gigabytes (numpy's _reconstruct with a huge shape, a
# Series broadcast over RangeIndex(0, 10**10)), so unpickling runs under a cap on the data segment. The release's
# lists of (int, int, float) triples take ~8x their pickled size in memory (measured for protocols 2-5); 32x plus
# 1 GiB leaves room for any real reports file and turns a hostile one's request into a MemoryError.
PICKLE_MEMORY_FACTOR = 32
PICKLE_MEMORY_SLACK = 1 << 30


def _data_segment() -> int | None:
    """Bytes of the process's data segment (what RLIMIT_DATA limits), None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return None


@contextmanager
def memory_cap(extra: int):
    """Let the process's data segment grow by at most `extra` bytes inside the block (Linux: RLIMIT_DATA counts
    every private allocation, malloc's mmaps included; elsewhere nothing is capped). A larger allocation fails
    at once with MemoryError, without touching the memory."""
    used = _data_segment()
    if resource is None or used is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = used + extra
    if soft != resource.RLIM_INFINITY and soft <= cap:  # already tighter: never loosen a user's limit
        yield
        return
    resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def load_pickle(path: str | Path):
    size = Path(path).stat().st_size
    extra = PICKLE_MEMORY_FACTOR * size + PICKLE_MEMORY_SLACK
    with open(path, "rb") as f:
        try:
            with memory_cap(extra):
                return RestrictedUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except MemoryError:
            raise EchoPrimeError(f"{path} asks for more than {extra / 2 ** 30:.1f} GiB of memory to unpickle, far more "
                                 f"than a reports file of {size:,} bytes needs; refusing it (damaged, or not the "
                                 f"EchoPrime release file)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as e:
            raise EchoPrimeError(f"{path} cannot be read as a pickled list of reports ({type(e).__name__}: {e}); "
                                 f"the file is damaged or not from the EchoPrime release") from None


def load_phrases(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Section names in file order and, per section, its phrases flattened over subheadings in file order."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EchoPrimeError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise EchoPrimeError(f"{path}: expected {{section: {{subheading: [phrase, ...]}}}}")
    sections, phrases = [], []
    for section, groups in table.items():
        if not all(isinstance(g, list) and all(isinstance(p, str) for p in g) for g in groups.values()):
            raise EchoPrimeError(f"{path}: section {section!r} holds something other than lists of phrase strings")
        sections.append(section)
        phrases.append([p for g in groups.values() for p in g])
    return sections, phrases


def _checked(triple, sections: list[str], phrases: list[list[str]], report: int):
    """The slow path of decode_report: convert float-typed indices, or say exactly what is wrong."""
    if len(triple) != 3:
        raise EchoPrimeError(f"report {report}: expected (section, phrase, value) triples, found {tuple(triple)!r}")
    s, p, value = triple
    for x, what, limit in ((s, "section index", len(sections)), (p, "phrase index", None)):
        limit = limit if limit is not None else len(phrases[int(s)])
        try:
            bad = int(x) != x or not 0 <= int(x) < limit
        except (TypeError, ValueError):
            bad = True
        if bad:
            where = "" if what == "section index" else f" of section {sections[int(s)]!r}"
            raise EchoPrimeError(f"report {report}: {what}{where} {x!r} is not an index below {limit}; the reports "
                                 f"pickle does not match the phrase table")
    return int(s), int(p), value, phrases[int(s)][int(p)]


def decode_report(triples, sections: list[str], phrases: list[list[str]], report: int = 0) -> str:
    """One report's (section_index, phrase_index, value) triples -> "<Section>: phrase ..." lines."""
    lines, current = [], None
    for triple in triples:
        # fast path for the plain-int triples of the release (1.2M reports x ~25 triples); anything else is checked
        try:
            s, p, value = triple
            if s < 0 or p < 0:  # negative indices would silently count from the end
                raise IndexError
            phrase = phrases[s][p]
        except (ValueError, IndexError, TypeError):
            s, p, value, phrase = _checked(triple, sections, phrases, report)
        if "<" in phrase:
            for placeholder in PLACEHOLDERS:
                phrase = phrase.replace(placeholder, str(value))
        if s != current:
            lines.append([f"{sections[s]}:"])
            current = s
        lines[-1].append(phrase)
    return "\n".join(" ".join(words) for words in lines)


def _load_tensor(path: Path) -> torch.Tensor:
    refetch = "delete it and fetch it again"
    try:
        t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise EchoPrimeError(f"{path} cannot be loaded as a tensor file ({e}); {refetch}") from None
        t = None  # a legacy (non-zip) file cannot be mapped: loaded below, outside this handler
    except pickle.UnpicklingError:  # torch's message invites weights_only=False, which would run the file's code
        raise EchoPrimeError(f"{path} is not a plain tensor file (it holds other Python objects, not loaded); "
                             f"{refetch}") from None
    if t is None:
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise EchoPrimeError(f"{path} is not a plain tensor file (a legacy-format file holding other Python "
                                 f"objects, not loaded); {refetch}") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise EchoPrimeError(f"{path} is a legacy-format torch file that cannot be loaded ({e}); {refetch}") from None
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise EchoPrimeError(f"{path}: expected a 2-D float tensor (studies, dim), found {shape}")
    return t


class EchoPrimeRelease:
    """The release under an EchoPrime checkout. Opening it reads the study list and maps the embeddings (cheap);
    the reports pickle is loaded the first time reports are asked for."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = [self.root / PHRASES, self.root / STUDIES_CSV, self.root / REPORTS_PKL]
        self.files += [self.root / f for f in EMBEDDING_FILES]
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"missing {f}: {FETCH_HINT.format(dir=self.root)}")
        self.sections, self.phrases = load_phrases(self.files[0])
        try:
            csv = pd.read_csv(self.files[1], usecols=["Study"], dtype=str, keep_default_na=False)
        except ValueError as e:
            raise EchoPrimeError(f"{self.files[1]}: expected a column 'Study' ({e})") from None
        self.studies = csv["Study"].tolist()
        self.parts = [_load_tensor(f) for f in self.files[3:]]
        dims = {t.shape[1] for t in self.parts}
        if len(dims) != 1:
            raise EchoPrimeError("the embedding files disagree on width: "
                                 + ", ".join(f"{f.name} {tuple(t.shape)}" for f, t in zip(self.files[3:], self.parts)))
        self.embed_dim = dims.pop()
        rows = sum(len(t) for t in self.parts)
        if rows != len(self.studies):
            raise EchoPrimeError(f"{' + '.join(f'{len(t):,}' for t in self.parts)} = {rows:,} embedding rows in "
                                 f"{', '.join(f.name for f in self.files[3:])} but {len(self.studies):,} studies in "
                                 f"{self.files[1]}: one of them is damaged or from another release")
        self._reports = None

    @property
    def n_studies(self) -> int:
        return len(self.studies)

    @property
    def reports_raw(self) -> list:
        """The encoded reports (list of triple sequences), loaded once and checked against the study count."""
        if self._reports is None:
            raw = load_pickle(self.files[2])
            if isinstance(raw, pd.DataFrame):
                if raw.shape[1] != 1:
                    raise EchoPrimeError(f"{self.files[2]} holds a table with columns {list(raw.columns)}; expected "
                                         f"one report per row")
                raw = raw.iloc[:, 0]
            if isinstance(raw, pd.Series):
                raw = raw.tolist()
            if not isinstance(raw, (list, tuple)):
                raise EchoPrimeError(f"{self.files[2]} holds a {type(raw).__name__}, expected a list of reports")
            if len(raw) != self.n_studies:
                raise EchoPrimeError(f"{self.files[2]} holds {len(raw):,} reports but {self.files[1]} lists "
                                     f"{self.n_studies:,} studies: one of them is damaged or from another release")
            bad = next((i for i, r in enumerate(raw) if isinstance(r, (str, bytes)) or not hasattr(r, "__iter__")), None)
            if bad is not None:
                raise EchoPrimeError(f"{self.files[2]}: report {bad} is a {type(raw[bad]).__name__}, not a sequence of "
                                     f"(section, phrase, value) triples; the file is damaged or not from the release")
            self._reports = raw
        return self._reports

    def iter_reports(self):
        """Decoded report texts in study order (decoded one at a time: the texts are never all held at once)."""
        for i, triples in enumerate(self.reports_raw):
            yield decode_report(triples, self.sections, self.phrases, report=i)

    def iter_embeddings(self, block: int = 65_536):
        """(rows, D) float32 L2-normalised blocks in study order."""
        for t in self.parts:
            for start in range(0, len(t), block):
                x = t[start:start + block].float()
                yield F.normalize(x, dim=1).numpy()


# ------------------------------------------------------------------ EchoPrime's phrase rules (assets/per_section.json)


def _flat(text: str) -> str:
    return " ".join(text.lower().split())


class PhraseRules:
    """EchoPrime's rules, read from its per_section.json: a binary trait is positive when any of its phrases
    occurs in the report (case-insensitive substring, no negation or severity logic: the phrases carry it,
    e.g. a leading ". " keeps "mild to moderate" out); a regression trait is the number right after the text
    before "<#>" in one of its phrases, None outside the file's "range". As in EchoPrime, report and phrases
    are compared in lower case; in addition runs of whitespace (our line breaks between sections included)
    count as one space, and a phrase's surrounding spaces are dropped so that it also matches at the end of
    a report. Traits the file does not define are None, so they drop out of scoring as unsettled."""

    def __init__(self, binary: dict[str, list[str]], regression: dict[str, tuple[list[str], float, float]],
                 ignored: list[str], source: str):
        self.binary = {t: [_flat(p) for p in ps] for t, ps in binary.items()}
        self.regression = {t: ([re.compile(re.escape(_flat(p.split("<#>")[0])) + r"\s*(\d{1,3}(?:\.\d{1,2})?)")
                                for p in ps], low, high) for t, (ps, low, high) in regression.items()}
        self.ignored, self.source = ignored, source

    def labels(self, text: str) -> dict:
        flat = " " + _flat(SEP_RE.sub(" ", text)) + " "
        out = {t: None for t in TRAITS}
        for trait, phrases_ in self.binary.items():
            out[trait] = int(any(p in flat for p in phrases_))
        for trait, (patterns, low, high) in self.regression.items():
            m = next((m for p in patterns for m in [p.search(flat)] if m), None)
            out[trait] = float(m.group(1)) if m and low <= float(m.group(1)) <= high else None
        return out


def load_echoprime_rules(path) -> PhraseRules:
    """Read EchoPrime's assets/per_section.json (the file, or the checkout that holds it) from your machine.

    The file stays where it is: its phrases are EchoPrime's and are never copied into this repository.
    Entries for traits echovlm does not score are skipped and listed in .ignored. A file that cannot label
    anything echovlm scores (no such trait, a malformed entry, a range that is not two finite numbers) is
    refused with a one-line ValueError (FileNotFoundError for a missing file), so every caller (rl_train,
    test_inference, speedrun.sh's check before its first step) stops before any work instead of training or
    scoring on labels that are all None.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PHRASE_RULES
    if not path.is_file():
        raise FileNotFoundError(f"EchoPrime rules: {path} does not exist. Pass assets/per_section.json of an EchoPrime "
                                f"checkout (python -m scripts.fetch_echoprime --dest DIR makes one) or the checkout itself.")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"EchoPrime rules: {path} is not valid JSON ({e}); re-fetch the file.") from None
    if not isinstance(table, dict):
        raise ValueError(f"EchoPrime rules: {path} should hold an object trait -> {{mode, label_sources}}, "
                         f"found a {type(table).__name__}")
    binary, regression, ignored = {}, {}, []
    for trait, entry in table.items():
        if trait not in TRAITS:
            ignored.append(trait)
            continue
        where = f"EchoPrime rules: {path}, trait {trait!r}"
        if not isinstance(entry, dict) or entry.get("mode") not in ("binary", "regression"):
            raise ValueError(f"{where}: needs a 'mode' of 'binary' or 'regression'")
        sources = entry.get("label_sources")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and s.strip() for s in sources):
            raise ValueError(f"{where}: 'label_sources' must be a non-empty list of non-empty strings")
        expected = "binary" if TRAITS[trait] == "binary" else "regression"
        if entry["mode"] != expected:
            raise ValueError(f"{where}: mode {entry['mode']!r}, but echovlm scores it as {TRAITS[trait]} ({expected})")
        if expected == "binary":
            binary[trait] = sources
            continue
        if not all("<#>" in s for s in sources):
            raise ValueError(f"{where}: every regression label source needs a '<#>' where the number goes")
        if not all(s.split("<#>")[0].strip() for s in sources):
            # with nothing to anchor it, the rule would read the first number anywhere in the report
            raise ValueError(f"{where}: every regression label source needs text before its '<#>'")
        value_range = entry.get("range", [VALUES[trait].low, VALUES[trait].high])
        # json reads NaN and Infinity, and a bool is an int to Python: [NaN, 100] made every value None
        if (not isinstance(value_range, list) or len(value_range) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                           for x in value_range) or value_range[0] >= value_range[1]):
            raise ValueError(f"{where}: 'range' must be [low, high], two finite numbers with low < high, got "
                             f"{json.dumps(value_range)}")
        regression[trait] = (sources, float(value_range[0]), float(value_range[1]))
    if not binary and not regression:
        # labelling with such a file leaves every trait None: the reward would be the contradiction penalty alone
        # and the evaluation would score nothing
        listed = f" (it lists {', '.join(map(repr, ignored[:5]))}{', ...' if len(ignored) > 5 else ''})" if ignored else ""
        raise ValueError(f"EchoPrime rules: {path} defines none of the traits echovlm scores{listed}; pass EchoPrime's "
                         f"assets/per_section.json")
    return PhraseRules(binary, regression, ignored, str(path))
