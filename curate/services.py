"""Named services and dataset makers that a pipeline can use, looked up by kind in small registries.

A pipeline declares them by name and refers to what they provide:

    services:
      web: {kind: demo-web, seed: 0}        # started before the first stage, stopped after the last
    datasets:
      eval: {kind: demo-split, split: eval}  # written once (idempotent) under ${workdir}/eval, or at path:
      pool: ${workdir}/pool                  # a plain path: just a name for a dataset dir
    stages:
      - stage: download
        args: ["${services.web.url_list}"]
      - stage: dedup
        against: ${datasets.eval}

A kind names its implementation as "module:function", imported only when a pipeline uses it, so the
pipeline module imports no implementation (the demo's web server among them). A service function takes
(settings, state_dir) and returns a context manager yielding its declared outputs; a dataset function takes
(settings, path) and writes a dataset dir there, leaving a complete one as it is. `register_service` and
`register_dataset` add kinds (a duplicate name is an error); a `kind` of the form "module:function" works
without registering, with outputs checked when it starts.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.errors import InputError


@dataclass(frozen=True)
class ServiceKind:
    name: str
    target: str                 # "module:function(settings: dict, state_dir: Path) -> ContextManager[dict]"
    outputs: tuple[str, ...]    # the names ${services.NAME.<output>} resolves
    help: str = ""


@dataclass(frozen=True)
class DatasetKind:
    name: str
    target: str                 # "module:function(settings: dict, path: Path) -> None"
    help: str = ""


_SERVICES: dict[str, ServiceKind] = {}
_DATASETS: dict[str, DatasetKind] = {}


def register_service(kind: ServiceKind) -> None:
    if kind.name in _SERVICES:
        raise ValueError(f"service kind '{kind.name}' is already registered ({_SERVICES[kind.name].target})")
    _SERVICES[kind.name] = kind


def register_dataset(kind: DatasetKind) -> None:
    if kind.name in _DATASETS:
        raise ValueError(f"dataset kind '{kind.name}' is already registered ({_DATASETS[kind.name].target})")
    _DATASETS[kind.name] = kind


register_service(ServiceKind(
    "demo-web", "curate.demo.web:pipeline_service", ("url_list", "ground_truth", "allow_hosts", "base_url"),
    "the demo web on loopback: a URL list, its ground truth and the hosts to allow (curate.demo.web.WebConfig)"))
register_dataset(DatasetKind(
    "demo-split", "curate.demo.corpus:pipeline_dataset",
    "a split of the embedded demo corpus (split: seed | eval | pool) as a downloaded dataset dir"))


def _resolve(target: str, what: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"{what}: cannot load '{target}' ({e})") from None
    return fn


def service_kind(kind: Any, where: str) -> ServiceKind:
    """The registered kind, or an ad hoc one for "module:function" (its outputs are what it yields)."""
    if isinstance(kind, str) and kind in _SERVICES:
        return _SERVICES[kind]
    if isinstance(kind, str) and ":" in kind:
        return ServiceKind(kind, kind, ())
    raise InputError(f"{where}: unknown service kind {kind!r}; known: {', '.join(sorted(_SERVICES))} "
                     f"(or module:function)")


def dataset_kind(kind: Any, where: str) -> DatasetKind:
    if isinstance(kind, str) and kind in _DATASETS:
        return _DATASETS[kind]
    if isinstance(kind, str) and ":" in kind:
        return DatasetKind(kind, kind)
    raise InputError(f"{where}: unknown dataset kind {kind!r}; known: {', '.join(sorted(_DATASETS))} "
                     f"(or module:function)")


@contextlib.contextmanager
def start_service(name: str, spec: dict[str, Any], state_dir: Path) -> Iterator[dict[str, Any]]:
    """Start service `name` (spec: kind plus the kind's settings); yields {output name: value}."""
    where = f"services.{name}"
    kind = service_kind(spec.get("kind"), where)
    settings = {k: v for k, v in spec.items() if k != "kind"}
    with _resolve(kind.target, where)(settings, state_dir) as outputs:
        missing = [o for o in kind.outputs if o not in outputs]
        if missing:
            raise InputError(f"{where}: kind {kind.name} provided no {', '.join(missing)}")
        yield dict(outputs)


def make_dataset(name: str, spec: dict[str, Any], path: Path) -> None:
    """Write dataset `name` at `path` with its kind's function (which leaves a complete one as it is)."""
    where = f"datasets.{name}"
    kind = dataset_kind(spec.get("kind"), where)
    _resolve(kind.target, where)({k: v for k, v in spec.items() if k not in ("kind", "path")}, path)
