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

The pickle is read with an allow-list unpickler: a list of reports needs containers, numbers, strings and
numpy/pandas reconstruction, so anything else (os.system, eval, arbitrary classes) is refused.
"""

import json
import pickle
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

RELEASE = "v1.0.0"
PHRASES = Path("assets") / "all_phr.json"
CANDIDATES = Path("model_data") / "candidates_data"
STUDIES_CSV = CANDIDATES / "candidate_studies.csv"
REPORTS_PKL = CANDIDATES / "candidate_reports.pkl"
EMBEDDING_FILES = (CANDIDATES / "candidate_embeddings_p1.pt", CANDIDATES / "candidate_embeddings_p2.pt")
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
_BUILTINS = {("builtins", c) for c in ("list", "tuple", "dict", "set", "frozenset", "int", "float", "complex", "bool",
                                       "str", "bytes", "bytearray", "slice")}
_BUILTINS |= {("collections", "OrderedDict")}
ALLOWED_GLOBALS = frozenset(_NUMPY | _PANDAS | _BUILTINS)


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS: unpickling can then build data, never run code."""

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"the pickle asks for the global {module}.{name}, which a list of reports never "
                                    f"needs; refusing to load it (is it really the EchoPrime release file?)")
        return super().find_class(module, name)


def load_pickle(path: str | Path):
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
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
