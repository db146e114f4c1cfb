"""Declarative pipelines: a YAML file lists stages with the same fields as their CLI flags; `curate run` runs them.

Each stage entry becomes a `curate <stage> ...` argv and goes through `curate.cli.main`, so a pipeline
field means exactly what the flag means, and each stage resumes (and refuses another config) by itself.

    name: demo
    workdir: demo-out                 # relative to the current directory; ${workdir} in values
    env: {OMP_NUM_THREADS: "2"}       # environment variables for the run
    defaults: {workers: 2}            # flags given to every stage whose command has them
    demo_web: {seed: 0}               # start curate.demo.web.DemoWeb: ${demo_web.url_list}, ...allow_hosts
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

from curate.errors import CurateError, InputError

_TOP_FIELDS = {"name", "workdir", "env", "defaults", "demo_web", "demo_splits", "stages", "description"}
_VAR = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}")
_WEB_VARS = ("url_list", "ground_truth", "allow_hosts")


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
    data.setdefault("name", p.stem)
    data.setdefault("workdir", f"{p.stem}-out")
    for item in sets:
        apply_set(data, item)
    return data


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
            # a list placeholder inside a list (allow_host: [${demo_web.allow_hosts}]) splices in
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
    from curate.cli import cli

    return cli.commands.get(stage)


def to_argv(stage: str, fields: dict[str, Any], where: str) -> list[str]:
    """A stage entry's fields as CLI arguments: key -> --key-with-dashes, True -> flag, list -> repeated."""
    argv = [stage]
    args = fields.get("args", [])
    if not isinstance(args, list):
        args = [args]
    for k, v in fields.items():
        if k in ("stage", "id", "args") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif isinstance(v, list):
            for item in v:
                argv += [flag, _scalar(item, where, k)]
        else:
            argv += [flag, _scalar(v, where, k)]
    return argv + ["--"] + [_scalar(a, where, "args") for a in args] if args else argv


def _scalar(v: Any, where: str, field: str) -> str:
    if isinstance(v, (dict, list)):
        raise InputError(f"{where}: field '{field}' must be a scalar or a list of scalars")
    return str(v)


def plan(data: dict[str, Any], *, redo: bool = False, variables: dict[str, Any] | None = None) -> list[Step]:
    """The resolved steps; fields of commands that exist are checked against their flags."""
    variables = dict(variables or {})
    variables.setdefault("workdir", str(Path(data["workdir"]).expanduser()))
    variables.setdefault("name", data["name"])
    for n in data.get("demo_splits") or []:
        variables.setdefault(f"demo.{n}", str(Path(data["workdir"]).expanduser() / f"demo-{n}"))
    for k, v in (data.get("env") or {}).items():
        variables.setdefault(f"env.{k}", v)
    defaults = data.get("defaults") or {}
    steps = []
    for i, entry in enumerate(data["stages"]):
        stage = entry["stage"]
        where = f"pipeline {data['name']}: stages[{i}] ({stage})"
        cmd = _command(stage)
        fields = dict(entry)
        if cmd is not None:
            from curate.options import check_step, flag_params, negate_flags

            flags = flag_params(cmd)
            for k, v in defaults.items():
                if k in flags and k not in fields:
                    fields[k] = v
            if redo and "redo" in flags:
                fields["redo"] = True
            check_step(cmd, fields, where)  # the options' declarations: unknown keys, types, choices (exit 2)
            fields = negate_flags(cmd, fields)  # `progress: false` -> --no-progress
        fields = substitute(fields, variables)
        label = entry.get("id") or stage
        steps.append(Step(i, stage, label, to_argv(stage, fields, where), cmd is not None))
    return steps


@contextlib.contextmanager
def _environment(env: dict[str, Any]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _demo_web(data: dict[str, Any], workdir: Path, dry_run: bool) -> Iterator[dict[str, Any]]:
    settings = data.get("demo_web")
    if settings is None:
        yield {}
        return
    if dry_run:
        yield {f"demo_web.{k}": f"<demo_web.{k}>" for k in _WEB_VARS}
        return
    from curate.config import from_dict
    from curate.demo.web import DemoWeb, WebConfig

    with DemoWeb(from_dict(WebConfig, dict(settings)), workdir / "web") as web:
        yield {"demo_web.url_list": str(web.url_list), "demo_web.ground_truth": str(web.ground_truth),
               "demo_web.allow_hosts": list(web.allow_hosts)}


def _demo_splits(data: dict[str, Any], workdir: Path, dry_run: bool) -> dict[str, Any]:
    """Materialise the demo corpus's trusted seed / eval splits as dataset dirs: ${demo.seed}, ${demo.eval}."""
    names = data.get("demo_splits") or []
    out = {f"demo.{n}": str(workdir / f"demo-{n}") for n in names}
    if not dry_run:
        from curate.demo.corpus import write_split_dataset

        for n in names:
            write_split_dataset(n, workdir / f"demo-{n}")
    return out


def run(path: str | os.PathLike, *, sets: tuple[str, ...] = (), dry_run: bool = False, redo: bool = False,
        echo: Any = print) -> list[Step]:
    """Run (or with dry_run, print) every stage in order; stops at the first stage that fails."""
    from curate.cli import main

    data = load(path, sets)
    workdir = Path(str(data["workdir"])).expanduser()
    plan(data, redo=redo, variables={f"demo_web.{k}": f"<demo_web.{k}>" for k in _WEB_VARS})  # check first
    with _environment(data.get("env") or {}), _demo_web(data, workdir, dry_run) as web_vars:
        split_vars = _demo_splits(data, workdir, dry_run)
        steps = plan(data, redo=redo, variables={**web_vars, **split_vars})
        if dry_run:
            echo(f"pipeline {data['name']}: {len(steps)} stage(s), workdir {workdir}")
            for s in steps:
                note = "" if s.available else "   # command not available in this build"
                echo(f"  [{s.index + 1}] {s.label}: {s.command_line()}{note}")
            return steps
        missing = [s.stage for s in steps if not s.available]
        if missing:
            raise InputError(f"pipeline {data['name']}: command(s) not available: {', '.join(missing)}")
        workdir.mkdir(parents=True, exist_ok=True)
        for s in steps:
            echo(f"[{s.index + 1}/{len(steps)}] {s.label}: {s.command_line()}")
            rc = main(s.argv)
            if rc != 0:
                raise StepFailed(f"pipeline {data['name']}: stage [{s.index + 1}] {s.label} exited with code {rc}; "
                                 f"fix it and rerun `curate run {path}` to resume", rc)
    return steps
