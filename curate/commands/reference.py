"""The options reference docs/OPTIONS.md, generated from every registered command:
`python -m curate.commands.reference [--check] [PATH]`."""

from __future__ import annotations

import sys
from pathlib import Path

from curate.cli import all_commands
from curate.options import REFERENCE, reference_markdown


def main(argv: list[str] | None = None) -> int:
    """`python -m curate.commands.reference [--check] [PATH]`: write (or compare against) the options reference."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    if len(args) > 1 or any(a.startswith("-") for a in args):  # never a file named like a flag
        print("usage: python -m curate.commands.reference [--check] [PATH]", file=sys.stderr)
        return 2
    path = Path(args[0]) if args else REFERENCE
    text = reference_markdown(all_commands())
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run `python -m curate.commands.reference`", file=sys.stderr)
            return 1
        return 0
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
