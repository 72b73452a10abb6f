"""Cleaning filters for a pretraining corpus: one document in, one `Outcome` out.

Each stage of `lmlab data prepare` (see `prepare.py` and docs/data.md) is a callable
`text -> Outcome` built from a dataclass config whose defaults are the published values:

- `Normalizer`: Unicode normalization (NFC, or NFKC) and whitespace cleanup.
- `LanguageIdentifier`: keep documents in the wanted languages, with `langdetect` (a port of
  Shuyo's naive-Bayes character n-gram detector that ships its own profiles), seeded so that the
  same text always gets the same answer.
- `QualityFilter`: the MassiveText quality and repetition filters of Gopher (Rae et al. 2021,
  "Scaling Language Models: Methods, Analysis & Insights from Training Gopher", appendix A.1),
  optionally the line and page rules of C4 (Raffel et al. 2020, "Exploring the Limits of Transfer
  Learning with a Unified Text-to-Text Transformer", section 2.2), and a digit-fraction guard.
- `PIIScrubber`: replace e-mail addresses, phone numbers and IP addresses with placeholders.
- `Blocklist`: drop documents with too many blocked words (whole-word matching).

Written by hand rather than with datatrove or dolma because the point is that a reader can hold
every rule against its paper and see exactly which threshold removed which document; the rules
are a page each. Every removal carries a reason (a stable key, counted in the report) and a detail
(the measured value against its threshold).
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import regex


@dataclass(frozen=True)
class Outcome:
    """What a stage did to one document.

    text: the document after the stage, or None when the stage removed it.
    reason: why it was removed (a stable key counted in the report), "" when kept.
    detail: the measured value behind the reason, e.g. "12 words < 50".
    changes: for a kept document, what the stage changed or noted, as counts by kind
      (e.g. {"email": 2} for two addresses scrubbed, {"nfc": 1} for a document renormalized).
    """

    text: str | None
    reason: str = ""
    detail: str = ""
    changes: dict[str, int] = field(default_factory=dict)

    @property
    def removed(self) -> bool:
        return self.text is None


def removed(reason: str, detail: str = "") -> Outcome:
    return Outcome(None, reason, detail)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --- normalization ------------------------------------------------------------------------------

NORMAL_FORMS = ("NFC", "NFKC", "none")

# Every line break Unicode knows (CR LF, CR, VT, FF, NEL, LS, PS) becomes "\n", so that lines and
# paragraphs mean the same thing to every later stage.
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# C0/C1 control characters except tab and newline, plus the byte-order mark: invisible, never text.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ufeff]")
# Half of a UTF-16 surrogate pair on its own (JSON "\ud83d" from a cut emoji) encodes to no
# valid UTF-8: it becomes U+FFFD, the character for "undecodable".
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Unicode spaces other than the ASCII space (no-break, thin, ideographic...): tokenizers treat them
# as different symbols, so the same phrase would be learned several times.
_UNICODE_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


@dataclass
class NormalizeConfig:
    """Unicode normalization and whitespace cleanup. Nothing here rewrites words: no mojibake
    repair (that needs ftfy's guessing), no case or punctuation changes.

    form: "NFC" (canonical composition: é as one code point; never changes how text looks),
      "NFKC" (also folds compatibility forms: ﬁ -> fi, full-width letters -> ASCII, ² -> 2,
      … -> ...), or "none".
    unicode_spaces: replace no-break and other Unicode spaces with an ASCII space.
    max_blank_lines: longer runs of blank lines are cut to this many.
    """

    form: str = "NFC"
    unicode_spaces: bool = True
    max_blank_lines: int = 2

    def validate(self) -> None:
        _check(self.form in NORMAL_FORMS, f"normalization form must be one of {NORMAL_FORMS}, got {self.form!r}")
        _check(self.max_blank_lines >= 0, f"max_blank_lines must be >= 0, got {self.max_blank_lines}")


class Normalizer:
    """Line breaks -> "\\n", Unicode form, control characters removed, Unicode spaces -> " ",
    trailing spaces stripped, runs of blank lines shortened, blank edges trimmed. An empty result
    is removed ("empty"). The changes count documents changed by each step."""

    def __init__(self, cfg: NormalizeConfig | None = None):
        self.cfg = cfg or NormalizeConfig()
        self.cfg.validate()
        self._steps = self._build_steps()

    def _build_steps(self) -> list[tuple[str, Callable[[str], str]]]:
        cfg = self.cfg
        blank_run, blank_keep = re.compile(f"\n{{{cfg.max_blank_lines + 2},}}"), "\n" * (cfg.max_blank_lines + 1)
        steps: list[tuple[str, Callable[[str], str]]] = [("line_breaks", lambda t: _LINE_BREAKS.sub("\n", t))]
        if cfg.form != "none":
            steps.append((cfg.form.lower(), lambda t: unicodedata.normalize(cfg.form, t)))
        steps.append(("control_chars", lambda t: _CONTROL.sub("", t)))
        steps.append(("lone_surrogates", lambda t: _LONE_SURROGATE.sub("\ufffd", t)))
        if cfg.unicode_spaces:
            steps.append(("unicode_spaces", lambda t: _UNICODE_SPACES.sub(" ", t)))
        steps += [
            ("trailing_spaces", lambda t: _TRAILING_SPACE.sub("", t)),
            ("blank_lines", lambda t: blank_run.sub(blank_keep, t)),
            ("edges", lambda t: t.strip("\n")),
        ]
        return steps

    def __call__(self, text: str) -> Outcome:
        changes = {}
        for kind, step in self._steps:
            new = step(text)
            if new != text:
                changes[kind] = 1
            text = new
        if "\ufffd" in text:  # the readers decode with errors="replace": say where bytes were bad
            changes["replacement_chars"] = 1
        if not text.strip():
            return removed("empty", "nothing left after whitespace cleanup")
        return Outcome(text, changes=changes)


# --- language identification --------------------------------------------------------------------

@dataclass
class LangIdConfig:
    """Keep documents whose most probable language is in `languages` with probability at least
    `min_probability`.

    min_probability: 0.5, the threshold CCNet (Wenzek et al. 2019) used for its language scores.
    min_chars: documents with fewer (non-space) characters are too short for a character n-gram
      detector to be reliable (a one-line speech is often called Dutch or Somali); they are not
      judged, and `short` says what happens to them.
    short: "keep" (default: the quality filter's minimum word count removes short documents
      anyway, for a better-defined reason) or "drop".
    max_chars: only the first characters are read; beyond a few thousand, more text costs time
      and changes no answer.
    seed: langdetect samples n-grams at random; a fixed seed makes every answer reproducible.
    """

    languages: tuple[str, ...] = ("en",)
    min_probability: float = 0.5
    min_chars: int = 100
    short: str = "keep"
    max_chars: int = 2000
    seed: int = 0

    def validate(self) -> None:
        _check(len(self.languages) > 0, "give at least one language code to keep, e.g. ('en',)")
        _check(0.0 <= self.min_probability <= 1.0, f"min_probability must be in [0, 1], got {self.min_probability}")
        _check(self.short in ("keep", "drop"), f"short must be 'keep' or 'drop', got {self.short!r}")
        _check(self.min_chars >= 0 and self.max_chars > 0, "min_chars must be >= 0 and max_chars > 0")


def _load_langdetect():
    try:
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
        from langdetect.lang_detect_exception import LangDetectException
    except ImportError as e:
        raise ImportError("language identification needs langdetect: pip install 'lmlab[data]' "
                          "(or switch the stage off with --no-langid)") from e
    return DetectorFactory, PROFILES_DIRECTORY, LangDetectException


class LanguageIdentifier:
    """langdetect with its own factory: profiles loaded in sorted order and a seed set on this
    factory only, so nothing global is touched and results do not depend on directory order."""

    def __init__(self, cfg: LangIdConfig | None = None):
        self.cfg = cfg or LangIdConfig()
        self.cfg.validate()
        factory_cls, profiles, self._error = _load_langdetect()
        self._factory = factory_cls()
        names = sorted(os.listdir(profiles))
        self._factory.load_json_profile([Path(profiles, name).read_text(encoding="utf-8") for name in names])
        self._factory.seed = self.cfg.seed
        known = set(self._factory.get_lang_list())
        unknown = [lang for lang in self.cfg.languages if lang not in known]
        _check(not unknown, f"language code(s) {unknown} unknown to langdetect; it knows: {' '.join(sorted(known))}")
        self.languages = frozenset(self.cfg.languages)

    def probabilities(self, text: str) -> list[tuple[str, float]]:
        """(language, probability) pairs, most probable first (langdetect lists those above 0.1);
        empty when the text has no letters to judge."""
        detector = self._factory.create()
        detector.set_max_text_length(self.cfg.max_chars)
        detector.append(text)
        try:
            return [(p.lang, p.prob) for p in detector.get_probabilities()]
        except self._error:
            return []

    def __call__(self, text: str) -> Outcome:
        cfg = self.cfg
        size = len(text) - sum(c.isspace() for c in text)
        if size < cfg.min_chars:
            if cfg.short == "drop":
                return removed("too_short_to_identify", f"{size} chars < {cfg.min_chars}")
            return Outcome(text, changes={"short_unjudged": 1})
        probs = self.probabilities(text)
        if not probs:
            return removed("no_language", "no letters langdetect knows")
        lang, prob = probs[0]
        if lang not in self.languages:
            return removed("other_language", f"{lang} {prob:.2f}")
        if prob < cfg.min_probability:
            return removed("low_confidence", f"{lang} {prob:.2f} < {cfg.min_probability}")
        return Outcome(text)


# --- quality: Gopher and C4 ---------------------------------------------------------------------

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "‣", "◦", "●", "○", "▪", "▫", "■", "□", "►", "▶", "➢", "✓", "-", "*", "–", "—")
ELLIPSES = ("...", "…")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’")

_EDGE_PUNCTUATION = regex.compile(r"^\p{P}+|\p{P}+$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"[.!?]+(?=[\"'”’)\]]*(?:\s|$))")


@dataclass
class C4Config:
    """The C4 rules (Raffel et al. 2020, section 2.2), written for scraped web pages. Off by
    default: the line rules delete dialogue, verse, lists, code and worked math, which are text
    a model should see.

    Line rules (the line is deleted, the document kept): lines not ending in terminal punctuation,
    lines with fewer than `min_words_per_line` words, lines mentioning javascript.
    Page rules (the document is removed): fewer than `min_sentences` sentences, "lorem ipsum",
    a curly bracket (code).
    """

    terminal_punctuation: bool = True
    min_words_per_line: int = 3
    drop_javascript_lines: bool = True
    min_sentences: int = 5
    drop_lorem_ipsum: bool = True
    drop_curly_brackets: bool = True


@dataclass
class QualityConfig:
    """Document quality heuristics. Defaults are Gopher's (Rae et al. 2021, appendix A.1.1 and
    table A1); `max_digit_fraction` is lmlab's own; `c4` adds the C4 rules.

    A document is removed when a value falls outside its bound. Words are whitespace-separated
    tokens with punctuation stripped from their ends (tokens of punctuation alone are not words).
    Repetition: a line, paragraph or n-gram is a duplicate when it already occurred earlier in the
    document (the first occurrence is not counted), and characters covered by several duplicate
    n-grams are counted once.
    """

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_hash_ratio: float = 0.1  # "#" per word
    max_ellipsis_ratio: float = 0.1  # "..." or "…" per word
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # fraction of words with at least one letter
    min_stop_words: int = 2  # occurrences of GOPHER_STOP_WORDS
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS
    # lmlab: GSM8K's worked arithmetic peaks at 0.37 digits per non-space character, number
    # tables, logs and lists of ids go far above; 0.4 separates the two.
    max_digit_fraction: float = 0.4
    # Gopher repetition removal (table A1)
    max_duplicate_lines: float = 0.30
    max_duplicate_paragraphs: float = 0.30
    max_duplicate_line_chars: float = 0.20
    max_duplicate_paragraph_chars: float = 0.20
    max_top_2gram_chars: float = 0.20
    max_top_3gram_chars: float = 0.18
    max_top_4gram_chars: float = 0.16
    max_duplicate_5gram_chars: float = 0.15
    max_duplicate_6gram_chars: float = 0.14
    max_duplicate_7gram_chars: float = 0.13
    max_duplicate_8gram_chars: float = 0.12
    max_duplicate_9gram_chars: float = 0.11
    max_duplicate_10gram_chars: float = 0.10
    c4: C4Config | None = None

    def validate(self) -> None:
        _check(0 <= self.min_words <= self.max_words, f"need 0 <= min_words <= max_words, got "
               f"{self.min_words} and {self.max_words}")
        _check(self.min_mean_word_length <= self.max_mean_word_length,
               "min_mean_word_length must not exceed max_mean_word_length")
        for name in ("max_bullet_lines", "max_ellipsis_lines", "min_alpha_words", "max_digit_fraction",
                     "max_duplicate_lines", "max_duplicate_paragraphs", "max_duplicate_line_chars",
                     "max_duplicate_paragraph_chars", *(f"max_top_{n}gram_chars" for n in (2, 3, 4)),
                     *(f"max_duplicate_{n}gram_chars" for n in range(5, 11))):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"{name} is a fraction and must be in [0, 1], got {value}")
        _check(self.min_stop_words >= 0, f"min_stop_words must be >= 0, got {self.min_stop_words}")


class TextStats:
    """The pieces of a document the quality rules measure, each computed once on first use."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def words(self) -> list[str]:
        stripped = (_EDGE_PUNCTUATION.sub("", token) for token in self.text.split())
        return [w for w in stripped if w]

    @cached_property
    def word_chars(self) -> int:
        return sum(map(len, self.words))

    @cached_property
    def lines(self) -> list[str]:
        return [line.strip() for line in self.text.split("\n") if line.strip()]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in _PARAGRAPH_BREAK.split(self.text) if p.strip()]

    @cached_property
    def duplicate_lines(self) -> tuple[float, float]:
        return duplicate_fractions(self.lines)

    @cached_property
    def duplicate_paragraphs(self) -> tuple[float, float]:
        return duplicate_fractions(self.paragraphs)

    def mean_word_length(self) -> float:
        return self.word_chars / max(len(self.words), 1)

    def per_word(self, symbols: Iterable[str]) -> float:
        return sum(self.text.count(s) for s in symbols) / max(len(self.words), 1)

    def line_fraction(self, test: Callable[[str], bool]) -> float:
        return sum(map(test, self.lines)) / max(len(self.lines), 1)

    def alpha_word_fraction(self) -> float:
        return sum(any(c.isalpha() for c in w) for w in self.words) / max(len(self.words), 1)

    def stop_word_count(self, stop_words: Sequence[str]) -> int:
        stop = set(stop_words)
        return sum(w.lower() in stop for w in self.words)

    def digit_fraction(self) -> float:
        chars = [c for c in self.text if not c.isspace()]
        return sum(c.isdigit() for c in chars) / max(len(chars), 1)

    def top_ngram_char_fraction(self, n: int) -> float:
        """Characters in the occurrences of the most frequent word n-gram (when it occurs more
        than once), over all word characters."""
        counts = Counter(zip(*(self.words[i:] for i in range(n)), strict=False))  # n-grams
        if not counts:
            return 0.0
        gram, count = counts.most_common(1)[0]
        return 0.0 if count < 2 else count * sum(map(len, gram)) / max(self.word_chars, 1)

    def duplicate_ngram_char_fraction(self, n: int) -> float:
        """Characters of words covered by an n-gram that already occurred earlier, over all word
        characters; a word inside several duplicate n-grams counts once."""
        words, seen = self.words, set()
        covered = bytearray(len(words))
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen:
                covered[i:i + n] = b"\x01" * n
            else:
                seen.add(gram)
        return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / max(self.word_chars, 1)


def duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier item, fraction of characters in them)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for item in items:
        if item in seen:
            dup += 1
            dup_chars += len(item)
        seen.add(item)
    return dup / max(len(items), 1), dup_chars / max(sum(map(len, items)), 1)


def _is_bullet(line: str) -> bool:
    return line.startswith(BULLETS)


def _ends_with_ellipsis(line: str) -> bool:
    return line.endswith(ELLIPSES)


class QualityFilter:
    """Gopher's quality and repetition rules (plus C4's when configured), cheap checks first;
    a document is removed for the first rule it breaks."""

    def __init__(self, cfg: QualityConfig | None = None):
        self.cfg = cfg or QualityConfig()
        self.cfg.validate()
        self._checks = gopher_checks(self.cfg)

    def __call__(self, text: str) -> Outcome:
        changes: dict[str, int] = {}
        if self.cfg.c4 is not None:
            text, lines_dropped = c4_clean_lines(text, self.cfg.c4)
            if lines_dropped:
                changes["c4_lines_removed"] = lines_dropped
            verdict = c4_page_check(text, self.cfg.c4)
            if verdict is not None:
                return verdict
        verdict = gopher_check(text, self.cfg, self._checks)
        return verdict if verdict is not None else Outcome(text, changes=changes)


def _bound(value: float, low: float | None, high: float | None, unit: str) -> str | None:
    """None when low <= value <= high, else the detail for the report."""
    fmt = (lambda v: f"{v:,}") if isinstance(value, int) else (lambda v: f"{v:.3g}")
    if low is not None and value < low:
        return f"{fmt(value)} {unit} < {low:g}"
    if high is not None and value > high:
        return f"{fmt(value)} {unit} > {high:g}"
    return None


Check = Callable[[TextStats], "str | None"]  # None: passed; else the detail for the report


def gopher_checks(cfg: QualityConfig) -> list[tuple[str, Check]]:
    """(reason, check) pairs in evaluation order; a check returns None (pass) or the detail."""
    checks: list[tuple[str, Check]] = [
        ("too_few_words", lambda s: _bound(len(s.words), cfg.min_words, None, "words")),
        ("too_many_words", lambda s: _bound(len(s.words), None, cfg.max_words, "words")),
        ("mean_word_length", lambda s: _bound(s.mean_word_length(), cfg.min_mean_word_length,
                                              cfg.max_mean_word_length, "chars per word")),
        ("hash_ratio", lambda s: _bound(s.per_word("#"), None, cfg.max_hash_ratio, "'#' per word")),
        ("ellipsis_ratio", lambda s: _bound(s.per_word(ELLIPSES), None, cfg.max_ellipsis_ratio,
                                            "ellipses per word")),
        ("bullet_lines", lambda s: _bound(s.line_fraction(_is_bullet), None, cfg.max_bullet_lines,
                                          "of lines are bullets")),
        ("ellipsis_lines", lambda s: _bound(s.line_fraction(_ends_with_ellipsis), None, cfg.max_ellipsis_lines,
                                            "of lines end in an ellipsis")),
        ("alpha_words", lambda s: _bound(s.alpha_word_fraction(), cfg.min_alpha_words, None,
                                         "of words have a letter")),
        ("stop_words", lambda s: _bound(s.stop_word_count(cfg.stop_words), cfg.min_stop_words, None,
                                        "stop words")),
        ("digit_fraction", lambda s: _bound(s.digit_fraction(), None, cfg.max_digit_fraction,
                                            "of characters are digits")),
        ("duplicate_lines", lambda s: _bound(s.duplicate_lines[0], None, cfg.max_duplicate_lines,
                                             "of lines are duplicates")),
        ("duplicate_paragraphs", lambda s: _bound(s.duplicate_paragraphs[0], None, cfg.max_duplicate_paragraphs,
                                                  "of paragraphs are duplicates")),
        ("duplicate_line_chars", lambda s: _bound(s.duplicate_lines[1], None, cfg.max_duplicate_line_chars,
                                                  "of line characters in duplicate lines")),
        ("duplicate_paragraph_chars", lambda s: _bound(s.duplicate_paragraphs[1], None,
                                                       cfg.max_duplicate_paragraph_chars,
                                                       "of paragraph characters in duplicates")),
    ]
    for n in (2, 3, 4):
        limit = getattr(cfg, f"max_top_{n}gram_chars")
        checks.append((f"top_{n}gram", lambda s, n=n, limit=limit: _bound(
            s.top_ngram_char_fraction(n), None, limit, f"of characters in the top {n}-gram")))
    for n in range(5, 11):
        limit = getattr(cfg, f"max_duplicate_{n}gram_chars")
        checks.append((f"duplicate_{n}gram", lambda s, n=n, limit=limit: _bound(
            s.duplicate_ngram_char_fraction(n), None, limit, f"of characters in duplicate {n}-grams")))
    return checks


def gopher_check(text: str, cfg: QualityConfig, checks: list[tuple[str, Check]] | None = None) -> Outcome | None:
    """The removal for the first Gopher rule `text` breaks, or None when it passes them all
    (`checks`: a prebuilt `gopher_checks(cfg)`)."""
    stats = TextStats(text)
    for reason, check in checks if checks is not None else gopher_checks(cfg):
        detail = check(stats)
        if detail is not None:
            return removed(reason, detail)
    return None


def c4_clean_lines(text: str, cfg: C4Config) -> tuple[str, int]:
    """Delete the lines C4 deletes; returns the new text and how many lines went."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            kept.append(line)
            continue
        bad = ((cfg.terminal_punctuation and not stripped.endswith(TERMINAL_PUNCTUATION))
               or len(stripped.split()) < cfg.min_words_per_line
               or (cfg.drop_javascript_lines and "javascript" in stripped.lower()))
        if bad:
            dropped += 1
        else:
            kept.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n"), dropped


def c4_page_check(text: str, cfg: C4Config) -> Outcome | None:
    if cfg.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return removed("c4_lorem_ipsum", "contains 'lorem ipsum'")
    if cfg.drop_curly_brackets and "{" in text:
        return removed("c4_curly_bracket", "contains '{'")
    sentences = len(_SENTENCE_END.findall(text))
    if sentences < cfg.min_sentences:
        return removed("c4_too_few_sentences", f"{sentences} sentences < {cfg.min_sentences}")
    return None


# --- PII ----------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24})(?![\w@-])"
)
_IMAGE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico"})  # icon@2x.png
# International: "+" and country code, then 2-7 groups of digits (E.164 allows 15 digits in all).
_INTL_PHONE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,7}(?![\w]|[.-]\d)")
# North American: area code and exchange cannot start with 0 or 1 (NANP), separators required:
# a bare run of ten digits is more often an id or an amount than a phone number.
_US_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\w-]|\.\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)")
_VERSION_BEFORE = re.compile(r"(?:\b(?:version|ver|release|build|firmware|v)\.?\s*)$", re.IGNORECASE)
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)"
)


@dataclass
class PIIConfig:
    """Which kinds of personal data to replace, and with what."""

    emails: bool = True
    phones: bool = True
    ip_addresses: bool = True
    email_placeholder: str = "<EMAIL>"
    phone_placeholder: str = "<PHONE>"
    ip_placeholder: str = "<IP_ADDRESS>"


class PIIScrubber:
    """Replace e-mail addresses, phone numbers (international "+CC ..." and North American
    formats) and IPv4/IPv6 addresses with placeholders; counts by kind in `changes`.

    Guards against false positives, because a scrubber that eats numbers damages math and code:
    phone numbers need separators or a leading "+" and 8 to 15 digits; dotted quads preceded by
    "version", "v", "release"... are left alone, as are longer dotted runs (1.2.3.4.5); IPv6
    candidates must parse (`ipaddress`) and contain a digit, so "std::vector", "a::b" and
    "12:30:45" stay. Dates (2024-01-31, 31.01.2024) match none of the patterns.
    """

    def __init__(self, cfg: PIIConfig | None = None):
        self.cfg = cfg or PIIConfig()
        self._rules = self._build_rules()

    def _email(self, m: re.Match) -> str:
        return m.group(0) if m.group(1).lower() in _IMAGE_SUFFIXES else self.cfg.email_placeholder

    def _phone(self, m: re.Match) -> str:
        digits = sum(c.isdigit() for c in m.group(0))
        return self.cfg.phone_placeholder if 8 <= digits <= 15 else m.group(0)

    def _ipv4(self, m: re.Match) -> str:
        if _VERSION_BEFORE.search(m.string, max(0, m.start() - 12), m.start()):
            return m.group(0)
        return self.cfg.ip_placeholder

    def _ipv6(self, m: re.Match) -> str:
        candidate = m.group(0)
        if candidate.count(":") < 2 or not any(c.isdigit() for c in candidate):
            return candidate
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            return candidate
        return self.cfg.ip_placeholder

    def _build_rules(self) -> list[tuple[str, re.Pattern, Callable[[re.Match], str]]]:
        rules = []
        if self.cfg.emails:  # first: the digits of an address must not be taken for a phone
            rules.append(("email", _EMAIL, self._email))
        if self.cfg.ip_addresses:
            rules += [("ipv6", _IPV6, self._ipv6), ("ipv4", _IPV4, self._ipv4)]
        if self.cfg.phones:
            rules += [("phone", _INTL_PHONE, self._phone), ("phone", _US_PHONE, self._phone)]
        return rules

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        counts: Counter[str] = Counter()
        for kind, pattern, replace in self._rules:
            def sub(m: re.Match, kind=kind, replace=replace) -> str:
                new = replace(m)
                counts[kind] += new != m.group(0)
                return new
            text = pattern.sub(sub, text)
        return text, {k: v for k, v in counts.items() if v}

    def __call__(self, text: str) -> Outcome:
        text, counts = self.scrub(text)
        return Outcome(text, changes=counts)


# --- blocklist ----------------------------------------------------------------------------------

# A deliberately small, mild list: unambiguous English profanity only. No slurs (a public data
# file should not have to spell them), no identity or sexual-health words and no words with
# an innocent sense (ass, cock, bitch, bastard, whore are everywhere in Shakespeare and the
# Bible): C4's any-bad-word rule removed text by and about minorities and on sexual health
# disproportionately (Dodge et al. 2021, "Documenting Large Webtext Corpora"). Extend it with
# --blocklist FILE for a real toxicity filter.
BUILTIN_BLOCKLIST: tuple[str, ...] = (
    "fuck", "fucks", "fucked", "fucker", "fuckers", "fucking", "fuckin", "motherfucker", "motherfuckers",
    "motherfucking", "shit", "shits", "shitty", "bullshit", "cunt", "cunts", "cocksucker", "cocksuckers",
    "dickhead", "dickheads", "asshole", "assholes", "twat", "twats", "wanker", "wankers",
)

_WORD = regex.compile(r"\w+(?:['’]\w+)*")


def words_of(text: str) -> list[str]:
    """Lowercased word tokens (letters, digits, inner apostrophes): the unit of blocklist matching,
    so that a term matches whole words only ("shit" is not found in "shitake")."""
    return [w.lower() for w in _WORD.findall(text)]


def read_term_file(path: str | Path) -> list[str]:
    """Terms from a blocklist file: one word or phrase per line; blank lines and lines starting
    with '#' are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"blocklist file {path} not found; give a text file with one word or phrase per line")
    terms = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    terms = [t for t in terms if t and not t.startswith("#")]
    if not terms:
        raise ValueError(f"blocklist file {path} has no terms (one word or phrase per line; '#' starts a comment)")
    return terms


@dataclass
class BlocklistConfig:
    """Drop a document when its blocked words are more than `max_fraction` of its words, or (when
    set) more than `max_count` in number. C4's rule was max_count=0; the lmlab default tolerates
    one blocked word per hundred, so that a quoted insult does not remove a whole article.

    files: extra term files (one word or phrase per line), added to the built-in list.
    use_builtin: include BUILTIN_BLOCKLIST.
    """

    files: tuple[str, ...] = ()
    use_builtin: bool = True
    max_fraction: float = 0.01
    max_count: int | None = None

    def validate(self) -> None:
        _check(0.0 <= self.max_fraction <= 1.0, f"max_fraction must be in [0, 1], got {self.max_fraction}")
        _check(self.max_count is None or self.max_count >= 0, f"max_count must be >= 0, got {self.max_count}")
        _check(self.use_builtin or bool(self.files), "the blocklist is empty: keep the built-in list or give files")


class Blocklist:
    """Whole-word, case-insensitive matching of single words and multi-word phrases."""

    def __init__(self, cfg: BlocklistConfig | None = None):
        self.cfg = cfg or BlocklistConfig()
        self.cfg.validate()
        terms = list(BUILTIN_BLOCKLIST) if self.cfg.use_builtin else []
        for file in self.cfg.files:
            terms += read_term_file(file)
        self.terms: dict[int, set[tuple[str, ...]]] = {}
        for term in terms:
            key = tuple(words_of(term))
            if key:
                self.terms.setdefault(len(key), set()).add(key)

    def hits(self, text: str) -> tuple[Counter[str], int]:
        """(blocked terms found with their counts, number of words in the text)."""
        words = words_of(text)
        found: Counter[str] = Counter()
        for n, terms in self.terms.items():
            for i in range(len(words) - n + 1):
                gram = tuple(words[i:i + n])
                if gram in terms:
                    found[" ".join(gram)] += 1
        return found, len(words)

    def __call__(self, text: str) -> Outcome:
        found, n_words = self.hits(text)
        count = sum(found.values())
        if not count:
            return Outcome(text)
        fraction = count / max(n_words, 1)
        terms = ", ".join(sorted(found))
        if self.cfg.max_count is not None and count > self.cfg.max_count:
            return removed("blocked_count", f"{count} blocked words > {self.cfg.max_count} ({terms})")
        if fraction > self.cfg.max_fraction:
            return removed("blocked_fraction", f"{count}/{n_words} words blocked > {self.cfg.max_fraction:g} "
                                               f"({terms})")
        return Outcome(text, changes={"kept_with_blocked_words": 1})

