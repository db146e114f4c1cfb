"""MetaCLIP-style metadata balancing (Xu et al. 2023, "Demystifying CLIP Data"): the pure parts.

Captions are matched against metadata entries on word boundaries (MetaCLIP's "spaced" substring match:
the caption and every entry are padded with spaces and punctuation is spaced out, so " cat " does not
match "category"); each (pair, entry) match gets a seeded uniform draw; the reduce, plain SQL that DuckDB
and Spark SQL both run, turns matches into one balancing statistic per pair such that `rank < t` is the
keep decision for any cap t:

- `rank`: the smallest 0-based position of the pair among its entry's pairs ordered by draw. An entry
  selects exactly its first min(count, t) pairs -- a uniform sample without replacement -- and a pair is
  kept when any of its entries selects it. Every entry selects at most t pairs (exactly), and a pair of an
  entry with at most t pairs is always kept. Each pair's chance of being selected by an entry is
  min(1, t / count), as in MetaCLIP.
- `scaled_draw`: the smallest draw * count over the pair's entries; `scaled_draw < t` is MetaCLIP's own
  independent sampling (each match kept with probability min(1, t / count)), at most t per entry in
  expectation only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from curate.errors import InputError

DEFAULT_METADATA = "wordfreq:en:50000"
# punctuation that MetaCLIP's matcher spaces out so "dog," matches " dog "
_SPACED_PUNCT = ",.;:?!`"
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")


def normalize(text: str) -> str:
    """A caption or entry as matched: lowercased, punctuation spaced out, whitespace runs to one space,
    padded with a space on both sides (so entries match whole words only)."""
    t = text.casefold()
    for p in _SPACED_PUNCT:
        t = t.replace(p, f" {p} ")
    return " " + " ".join(t.split()) + " "


def wordfreq_entries(lang: str, n: int) -> list[str]:
    """The `n` most frequent words of `lang` from the wordfreq package's shipped lists (offline), keeping
    only words made of letters (numbers and symbols are not concepts). A stand-in for MetaCLIP's
    Wikipedia unigrams (which wordfreq's English list draws on, among other sources)."""
    try:
        import wordfreq
    except ImportError:
        raise InputError("--metadata wordfreq:...: the wordfreq package is not installed") from None
    try:
        words = wordfreq.top_n_list(lang, n)
    except (LookupError, ValueError) as e:
        raise InputError(f"--metadata wordfreq:{lang}:{n}: no word list for language '{lang}' ({e})") from None
    return [w for w in words if _WORD.fullmatch(w)]


def load_entries(spec: str) -> list[str]:
    """Metadata entries from `wordfreq:LANG:N`, a .json list of strings, or a text file (one entry a line).

    Entries are normalized, deduplicated and sorted, so an entry's id does not depend on the file's order.
    """
    if spec.startswith("wordfreq:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            raise InputError(f"--metadata {spec}: expected wordfreq:LANG:N, e.g. {DEFAULT_METADATA}")
        raw: Iterable[Any] = wordfreq_entries(parts[1], int(parts[2]))
    else:
        path = Path(spec)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--metadata {spec}: cannot read ({e})") from None
        if path.suffix == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"--metadata {spec}: not valid JSON ({e})") from None
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise InputError(f"--metadata {spec}: a JSON metadata file is a list of strings")
        else:
            raw = text.splitlines()
    entries = sorted({normalize(e).strip() for e in raw} - {""})
    if not entries:
        raise InputError(f"--metadata {spec}: no entries")
    return entries


def entries_digest(entries: list[str]) -> str:
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


class Matcher:
    """Finds the ids of the entries a caption contains, with one Aho-Corasick pass over the caption."""

    def __init__(self, entries: list[str]):
        import ahocorasick

        self.entries = entries
        self._auto = ahocorasick.Automaton()
        for i, e in enumerate(entries):
            self._auto.add_word(f" {e} ", i)
        self._auto.make_automaton()

    def match(self, caption: str | None) -> list[int]:
        if not caption or not self.entries:
            return []
        return sorted({i for _, i in self._auto.iter(normalize(caption))})


@lru_cache(maxsize=2)
def cached_matcher(path: str, digest: str) -> Matcher:
    """One matcher per worker process for the metadata file a plan wrote (digest keys the cache)."""
    return Matcher(Path(path).read_text(encoding="utf-8").splitlines())


def draw(seed: int, key: str, entry: int) -> float:
    """A uniform draw in [0, 1) for one (pair, entry) match, a pure function of (seed, key, entry).

    The 53 top bits of a BLAKE2b hash, so the value is an exact double and the same on every machine.
    """
    h = hashlib.blake2b(f"{seed}\x00{entry}\x00{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(h, "big") >> 11) / float(1 << 53)


def reduce_sql(matches: str = "matches") -> str:
    """Per pair (key, shard): rank, scaled_draw and min_count from the long table `matches`
    (key, shard, entry, draw); the same text runs in DuckDB and Spark SQL.

    Ties in draw (never seen in practice: 53-bit draws) are broken by key, so ranks are a total order.
    """
    return f"""
        WITH ranked AS (
            SELECT key, shard, entry, draw,
                   ROW_NUMBER() OVER (PARTITION BY entry ORDER BY draw, key) - 1 AS pos,
                   COUNT(*) OVER (PARTITION BY entry) AS n
            FROM {matches}
        )
        SELECT key, shard,
               CAST(MIN(pos) AS BIGINT) AS rank,
               MIN(draw * n) AS scaled_draw,
               CAST(MIN(n) AS BIGINT) AS min_count
        FROM ranked
        GROUP BY key, shard
    """


def entry_counts_sql(matches: str = "matches") -> str:
    """Pairs per entry (MetaCLIP's entry_count), for the stage's record of the pool's distribution."""
    return f"SELECT entry, COUNT(*) AS count FROM {matches} GROUP BY entry"
