"""Judge-free metrics for generated ECG interpretations against references.

Three families, each computed per record and aggregated over a test set:

* Diagnosis statements. A statement vocabulary is built from the PhysioNet Challenge 2021
  `dx_mapping_*.csv` names/abbreviations and the PTB-XL `scp_statements.csv` descriptions; names are
  normalised (case, hyphens, plurals, ordinals, British spelling) and clinical synonyms are merged
  (e.g. "left atrial abnormality" = "left atrial enlargement", CRBBB = RBBB, PVC = VPB as in the
  Challenge's equivalence classes). In a text the longest statement phrase wins ("sinus
  tachycardia", not "tachycardia"); a statement under negation ("no evidence of ...", "without ...",
  "... is absent") is not counted, nor is one qualified by "otherwise" ("otherwise normal ECG").
  Precision / recall / F1 of generated vs reference statements,
  micro (pooled counts), macro (mean over statements seen in references or predictions) and
  per-record mean.
* Numbers the text states: heart rate (bpm) and PR, QRS, QT, QTc (ms; seconds are converted).
  Absolute error where both generated text and reference have a value, plus how often the generated
  text states a number the reference has.
* Lead coverage: fraction of the 12 leads the generated text mentions ("V1-V3", "II, III and aVF",
  "lead I", optionally named groups such as "inferior leads"); also recall of leads the reference
  mentions.

Trivial baselines (`baseline_reports`): always the most common reference statement, always the mean
reference heart rate (and mean intervals).

    vocab = StatementVocabulary.default()
    metrics = evaluate_reports(generated_texts, [Reference(text=...) for ...], vocab)
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import os
import re
from typing import Iterable, Mapping, Sequence

from uniecg_jax.data import bundled_samples_dir
from uniecg_jax.data.record import LEADS

MEASUREMENTS = ("heart_rate", "pr", "qrs", "qt", "qtc")
UNITS = {"heart_rate": "bpm", "pr": "ms", "qrs": "ms", "qt": "ms", "qtc": "ms"}

# --------------------------------------------------------------------------- text normalisation

_WORD_REWRITES = {
    "1st": "first", "2nd": "second", "3rd": "third", "ischaemia": "ischemia",
    "ischaemic": "ischemic", "atrioventricular": "av", "qwave": "q wave", "wolf": "wolff",
}
_PLURALS = {"waves": "wave", "contractions": "contraction", "complexes": "complex", "beats": "beat",
            "voltages": "voltage", "inversions": "inversion", "abnormalities": "abnormality",
            "changes": "change", "blocks": "block", "intervals": "interval", "ectopics": "ectopic"}

# Phrase-level synonyms, applied to normalised text and to vocabulary names (longest first).
_SYNONYMS = {
    "normal sinus rhythm": "sinus rhythm",
    "nonspecific": "nonspecific", "non specific": "nonspecific",
    "afib": "atrial fibrillation", "a fib": "atrial fibrillation",
    "first degree av block": "first degree av block",
    "complete right bundle branch block": "right bundle branch block",
    "complete left bundle branch block": "left bundle branch block",
    "left atrial abnormality": "left atrial enlargement",
    "left atrial overload enlargement": "left atrial enlargement",
    "left atrial overload": "left atrial enlargement",
    "right atrial abnormality": "right atrial enlargement",
    "right atrial overload enlargement": "right atrial enlargement",
    "right atrial overload": "right atrial enlargement",
    "premature ventricular contraction": "ventricular premature beat",
    "premature ventricular complex": "ventricular premature beat",
    "ventricular premature complex": "ventricular premature beat",
    "premature atrial contraction": "supraventricular premature beat",
    "premature atrial complex": "supraventricular premature beat",
    "atrial premature complex": "supraventricular premature beat",
    "atrial premature beat": "supraventricular premature beat",
    "long qt interval": "prolonged qt interval", "long qt": "prolonged qt interval",
    "prolonged qtc interval": "prolonged qt interval", "prolonged qtc": "prolonged qt interval",
    "qt prolongation": "prolonged qt interval",
    "low qrs voltage in the frontal and horizontal lead": "low qrs voltage",
    "inverted t wave": "t wave inversion",
    "t wave abnormality": "t wave abnormal", "abnormal t wave": "t wave abnormal",
    "abnormal q wave": "q wave abnormal", "pathological q wave": "q wave abnormal",
    "wolff parkinson white syndrome": "wolff parkinson white pattern",
    "wolff parkinson white": "wolff parkinson white pattern",
    "third degree av block": "complete heart block",
}

_ABBREVIATION_STOPLIST = {"PR", "SA", "CD", "HF", "AB", "CR", "FB", "JE", "AH", "AP", "TIA", "NORM",
                          "PACE", "DIG", "EL", "ALR"}
_ABBREVIATION_ALLOW_SHORT = {"AF", "MI"}


def _rewrite_words(text: str) -> str:
    words = [_WORD_REWRITES.get(w, w) for w in text.split(" ")]
    words = [_PLURALS.get(w, w) for w in words]
    return " ".join(words)


def _apply_synonyms(text: str) -> str:
    for phrase in sorted(_SYNONYMS, key=len, reverse=True):
        target = _SYNONYMS[phrase]
        if phrase != target:
            text = re.sub(rf"(?<![a-z0-9]){re.escape(phrase)}(?![a-z0-9])", target, text)
    return text


def normalize_text(text: str) -> str:
    """Lowercase; hyphens and slashes between words become spaces; sentence punctuation (. , ; :)
    is kept as separate tokens; plurals, ordinals and synonyms are canonicalised."""
    text = text.lower().replace("\u2013", "-").replace("\u2014", "-")
    text = re.sub(r"\([^)]*\)", " ", text)            # parentheticals: "(block)", "(former EDIS)"
    text = re.sub(r"(?<=[a-z0-9])[-/&](?=[a-z0-9])", " ", text)
    text = re.sub(r"(\d)\.(\d)", r"\1<dot>\2", text)  # protect decimals from the sentence split
    text = re.sub(r"([.,;:!?\n])", r" \1 ", text).replace("\n", ";")
    text = re.sub(r"[^a-z0-9<>.,;:!? ]", " ", text).replace("<dot>", ".")
    text = re.sub(r"\s+", " ", text).strip()
    return _apply_synonyms(_rewrite_words(text))


def _canonical_name(name: str) -> str:
    """A vocabulary name -> its statement id (normalised, synonyms applied, punctuation dropped)."""
    return " ".join(re.sub(r"[.,;:!?]", " ", normalize_text(name)).split())


# --------------------------------------------------------------------------- vocabulary

@dataclasses.dataclass
class StatementVocabulary:
    """Diagnosis statements: id (canonical phrase) -> source codes; abbreviation -> id."""
    statements: dict[str, set[str]]
    abbreviations: dict[str, str]
    code_to_statement: dict[str, str]

    def __post_init__(self):
        phrases = sorted(self.statements, key=len, reverse=True)
        self._pattern = re.compile(
            r"(?<![a-z0-9])(" + "|".join(re.escape(p) for p in phrases) + r")(?![a-z0-9])")
        abbrs = sorted(self.abbreviations, key=len, reverse=True)
        self._abbr_pattern = re.compile(
            r"(?<![A-Za-z0-9])(" + "|".join(re.escape(a) for a in abbrs) + r")(?![A-Za-z0-9])"
        ) if abbrs else None

    @classmethod
    def from_files(cls, dx_mapping_csvs: Sequence[str | os.PathLike] = (),
                   scp_statements_csv: str | os.PathLike | None = None) -> "StatementVocabulary":
        """Builds from Challenge dx tables (Dx, SNOMEDCTCode, Abbreviation) and/or PTB-XL SCP
        statements (code in the first column, `description`)."""
        statements: dict[str, set[str]] = collections.defaultdict(set)
        abbreviations: dict[str, str] = {}
        codes: dict[str, str] = {}

        def add(name: str, code: str, abbreviation: str | None) -> None:
            statement = _canonical_name(name)
            if not statement:
                return
            statements[statement].add(code)
            codes[code] = statement
            for abbr in (abbreviation or "").split("/"):
                abbr = abbr.strip().rstrip("_")
                usable = (len(abbr) >= 3 or abbr in _ABBREVIATION_ALLOW_SHORT) and \
                    re.fullmatch(r"[A-Za-z0-9]+", abbr) and abbr not in _ABBREVIATION_STOPLIST
                if usable and abbr not in abbreviations:
                    abbreviations[abbr] = statement
                    codes.setdefault(abbr, statement)

        for path in dx_mapping_csvs:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    add(row["Dx"], row["SNOMEDCTCode"], row.get("Abbreviation"))
        if scp_statements_csv is not None:
            with open(scp_statements_csv, newline="") as f:
                reader = csv.reader(f)
                header = next(reader)
                column = header.index("description")
                for row in reader:
                    code = row[0]
                    add(row[column], code, code if code.isupper() or code[0].isdigit() else None)
        return cls(dict(statements), abbreviations, codes)

    @classmethod
    def default(cls, directory: str | os.PathLike | None = None) -> "StatementVocabulary":
        """The Challenge + PTB-XL vocabulary from the bundled sample folder (or `directory`)."""
        if directory is None:
            directory = bundled_samples_dir()
        directory = os.fspath(directory)
        dx = [os.path.join(directory, n) for n in ("dx_mapping_scored.csv", "dx_mapping_unscored.csv")]
        scp = os.path.join(directory, "scp_statements.csv")
        return cls.from_files([p for p in dx if os.path.exists(p)],
                              scp if os.path.exists(scp) else None)

    def expand_abbreviations(self, text: str) -> str:
        """Case-sensitive: "AF" / "LBBB" / "STach" -> their statement phrase."""
        if self._abbr_pattern is None:
            return text
        return self._abbr_pattern.sub(lambda m: self.abbreviations[m.group(1)], text)

    def lookup(self, label: str) -> str | None:
        """A statement name, SNOMED code, SCP code or abbreviation -> statement id (or None)."""
        label = str(label).strip()
        if label in self.code_to_statement:
            return self.code_to_statement[label]
        found = extract_statements(label, self)
        return next(iter(found.present)) if len(found.present) == 1 else None


# --------------------------------------------------------------------------- statement extraction

_PRE_NEGATIONS = ("no evidence of", "no signs of", "no sign of", "no definite", "absence of",
                  "negative for", "free of", "rule out", "ruled out", "without", "not", "no",
                  "neither", "nor", "denies")
_POST_NEGATIONS = ("is absent", "are absent", "absent", "not seen", "not present", "not observed",
                   "not identified", "not evident", "is excluded", "excluded", "ruled out")
_SCOPE_TERMINATORS = ("but", "however", "although", "though", "except", "whereas", "while")
_PRE_NEG_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(_PRE_NEGATIONS) + r")(?![a-z0-9])")
_POST_NEG_RE = re.compile(r"^\s*(?:(?:is|are|was|were|clearly|definitely)\s+){0,2}(" +
                          "|".join(_POST_NEGATIONS) + r")(?![a-z0-9])")
# "Sinus bradycardia, otherwise normal ECG": a statement qualified by "otherwise" is not asserted
# (an otherwise-normal ECG is abnormal in what precedes it), nor negated.
_QUALIFIED_RE = re.compile(r"(?<![a-z0-9])otherwise\s*$")
_TERMINATOR_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(_SCOPE_TERMINATORS) + r")(?![a-z0-9])")


@dataclasses.dataclass(frozen=True)
class StatementMentions:
    present: frozenset[str]
    negated: frozenset[str]


def _negated_spans(clause: str) -> list[tuple[int, int]]:
    """Character ranges of `clause` under a preceding negation cue.

    Scope: from the cue to the end of the clause, cut at a terminator ("but", "however", ...) and at
    the next comma unless the clause is an "or"/"nor" list ("no infarction, ischemia or block")."""
    spans = []
    for cue in _PRE_NEG_RE.finditer(clause):
        end = len(clause)
        terminator = _TERMINATOR_RE.search(clause, cue.end())
        if terminator:
            end = terminator.start()
        rest = clause[cue.end():end]
        if not re.search(r"(?<![a-z])(or|nor)(?![a-z])", rest):
            comma = rest.find(",")
            if comma >= 0:
                end = cue.end() + comma
        spans.append((cue.end(), end))
    return spans


def extract_statements(text: str, vocab: StatementVocabulary) -> StatementMentions:
    """Statements asserted (and separately, negated) in `text`. A statement both asserted and
    negated somewhere counts as present."""
    normalized = normalize_text(vocab.expand_abbreviations(text))
    present, negated = set(), set()
    for clause in re.split(r"[.;:!?]", normalized):
        spans = _negated_spans(clause)
        for match in vocab._pattern.finditer(clause):
            statement = match.group(1)
            if _QUALIFIED_RE.search(clause[:match.start()]):
                continue
            is_negated = any(start <= match.start() < end for start, end in spans)
            tail = clause[match.end():].split(",")[0]
            is_negated = is_negated or bool(_POST_NEG_RE.match(tail))
            (negated if is_negated else present).add(statement)
    return StatementMentions(frozenset(present), frozenset(negated - present))


# --------------------------------------------------------------------------- numbers

_NUMBER = r"(\d+(?:\.\d+)?)"
_GAP = r"[^0-9.;\n]{0,40}?"   # words between a name and its number, within one sentence
_UNIT = r"\s*(ms|msec|milliseconds?|s|secs?|seconds?|bpm|beats?|degrees?|°|mv|mm)?"
_INTERVAL_NAMES = {
    "pr": r"\bpr(?!\s+segment)(?:\s+interval)?\b",
    "qrs": r"\bqrs(?!\s+(?:axis|voltage|amplitude))(?:\s+(?:duration|complex(?:es)?|width|"
           r"interval))?\b",
    "qtc": r"\b(?:qtc|qt\s*c|corrected\s+qt)(?:\s+interval)?\b",
    "qt": r"\bqt(?!\s*c\b)(?!c)(?![\s/]*qtc)(?:\s+interval)?\b",
}
_PLAUSIBLE = {"heart_rate": (20, 300), "pr": (40, 600), "qrs": (30, 300), "qt": (150, 800),
              "qtc": (150, 800)}
_HEART_RATE_PATTERNS = (
    re.compile(r"\b(?:heart|ventricular|pulse)\s+rate\b" + _GAP + _NUMBER),
    re.compile(r"\bhr\b" + r"[^0-9.;\n]{0,10}?" + _NUMBER),
    re.compile(_NUMBER + r"\s*(?:bpm|beats?\s*(?:per|/)\s*min(?:ute)?\b|/\s*min\b)"),
    re.compile(r"(?<!atrial )\brate\b" + _GAP + _NUMBER),
)


def _to_ms(value: float, unit: str | None) -> float | None:
    if unit in ("degree", "degrees", "°", "mv", "mm", "bpm", "beat", "beats"):
        return None
    if unit in ("s", "sec", "secs", "second", "seconds") or (unit is None and value < 3):
        return value * 1000.0
    return value


def extract_measurements(text: str) -> dict[str, float]:
    """Heart rate (bpm) and PR / QRS / QT / QTc (ms) stated in `text`; the first plausible value of
    each. "QT/QTc 380/420 ms" fills both."""
    lowered = text.lower().replace("\u2013", "-")
    found: dict[str, float] = {}
    combined = re.search(r"\bqt\s*/\s*qtc(?:\s+intervals?)?" + _GAP + _NUMBER + r"\s*/\s*" + _NUMBER +
                         _UNIT, lowered)
    if combined:
        for name, raw in (("qt", combined.group(1)), ("qtc", combined.group(2))):
            value = _to_ms(float(raw), combined.group(3))
            if value is not None and _PLAUSIBLE[name][0] <= value <= _PLAUSIBLE[name][1]:
                found[name] = value
    for name, pattern in _INTERVAL_NAMES.items():
        if name in found:
            continue
        for match in re.finditer(pattern + _GAP + _NUMBER + _UNIT, lowered):
            value = _to_ms(float(match.group(1)), match.group(2))
            if value is not None and _PLAUSIBLE[name][0] <= value <= _PLAUSIBLE[name][1]:
                found[name] = value
                break
    for pattern in _HEART_RATE_PATTERNS:
        match = next((m for m in pattern.finditer(lowered)
                      if _PLAUSIBLE["heart_rate"][0] <= float(m.group(1)) <= _PLAUSIBLE["heart_rate"][1]),
                     None)
        if match:
            found["heart_rate"] = float(match.group(1))
            break
    return found


# --------------------------------------------------------------------------- leads

_LEAD_TOKEN = re.compile(r"(?<![A-Za-z0-9])(a[Vv][RrLlFf]|AV[RLF]|[Vv][1-6]|III|II|I)(?![A-Za-z0-9])")
_LEAD_RANGE = re.compile(r"(?<![A-Za-z0-9])[Vv]([1-6])\s*(?:-|to|through|thru)\s*[Vv]?([1-6])"
                         r"(?![0-9])")
_LIST_SEPARATOR = re.compile(r"^(?:\s|,|and|or|&|/|-)*$")
_LEAD_GROUPS = {
    r"all\s+(?:12\s+|twelve\s+)?leads": LEADS,
    r"limb\s+leads": ("I", "II", "III", "aVR", "aVL", "aVF"),
    r"(?:precordial|chest)\s+leads": ("V1", "V2", "V3", "V4", "V5", "V6"),
    r"inferior\s+leads": ("II", "III", "aVF"),
    r"high\s+lateral\s+leads": ("I", "aVL"),
    r"(?<!high )(?<!antero)lateral\s+leads": ("I", "aVL", "V5", "V6"),
    r"anterolateral\s+leads": ("I", "aVL", "V3", "V4", "V5", "V6"),
    r"anteroseptal\s+leads": ("V1", "V2", "V3", "V4"),
    r"(?<!antero)septal\s+leads": ("V1", "V2"),
    r"(?<!infero)(?<!lateral )anterior\s+leads": ("V3", "V4"),
}


def _canonical_lead(token: str) -> str:
    upper = token.upper()
    if upper.startswith("AV"):
        return "aV" + upper[2]
    return upper


def extract_leads(text: str, expand_groups: bool = True) -> frozenset[str]:
    """Leads named in `text`: ranges ("V1-V4", "V2 to V5"), lists ("II, III and aVF"), single leads.

    Roman-numeral leads count only in a lead context ("lead II", or listed with an aV*/V* lead),
    so "Mobitz type II" is not lead II. `expand_groups` adds named groups ("inferior leads")."""
    leads: set[str] = set()
    for match in _LEAD_RANGE.finditer(text):
        low, high = sorted((int(match.group(1)), int(match.group(2))))
        leads.update(f"V{i}" for i in range(low, high + 1))
    tokens = list(_LEAD_TOKEN.finditer(text))
    groups: list[list[re.Match]] = []
    for token in tokens:
        if groups and _LIST_SEPARATOR.match(text[groups[-1][-1].end():token.start()]):
            groups[-1].append(token)
        else:
            groups.append([token])
    for group in groups:
        names = [_canonical_lead(t.group(1)) for t in group]
        lead_context = bool(re.search(r"\bleads?\s*$", text[:group[0].start()], re.IGNORECASE))
        has_non_roman = any(not n.strip("I") == "" for n in names)
        for name in names:
            if name.strip("I") == "" and not (lead_context or has_non_roman):
                continue
            leads.add(name)
    if expand_groups:
        lowered = text.lower()
        for pattern, members in _LEAD_GROUPS.items():
            if re.search(pattern, lowered):
                leads.update(members)
    return frozenset(leads)


# --------------------------------------------------------------------------- scoring

@dataclasses.dataclass
class Reference:
    """What a generated report is compared with. `labels` (statement names, SNOMED or SCP codes)
    override statements from `text`; `measurements` (keys in MEASUREMENTS) override numbers from
    `text`; `leads` override leads from `text`."""
    text: str = ""
    labels: Sequence[str] | None = None
    measurements: Mapping[str, float] | None = None
    leads: Sequence[str] | None = None


def _as_reference(reference: Reference | str) -> Reference:
    return reference if isinstance(reference, Reference) else Reference(text=str(reference))


def reference_statements(reference: Reference, vocab: StatementVocabulary) -> frozenset[str]:
    if reference.labels is not None:
        found = set()
        for label in reference.labels:
            statement = vocab.lookup(label)
            if statement is None:
                raise ValueError(f"reference label {label!r} is not in the statement vocabulary")
            found.add(statement)
        return frozenset(found)
    return extract_statements(reference.text, vocab).present


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision/recall/F1; an empty prediction against an empty reference scores 1."""
    precision = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    recall = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def score_record(generated: str, reference: Reference | str,
                 vocab: StatementVocabulary, expand_lead_groups: bool = True) -> dict:
    """Per-record details (JSON-able): statements, numbers and leads of both sides."""
    reference = _as_reference(reference)
    predicted = extract_statements(generated, vocab).present
    expected = reference_statements(reference, vocab)
    generated_numbers = extract_measurements(generated)
    reference_numbers = dict(reference.measurements) if reference.measurements is not None \
        else extract_measurements(reference.text)
    generated_leads = extract_leads(generated, expand_lead_groups)
    reference_leads = frozenset(reference.leads) if reference.leads is not None \
        else extract_leads(reference.text, expand_lead_groups)
    tp = len(predicted & expected)
    return {
        "predicted_statements": sorted(predicted), "reference_statements": sorted(expected),
        "tp": tp, "fp": len(predicted - expected), "fn": len(expected - predicted),
        **_prf(tp, len(predicted - expected), len(expected - predicted)),
        "generated_measurements": generated_numbers, "reference_measurements": reference_numbers,
        "generated_leads": sorted(generated_leads, key=LEADS.index),
        "reference_leads": sorted(reference_leads, key=LEADS.index),
        "lead_coverage": len(generated_leads) / len(LEADS),
    }


def aggregate(records: Sequence[dict]) -> dict:
    """Aggregates `score_record` outputs into micro / macro / per-record diagnosis scores, number
    errors and lead coverage (JSON-able)."""
    n = len(records)
    if not n:
        raise ValueError("no records to aggregate")
    tp = sum(r["tp"] for r in records)
    fp = sum(r["fp"] for r in records)
    fn = sum(r["fn"] for r in records)
    per_statement: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for r in records:
        predicted, expected = set(r["predicted_statements"]), set(r["reference_statements"])
        for s in predicted & expected:
            per_statement[s][0] += 1
        for s in predicted - expected:
            per_statement[s][1] += 1
        for s in expected - predicted:
            per_statement[s][2] += 1
    macro_scores = [_prf(*counts) for counts in per_statement.values()]
    macro = {k: (sum(s[k] for s in macro_scores) / len(macro_scores) if macro_scores else 1.0)
             for k in ("precision", "recall", "f1")}
    diagnosis = {
        "micro": {**_prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn},
        "macro": {**macro, "num_statements": len(per_statement)},
        "per_record": {k: sum(r[k] for r in records) / n for k in ("precision", "recall", "f1")},
    }
    measurements = {}
    for name in MEASUREMENTS:
        with_reference = [r for r in records if name in r["reference_measurements"]]
        pairs = [(r["generated_measurements"][name], r["reference_measurements"][name])
                 for r in with_reference if name in r["generated_measurements"]]
        errors = [abs(g - t) for g, t in pairs]
        measurements[name] = {
            "unit": UNITS[name],
            "mae": sum(errors) / len(errors) if errors else None,
            "count": len(errors),
            "stated_fraction": len(pairs) / len(with_reference) if with_reference else None,
        }
    with_ref_leads = [r for r in records if r["reference_leads"]]
    hits = [len(set(r["generated_leads"]) & set(r["reference_leads"])) for r in with_ref_leads]
    totals = [len(r["reference_leads"]) for r in with_ref_leads]
    leads = {
        "coverage": sum(r["lead_coverage"] for r in records) / n,
        "reference_recall_micro": sum(hits) / sum(totals) if totals else None,
        "reference_recall_macro": (sum(h / t for h, t in zip(hits, totals)) / len(totals)
                                   if totals else None),
    }
    return {"num_records": n, "diagnosis": diagnosis, "measurements": measurements, "leads": leads}


def evaluate_reports(generated: Sequence[str], references: Sequence[Reference | str],
                     vocab: StatementVocabulary | None = None,
                     expand_lead_groups: bool = True) -> dict:
    """All judge-free metrics of `generated[i]` vs `references[i]` (see module docstring)."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reports vs {len(references)} references")
    vocab = vocab or StatementVocabulary.default()
    return aggregate([score_record(g, r, vocab, expand_lead_groups)
                      for g, r in zip(generated, references)])


def baseline_reports(references: Sequence[Reference | str],
                     vocab: StatementVocabulary | None = None) -> list[str]:
    """The trivial baseline for every record: the most common reference statement, the mean
    reference heart rate and the mean of each reference interval (one identical text for all)."""
    vocab = vocab or StatementVocabulary.default()
    references = [_as_reference(r) for r in references]
    counts = collections.Counter()
    numbers: dict[str, list[float]] = collections.defaultdict(list)
    for reference in references:
        counts.update(reference_statements(reference, vocab))
        values = reference.measurements if reference.measurements is not None \
            else extract_measurements(reference.text)
        for name, value in values.items():
            numbers[name].append(float(value))
    # Ties break alphabetically so the baseline does not depend on record order.
    parts = [min(counts, key=lambda s: (-counts[s], s)) + "."] if counts else []
    if numbers.get("heart_rate"):
        parts.append(f"Heart rate {_mean(numbers['heart_rate']):.0f} bpm.")
    for name, label in (("pr", "PR interval"), ("qrs", "QRS duration"), ("qt", "QT interval"),
                        ("qtc", "QTc interval")):
        if numbers.get(name):
            parts.append(f"{label} {_mean(numbers[name]):.0f} ms.")
    return [" ".join(parts)] * len(references)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)
