"""Stage configs are small frozen dataclasses; their fingerprint decides whether a resume is allowed.

Fields that only change *how* work runs (workers, engine, progress) are marked `runtime=True` and
left out of the fingerprint, so a rerun with more workers resumes instead of being refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from curate.errors import InputError


def runtime(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A config field that does not change outputs (excluded from the fingerprint)."""
    md = {"runtime": True}
    if "default_factory" in kw:
        return dataclasses.field(default_factory=kw.pop("default_factory"), metadata=md, **kw)
    return dataclasses.field(default=default, metadata=md, **kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """All fields of a config dataclass as plain JSON-able data."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def output_fields(cfg: Any) -> dict[str, Any]:
    """The fields that decide the outputs (everything not marked runtime)."""
    full = to_dict(cfg)
    return {
        f.name: full[f.name] for f in dataclasses.fields(cfg) if not f.metadata.get("runtime", False)
    }


def fingerprint(cfg: Any, extra: dict[str, Any] | None = None) -> str:
    """A short stable hash of the output-relevant config (plus `extra`, e.g. input checksums)."""
    payload = {"config": output_fields(cfg), "extra": extra or {}}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a mapping; unknown keys are an error naming the key."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        default = names[k].default
        # YAML/JSON give lists where the dataclass holds tuples
        if isinstance(v, list) and isinstance(default, tuple):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)
