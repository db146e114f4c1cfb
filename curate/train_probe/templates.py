"""Zero-shot prompt templates as data: shipped sets (photo, clipart, icon, generic) or a file of your own.

A template file holds one prompt per line with `{c}` where the class name goes; blank lines and lines
starting with '#' are ignored. The set for an eval dir is, in order: `--templates NAME|FILE`, the eval
dir's manifest field `zero_shot_templates` (a shipped set's name), else `generic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curate.errors import InputError

TEMPLATE_DIR = Path(__file__).parent / "templates"
DEFAULT = "generic"
AUTO = "auto"
MANIFEST_FIELD = "zero_shot_templates"


@dataclass(frozen=True)
class TemplateSet:
    name: str  # a shipped set's name or the file's path
    templates: tuple[str, ...]
    source: str  # "flag", "manifest" or "default": where the choice came from


def shipped() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt"))


def parse_templates(text: str, where: str) -> tuple[str, ...]:
    """The prompts of a template file's text; InputError naming `where` for a line without exactly one {c}."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{c}") != 1:
            raise InputError(f"--templates: {where} line {n}: a prompt needs exactly one '{{c}}' (got '{line}')")
        try:
            line.format(c="x")
        except (KeyError, IndexError, ValueError):
            raise InputError(f"--templates: {where} line {n}: only '{{c}}' may appear in braces (got '{line}')") from None
        out.append(line)
    if not out:
        raise InputError(f"--templates: {where} has no prompts (one per line, with '{{c}}' for the class name)")
    return tuple(out)


def load_templates(name_or_file: str) -> tuple[str, ...]:
    """A shipped set by name, or a template file by path (exit 2 naming the flag otherwise)."""
    if name_or_file in shipped():
        path = TEMPLATE_DIR / f"{name_or_file}.txt"
    else:
        path = Path(name_or_file).expanduser()
        if not path.is_file():
            raise InputError(f"--templates: '{name_or_file}' is neither a shipped set ({', '.join(shipped())}) "
                             f"nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--templates: cannot read {path}: {e}") from None
    return parse_templates(text, str(path))


def resolve_templates(flag: str, eval_manifest: dict) -> TemplateSet:
    """The template set for an eval dir: the flag unless it is 'auto', then the manifest field, then generic."""
    if flag != AUTO:
        return TemplateSet(flag, load_templates(flag), "flag")
    named = eval_manifest.get(MANIFEST_FIELD)
    if named:
        if named not in shipped():
            raise InputError(f"--eval: the manifest names zero_shot_templates '{named}', not a shipped set "
                             f"({', '.join(shipped())}); pass --templates NAME|FILE")
        return TemplateSet(named, load_templates(named), "manifest")
    return TemplateSet(DEFAULT, load_templates(DEFAULT), "default")
