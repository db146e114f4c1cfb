"""Benchmark caption language ID on short captions: precision/recall of "non-English" and English-keep rate.

    .venv/bin/python bench/langid.py [--per-source 150] [--seed 0]

Labelled short captions are built offline from real multilingual sources that installed packages ship:
Unicode CLDR via babel (language, territory, month and weekday names in 26 locales), CLDR emoji
annotations via the emoji package (14 languages), and the demo corpus's English captions. A non-English
string equal to its English counterpart (or to any English string) is dropped: "Argentina" is English too.
The demo web's captions come from curate.demo.web.plan_rows with pipelines/demo.yaml's web settings, for
the rows expected to download; its ground truth marks a row non-English when the openclipart title came
from a non-English upload. Some of those titles are English words or names ("Various Cliparts", "Puzzle",
"Armadillo": curate.demo.web.ENGLISH_TITLES, AUDIT here): "dl" is the web as served before the audit
(WebConfig.audited_titles False, its 182 non-English rows include 59 such titles), "audited" the web
as served now, where those titles are never served as non-English captions.

A candidate returns a label, "und" for undetermined; a row is removed when the label is neither "en" nor
"und" (the demo policy's clause `lang IN ('en', 'und')`). lingua-language-detector is measured when it is
installed (it is not a dependency of curate).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Callable

from curate.demo.web import ENGLISH_TITLES as AUDIT  # non-English-marked demo titles that are English text

LOCALES = ("de", "fr", "es", "it", "pt", "nl", "sv", "da", "nb", "fi", "pl", "cs", "tr", "hu", "ro", "ru", "uk",
           "el", "ar", "he", "hi", "ja", "zh", "ko", "id", "vi")
COMMON_LANGS = set("en de fr es it pt nl sv da nb fi pl cs tr hu ro ru uk el ar he hi ja zh ko id vi th fa bn ur "
                   "ta te ms sw af ga cy eu ca gl is et lv lt sk sl hr sr bg mk sq hy ka az kk uz mn ne si km lo "
                   "my am yo zu xh ha ig so la eo".split())

Detector = Callable[[str], str]


def cldr_strings(locale: str) -> dict[tuple[str, str], str]:
    from babel import Locale

    loc = Locale.parse(locale)
    out: dict[tuple[str, str], str] = {}
    out.update({("language", k): v for k, v in loc.languages.items() if k in COMMON_LANGS})
    out.update({("territory", k): v for k, v in loc.territories.items() if len(k) == 2})
    out.update({("month", str(k)): v for k, v in loc.months["format"]["wide"].items()})
    out.update({("day", str(k)): v for k, v in loc.days["format"]["wide"].items()})
    return out


def emoji_names(lang: str) -> dict[tuple[str, str], str]:
    import emoji

    emoji.config.load_language(lang)
    out = {}
    for e, d in emoji.EMOJI_DATA.items():
        # skin-tone variants repeat the same words 5 times
        if lang in d and d.get("status") == 2 and "skin_tone" not in d.get("en", ""):
            out[("emoji", e)] = d[lang].strip(":").replace("_", " ")
    return out


def short_captions(per_source: int, seed: int) -> list[tuple[str, str, str]]:
    """[(text, language, source)]: non-English CLDR/emoji strings per locale plus English ones."""
    import emoji
    import pyarrow.parquet as pq

    from curate.demo.corpus import split_path

    rng = random.Random(seed)
    en_cldr, en_emoji = cldr_strings("en"), emoji_names("en")
    english = {v.casefold() for v in [*en_cldr.values(), *en_emoji.values()]}
    data: list[tuple[str, str, str]] = []
    for loc in LOCALES:
        sources = [("cldr", cldr_strings(loc), en_cldr)]
        if loc in emoji.LANGUAGES:
            sources.append(("emoji", emoji_names(loc), en_emoji))
        for name, strings, en in sources:
            items = sorted({v for k, v in strings.items()
                            if v.casefold() != en.get(k, "").casefold() and v.casefold() not in english})
            data += [(v, loc, name) for v in rng.sample(items, min(per_source, len(items)))]
    data += [(v, "en", "cldr") for v in sorted(set(en_cldr.values()))]
    en_emo = sorted(set(en_emoji.values()))
    data += [(v, "en", "emoji") for v in rng.sample(en_emo, min(1000, len(en_emo)))]
    caps = sorted({c for c in pq.read_table(split_path("pool"), columns=["caption"]).column("caption").to_pylist()
                   if c})
    data += [(v, "en", "demo") for v in rng.sample(caps, min(1000, len(caps)))]
    return data


def demo_web_captions(audited: bool = True) -> list[tuple[str, str, bool]]:
    """[(caption, caption_kind, downloads)] of the demo web's rows with an image, as pipelines/demo.yaml serves it
    (audited False: as it was served before ENGLISH_TITLES were kept out of its non-English captions)."""
    from curate.demo.web import FAULT_ROUTES, WebConfig, plan_rows

    cfg = WebConfig(seed=0, misaligned_rate=0.25, boilerplate_rate=0.08, audited_titles=audited)
    rows = plan_rows(cfg, "http://127.0.0.1:18765")
    return [(r.text or "", r.caption_kind, r.fault is None or FAULT_ROUTES.get(r.fault) is None)
            for r in rows if r.image_id is not None and r.fault != "repeated_url"]


def candidates() -> dict[str, Detector]:
    """name -> detector for every candidate measured. Long because each candidate is defined here, next to
    the others, so the table's rows can be read side by side."""
    from curate import langid

    model = langid.load_model()
    lexicon = langid.load_lexicon()
    space = re.compile(r"\s+")

    def fasttext_threshold(th: float | None) -> Detector:
        def f(text: str) -> str:
            clean = space.sub(" ", text).strip()
            if not clean:
                return "und"
            (label,), (p,) = langid.fasttext_labels(clean, model)
            return label if label == "en" or th is None or p >= th else "und"
        return f

    def script_fasttext(text: str) -> str:  # script heuristic, then fastText at 0.5 for Latin text
        if sum(c.isalpha() for c in text) < 2:
            return "und"
        if langid.latin_share(text) < 0.5:
            return "xx"
        return fasttext_threshold(0.5)(text)

    def lexicon_nb(text: str) -> str:  # naive Bayes over the whole caption instead of the per-word vote
        import math

        if sum(c.isalpha() for c in text) < 2:
            return "und"
        if langid.latin_share(text) < 0.5:
            return "xx"
        words = [w.lower() for w in re.findall(r"[^\W\d_]+", text) if len(w) > 1]
        lfs = [x for x in (lexicon.log_freqs(w) for w in words) if x is not None]
        if not lfs:
            return "und"
        en = lexicon.langs.index("en")
        prior = [math.log(0.5 if i == en else 0.5 / (len(lexicon.langs) - 1)) for i in range(len(lexicon.langs))]
        lp = [p + sum(x[i] for x in lfs) for i, p in enumerate(prior)]
        top = max(lp)
        post = [math.exp(v - top) for v in lp]
        best = max(range(len(lp)), key=lp.__getitem__)
        return lexicon.langs[best] if best == en or post[best] / sum(post) >= 0.5 else "und"

    out: dict[str, Detector] = {
        "fasttext top-1 (DataComp)": fasttext_threshold(None),
        "fasttext p>=0.5 else und": fasttext_threshold(0.5),
        "fasttext p>=0.9 else und": fasttext_threshold(0.9),
        "script + fasttext p>=0.5": script_fasttext,
        "script + lexicon naive Bayes": lexicon_nb,
        "curate: script + lexicon vote": lambda t: langid.detect(t, model, lexicon).label,
    }

    def vote(below_list: float, prior: float = langid.ENGLISH_PRIOR) -> Detector:
        def f(text: str) -> str:
            if sum(c.isalpha() for c in text) < 2:
                return "und"
            if langid.latin_share(text) < 0.5:
                return "xx"
            return langid.decide_latin(text, lexicon, prior, below_list)[0]
        return f
    # the absent-word floor (curate v1: every absent word at 1e-8, i.e. below_list 1) and the English prior
    for below, prior in ((1, 0.8), (3, 0.8), (10, 0.7), (30, 0.8), (100, 0.8), (10, 0.9)):
        out[f"lexicon vote, absent = lowest/{below}, prior {prior}"] = vote(below, prior)
    try:
        from lingua import Language, LanguageDetectorBuilder
    except ImportError:
        return out
    likely = [getattr(Language, n) for n in (
        "ENGLISH GERMAN FRENCH SPANISH ITALIAN PORTUGUESE DUTCH SWEDISH DANISH BOKMAL FINNISH POLISH CZECH "
        "TURKISH HUNGARIAN ROMANIAN RUSSIAN UKRAINIAN GREEK ARABIC HEBREW HINDI JAPANESE CHINESE KOREAN "
        "INDONESIAN VIETNAMESE").split()]
    for dist in (0.0, 0.25):
        det = LanguageDetectorBuilder.from_languages(*likely).with_minimum_relative_distance(dist).build()

        def lingua(text: str, det: object = det) -> str:
            r = det.detect_language_of(text) if text.strip() else None  # type: ignore[attr-defined]
            return "und" if r is None else r.iso_code_639_1.name.lower()
        out[f"lingua (27 likely languages, distance {dist})"] = lingua
    return out


def pr(tp: int, fp: int, fn: int) -> tuple[float, float]:
    return (tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-source", type=int, default=150, help="non-English strings per locale and source")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    short = short_captions(args.per_source, args.seed)
    webs = [[r for r in demo_web_captions(audited) if r[2]] for audited in (False, True)]
    n_en = sum(lang == "en" for _, lang, _ in short)
    print(f"short captions: {len(short)} ({len(short) - n_en} non-English in {len(LOCALES)} locales, {n_en} English); "
          + "; ".join(f"demo web {name}: {len(w)} rows expected to download, "
                      f"{sum(k == 'non_english' for _, k, _ in w)} non-English "
                      f"({sum(k == 'non_english' and t.startswith(AUDIT) for t, k, _ in w)} of them in AUDIT)"
                      for name, w in zip(("before the audit", "audited"), webs, strict=True)))
    head = ("candidate", "short P", "short R", "en kept", "und", "dl P", "dl R", "dl-AUDIT P", "dl-AUDIT R",
            "audited P", "audited R", "s")
    print("| " + " | ".join(head) + " |\n|---|" + "---:|" * (len(head) - 1))
    for name, det in candidates().items():
        t0 = time.perf_counter()
        tp = fp = fn = kept = und = 0
        for text, lang, _ in short:
            label = det(text)
            removed = label not in ("en", "und")
            und += label == "und"
            if lang == "en":
                fp += removed
                kept += not removed
            else:
                tp += removed
                fn += not removed
        sp, sr = pr(tp, fp, fn)
        figures = [sp, sr, kept / n_en, und / len(short)]
        for web, keep in ((webs[0], lambda t, k: True),
                          (webs[0], lambda t, k: not (k == "non_english" and t.startswith(AUDIT))),
                          (webs[1], lambda t, k: True)):
            wtp = wfp = wfn = 0
            for text, kind, _ in web:
                if keep(text, kind):
                    removed = det(text) not in ("en", "und")
                    wtp += removed and kind == "non_english"
                    wfp += removed and kind != "non_english"
                    wfn += not removed and kind == "non_english"
            figures += pr(wtp, wfp, wfn)
        print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in figures) + f" | {time.perf_counter() - t0:.1f} |")
    print("\nshort: CLDR + emoji names (non-English) vs English CLDR/emoji/demo captions; dl: demo-web rows expected "
          "to download, web as served before the title audit; dl-AUDIT: the same without the AUDIT titles; audited: "
          "the web as served now. P/R are of removing non-English rows (label not 'en'/'und'); 'en kept' is the "
          "share of English short captions kept.")


if __name__ == "__main__":
    main()
