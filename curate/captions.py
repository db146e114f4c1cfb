"""Caption signals computed from the text alone: length, share of letters, boilerplate/filename flag.

These are cheap, model-free signals in the spirit of DataComp's and LAION's caption filters: a caption
that is a camera file name ("IMG_1234.JPG"), a UI string ("click here") or mostly digits/URLs says
nothing about the image, whatever CLIP thinks of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# camera / export file names and bare file names with an image extension
_FILENAME = re.compile(
    r"^\s*(?:(?:img|dsc|dscn|dscf|dcim|pict|pic|photo|image|screenshot|scan|p|gopr|mvimg|pxl|sam|wp)"
    r"[\s_\-]*\d[\w\-]*(?:\.\w{2,4})?|[\w\-\s]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic))\s*$",
    re.IGNORECASE,
)
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
# whole captions that are UI or placeholder text rather than a description
_BOILERPLATE = frozenset({
    "image", "images", "photo", "photos", "picture", "pictures", "img", "thumbnail", "thumb", "untitled",
    "no title", "null", "none", "n/a", "na", "undefined", "click here", "click to enlarge", "read more",
    "view image", "view larger", "enlarge", "loading", "logo", "icon", "banner", "placeholder",
    "default", "image not found", "no image", "no image available", "spacer", "blank", "alt", "alt text",
})


@dataclass(frozen=True)
class CaptionSignals:
    chars: int
    words: int
    letter_share: float
    boilerplate: bool


def caption_signals(caption: str | None) -> CaptionSignals:
    """Signals of one caption; None and empty captions count as boilerplate."""
    text = (caption or "").strip()
    chars = len(text)
    words = len(text.split())
    letters = sum(ch.isalpha() for ch in text)
    letter_share = letters / chars if chars else 0.0
    return CaptionSignals(chars, words, float(letter_share), is_boilerplate(text))


def is_boilerplate(text: str) -> bool:
    """True for empty, filename-like, UI/placeholder, or mostly-digits/URL captions."""
    text = text.strip()
    if not text:
        return True
    norm = re.sub(r"[\s\W_]+", " ", text.lower()).strip()
    if norm in _BOILERPLATE or text.lower().strip(" .!:") in _BOILERPLATE:
        return True
    if _FILENAME.match(text):
        return True
    without_urls = _URL.sub(" ", text)
    rest = without_urls.strip()
    if len(rest) < 0.5 * len(text):  # mostly URLs
        return True
    non_space = [ch for ch in rest if not ch.isspace()]
    if not non_space:
        return True
    digits = sum(ch.isdigit() for ch in non_space)
    letters = sum(ch.isalpha() for ch in non_space)
    # mostly digits and punctuation: dates, ids, prices, "1234 5678"
    return letters < 2 or digits > letters
