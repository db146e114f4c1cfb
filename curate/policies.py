"""Filter policies: named, documented lists of clauses over the `samples` view (YAML, built in or a file).

A policy file has `name`, `source` (where the rule comes from), `description`, `clauses: [{name, where}]`
and/or `top_fraction` + `by`; its top fraction is applied after its clauses. Policies compose in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from curate.errors import InputError
from curate.query import Clause

_KNOWN_FIELDS = {"name", "source", "description", "clauses", "top_fraction", "by"}


@dataclass(frozen=True)
class Policy:
    name: str
    clauses: list[Clause] = field(default_factory=list)
    source: str = ""
    description: str = ""


def builtin_names() -> list[str]:
    folder = resources.files("curate") / "policies"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_policy(ref: str) -> Policy:
    """A built-in policy by name, or a YAML policy file by path."""
    if ref in builtin_names():
        text = (resources.files("curate") / "policies" / f"{ref}.yaml").read_text()
        where = f"built-in policy '{ref}'"
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise InputError(f"--policy {ref}: neither a built-in policy ({', '.join(builtin_names())}) "
                             f"nor a policy file")
        text = path.read_text()
        where = f"policy file {path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML ({e})") from None
    return parse_policy(data, where)


def parse_policy(data: Any, where: str) -> Policy:
    if not isinstance(data, dict):
        raise InputError(f"{where}: a policy is a mapping with name and clauses and/or top_fraction/by")
    unknown = sorted(set(data) - _KNOWN_FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN_FIELDS))}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: field 'name' is required (a string)")
    clauses = []
    for i, c in enumerate(data.get("clauses") or []):
        if not isinstance(c, dict) or not isinstance(c.get("where"), str) or set(c) - {"name", "where"}:
            raise InputError(f"{where}: clauses[{i}] must be a mapping with 'where' (SQL text) and optional 'name'")
        clauses.append(Clause(f"{name}:{c.get('name') or c['where']}", where=c["where"]))
    top = data.get("top_fraction")
    if top is not None or data.get("by") is not None:
        clauses.append(top_clause(top, data.get("by"), f"{where}: ", name=f"{name}:top_fraction"))
    if not clauses:
        raise InputError(f"{where}: a policy needs clauses and/or top_fraction with by")
    return Policy(name, clauses, str(data.get("source") or "").strip(), str(data.get("description") or "").strip())


def top_clause(fraction: Any, by: Any, prefix: str = "", name: str | None = None) -> Clause:
    """The clause keeping the top `fraction` of the rows left, ranked by the SQL expression `by`."""
    if not isinstance(by, str) or not by.strip():
        raise InputError(f"{prefix}--by: a top fraction needs a column to rank by (e.g. --by clip_score)")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise InputError(f"{prefix}--top-fraction: must be a number in (0, 1], got {fraction!r}")
    return Clause(name or f"top {fraction:g} by {by}", top_fraction=float(fraction), by=by)
