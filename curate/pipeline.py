"""Declarative pipelines: a YAML file lists stages with the same fields as their CLI flags; `curate run` runs them.

Each stage entry's fields are checked and turned into a `curate <stage> ...` command line by the same code
as the Python API's (`curate.api.resolve`), and run by it (`curate.api.Pipeline`), so a pipeline field means
exactly what the flag and the keyword argument mean, and each stage resumes (and refuses another config)
by itself.

    name: demo
    workdir: demo-out                 # relative to the current directory; ${workdir} in values
    env: {OMP_NUM_THREADS: "2"}       # environment variables for the run
    defaults: {workers: 2}            # flags given to every stage whose command has them
    services:                         # started before the first stage (curate.services): ${services.web.url_list}
      web: {kind: demo-web, seed: 0}
    datasets:                         # named datasets: ${datasets.eval}; a kind writes it once, a path names it
      eval: {kind: demo-split, split: eval}
      pool: ${workdir}/pool
    stages:
      - stage: export                 # the command name
        id: curated                   # optional, for --set curated.policy=... and the plan
        args: ["${workdir}/pool"]     # positional arguments
        out: ${workdir}/curated       # --out ...; true -> --flag; a list -> the flag repeated
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from curate.api import Pipeline, environment, resolve, to_argv
from curate.cli import all_commands
from curate.errors import CurateError, InputError
from curate.extras import require_for
from curate.services import dataset_kind, make_dataset, service_kind, start_service

_TOP_FIELDS = {"name", "workdir", "env", "defaults", "services", "datasets", "stages", "description"}
_VAR = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")


class StepFailed(CurateError):
    def __init__(self, msg: str, exit_code: int):
        super().__init__(msg)
        self.exit_code = exit_code


@dataclass
class Step:
    index: int
    stage: str
    label: str
    argv: list[str]
    available: bool
    summary: Any = None  # the stage's StageSummary once it ran

    def command_line(self) -> str:
        import shlex

        return "curate " + " ".join(shlex.quote(a) for a in self.argv)


def load(path: str | os.PathLike, sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The pipeline's YAML as data, with each `--set key=value` applied."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise InputError(f"PIPELINE {p}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise InputError(f"PIPELINE {p}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise InputError(f"PIPELINE {p}: a mapping with a non-empty 'stages' list is required")
    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise InputError(f"PIPELINE {p}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_FIELDS))}")
    for i, s in enumerate(data["stages"]):
        if not isinstance(s, dict) or not isinstance(s.get("stage"), str):
            raise InputError(f"PIPELINE {p}: stages[{i}] needs a 'stage' (the command name)")
    _check_named(p, data)
    data.setdefault("name", p.stem)
    data.setdefault("workdir", f"{p.stem}-out")
    for item in sets:
        apply_set(data, item)
    return data


def _check_named(p: Path, data: dict[str, Any]) -> None:
    """services: NAME -> {kind, ...settings}; datasets: NAME -> a path, or {kind, [path], ...settings}."""
    for field in ("services", "datasets"):
        entries = data.get(field)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise InputError(f"PIPELINE {p}: '{field}' must map names to entries")
        for name, spec in entries.items():
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(name)):
                raise InputError(f"PIPELINE {p}: {field}.{name}: names use letters, digits, '_' and '-'")
            if field == "datasets" and isinstance(spec, str):
                continue
            if not isinstance(spec, dict) or "kind" not in spec:
                what = "a path or a mapping with a 'kind'" if field == "datasets" else "a mapping with a 'kind'"
                raise InputError(f"PIPELINE {p}: {field}.{name} must be {what}")


def apply_set(data: dict[str, Any], item: str) -> None:
    """`key.sub=value`: a top-level field, or `<stage id or name>.<field>` (every stage with that name)."""
    if "=" not in item:
        raise InputError(f"--set {item}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    parts = key.split(".")
    if parts[0] in _TOP_FIELDS - {"stages"}:
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise InputError(f"--set {key}: '{part}' is not a mapping")
        target[parts[-1]] = value
        return
    if len(parts) != 2:
        raise InputError(f"--set {key}: use FIELD, or STAGE.FIELD with a stage id or name")
    hits = [s for s in data["stages"] if s.get("id") == parts[0]] or \
           [s for s in data["stages"] if s["stage"] == parts[0]]
    if not hits:
        names = sorted({s.get("id") or s["stage"] for s in data["stages"]})
        raise InputError(f"--set {key}: no stage with id or name '{parts[0]}' (stages: {', '.join(names)})")
    for s in hits:
        s[parts[1]] = value


def substitute(value: Any, variables: dict[str, Any]) -> Any:
    """Replace ${name} in strings; a string that is one placeholder takes the variable's value as is (lists)."""
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole:
            return _lookup(whole.group(1), variables)
        return _VAR.sub(lambda m: str(_lookup(m.group(1), variables)), value)
    if isinstance(value, list):
        out = []
        for v in value:
            sub = substitute(v, variables)
            # a list placeholder inside a list (allow_host: [${services.web.allow_hosts}]) splices in
            out += sub if isinstance(sub, list) and isinstance(v, str) and _VAR.fullmatch(v) else [sub]
        return out
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    return value


def _lookup(name: str, variables: dict[str, Any]) -> Any:
    if name not in variables:
        raise InputError(f"pipeline: unknown variable ${{{name}}}; known: {', '.join(sorted(variables))}")
    return variables[name]


def _command(stage: str) -> Any:
    return all_commands().get(stage)


def plan(data: dict[str, Any], *, redo: bool = False, variables: dict[str, Any] | None = None) -> list[Step]:
    """The resolved steps; fields of commands that exist are checked against their flags."""
    variables = {**base_variables(data), **(variables or {})}
    defaults = data.get("defaults") or {}
    steps = []
    for i, entry in enumerate(data["stages"]):
        stage = entry["stage"]
        where = f"pipeline {data['name']}: stages[{i}] ({stage})"
        cmd = _command(stage)
        fields = {k: v for k, v in entry.items() if k not in ("stage", "id")}
        label = entry.get("id") or stage
        if cmd is None:  # listed by --dry-run; refused before anything runs
            argv = to_argv(stage, substitute(fields, variables), where)
        else:

            # the options' declarations check unknown keys, types and choices (exit 2) before substitution
            resolve(stage, [], {k: v for k, v in fields.items() if k != "args"}, where, defaults=defaults, redo=redo)
            fields = substitute(fields, variables)
            args = fields.pop("args", [])
            argv = resolve(stage, args if isinstance(args, list) else [args], fields, where, defaults=defaults,
                           redo=redo)
        steps.append(Step(i, stage, label, argv, cmd is not None))
    return steps


def base_variables(data: dict[str, Any]) -> dict[str, Any]:
    """${workdir}, ${name}, ${env.X}, ${datasets.NAME} (paths: known before anything runs), and a placeholder
    for each declared output of each service (${services.NAME.OUTPUT}) until the services start."""
    workdir = Path(str(data["workdir"])).expanduser()
    out: dict[str, Any] = {"workdir": str(workdir), "name": data["name"]}
    out.update({f"env.{k}": v for k, v in (data.get("env") or {}).items()})
    out.update({f"datasets.{n}": str(p) for n, p in dataset_paths(data, out).items()})
    for name, spec in (data.get("services") or {}).items():
        for o in service_kind(spec.get("kind"), f"services.{name}").outputs:
            out[f"services.{name}.{o}"] = f"<services.{name}.{o}>"
    return out


def dataset_paths(data: dict[str, Any], variables: dict[str, Any]) -> dict[str, Path]:
    """Each named dataset's directory: its path (a plain string or `path:`), else ${workdir}/NAME."""
    out = {}
    for name, spec in (data.get("datasets") or {}).items():
        if isinstance(spec, dict):
            dataset_kind(spec.get("kind"), f"datasets.{name}")  # an unknown kind fails before anything runs
        raw = spec if isinstance(spec, str) else spec.get("path", f"{variables['workdir']}/{name}")
        out[name] = Path(str(substitute(raw, variables))).expanduser()
    return out


@contextlib.contextmanager
def _services(data: dict[str, Any], workdir: Path, variables: dict[str, Any], dry_run: bool) -> Iterator[dict[str, Any]]:
    """Start every service (each keeps its state under ${workdir}/NAME); yields their outputs as variables."""
    if dry_run or not data.get("services"):
        yield {}
        return
    with contextlib.ExitStack() as stack:
        out: dict[str, Any] = {}
        for name, spec in data["services"].items():
            got = stack.enter_context(start_service(name, substitute(spec, variables), workdir / name))
            out.update({f"services.{name}.{k}": v for k, v in got.items()})
        yield out


def _make_datasets(data: dict[str, Any], variables: dict[str, Any]) -> None:
    """Write every dataset that has a kind (each kind leaves a complete dataset as it is)."""
    paths = dataset_paths(data, variables)
    for name, spec in (data.get("datasets") or {}).items():
        if isinstance(spec, dict):
            make_dataset(name, substitute(spec, variables), paths[name])


def run(path: str | os.PathLike, *, sets: tuple[str, ...] = (), dry_run: bool = False, redo: bool = False,
        echo: Any = print) -> list[Step]:
    """Run (or with dry_run, print) every stage in order; stops at the first stage that fails."""
    data = load(path, sets)
    workdir = Path(str(data["workdir"])).expanduser()
    variables = base_variables(data)
    steps = plan(data, redo=redo, variables=variables)  # check every stage before starting anything
    if not dry_run:
        missing = [s.stage for s in steps if not s.available]
        if missing:
            raise InputError(f"pipeline {data['name']}: command(s) not available: {', '.join(missing)}")
        for s in steps:  # a missing extra stops the run before its first stage, not halfway through
            require_for(s.stage, f"pipeline {data['name']}: stage {s.label} (curate {s.stage})")
    with environment(data.get("env") or {}), _services(data, workdir, variables, dry_run) as service_vars:
        if not dry_run:
            _make_datasets(data, variables)
        steps = plan(data, redo=redo, variables={**variables, **service_vars})
        if dry_run:
            echo(f"pipeline {data['name']}: {len(steps)} stage(s), workdir {workdir}")
            for s in steps:
                note = "" if s.available else "   # command not available in this build"
                echo(f"  [{s.index + 1}] {s.label}: {s.command_line()}{note}")
            return steps
        workdir.mkdir(parents=True, exist_ok=True)
        runner = Pipeline()
        for s in steps:
            echo(f"[{s.index + 1}/{len(steps)}] {s.label}: {s.command_line()}")
            try:
                s.summary = runner.run_argv(s.argv)
            except CurateError as e:
                echo(f"curate {s.stage}: error: {e}")
                raise StepFailed(f"pipeline {data['name']}: stage [{s.index + 1}] {s.label} exited with code "
                                 f"{e.exit_code}; fix it and rerun `curate run {path}` to resume", e.exit_code) from e
    return steps


def run_yaml(path: str | os.PathLike, *, sets: tuple[str, ...] = (), redo: bool = False,
             echo: Any = None) -> list[Any]:
    """Run a pipeline YAML as `curate run` does (services, datasets, resume); returns each step's summary."""
    return [s.summary for s in run(path, sets=sets, redo=redo, echo=echo or (lambda msg: None))]
