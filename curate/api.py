"""The Python API: run curate's stages from a notebook or a script, with the same options, resume rules and
fingerprints as the command line and pipeline YAML.

    from curate import Pipeline
    p = Pipeline(workers=2)
    p.download("urls.parquet", out="data", preset="laion")
    p.score("data")
    p.dedup("data")
    p.export("data", out="curated", policy=["laion", "dedup"])

A stage's keyword arguments are its YAML fields (its CLI flags with '_': `batch_size=64` is
`--batch-size 64`; `True` a flag; a list a repeated flag), checked against the option declarations
before anything runs (an unknown key, a wrong type or a value outside the choices raises InputError).
Positional arguments are the command's arguments. Each call runs the very command `curate <stage>` runs,
in this process, and returns its `StageSummary` (tasks total, already done, done now, failed, counts);
`curate run` executes each pipeline step through `Pipeline.stage` too. A failure raises: `CurateError`
subclasses with the CLI's exit code (`InputError` 2, `ShardsFailed` 3 with `.summary`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import click

from curate.cli import all_commands
from curate.errors import InputError
from curate.extras import require_for
from curate.options import check_step, flag_params, negate_flags
from curate.runner import collect


def command(name: str) -> Any:
    """The click command of `curate NAME` (InputError for an unknown name)."""
    commands = all_commands()
    cmd = commands.get(name)
    if cmd is None:
        raise InputError(f"no curate command '{name}'; known: {', '.join(sorted(commands))}")
    return cmd


def resolve(name: str, args: list[Any], fields: dict[str, Any], where: str, *, defaults: dict[str, Any] | None = None,
            redo: bool = False) -> list[str]:
    """A step's fields as checked `curate NAME ...` arguments: the one translation the API and pipeline YAML
    share (defaults apply to the flags the command has; `False` of an on/off flag is its `--no-` form)."""
    cmd = command(name)
    flags = flag_params(cmd)
    merged = {k: _plain(v) for k, v in fields.items()}  # paths as strings, as a YAML would hold them
    merged.update({k: v for k, v in (defaults or {}).items() if k in flags and k not in fields})
    if redo and "redo" in flags:
        merged["redo"] = True
    check_step(cmd, merged, where)
    merged = negate_flags(cmd, merged)
    if args:
        merged["args"] = [_plain(a) for a in args]
    return to_argv(name, merged, where)


def _plain(v: Any) -> Any:
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def execute(argv: list[str]) -> Any:
    """Run `curate ARGV` in this process and return the stage's StageSummary (None for a command without
    one); errors raise (CurateError subclasses carry the CLI's exit code)."""
    name, rest = argv[0], argv[1:]
    cmd = command(name)
    require_for(name)
    with collect() as summaries:
        try:
            cmd.main(args=rest, prog_name=f"curate {name}", standalone_mode=False)
        except click.exceptions.Exit as e:
            if e.exit_code:
                raise
        except click.ClickException as e:
            raise InputError(f"curate {name}: {e.format_message()}") from None
    return summaries[-1] if summaries else None


class Pipeline:
    """Stages run one after the other, each resuming where it stopped (a call whose config fingerprint
    differs from the stored one raises ConfigMismatchError unless `redo=True`).

    `defaults` (and the shortcuts `engine`, `workers`, `spark_master`) apply to every stage that has the
    flag, as a pipeline YAML's `defaults:`; `progress=False` turns progress bars off where a stage has them.
    `env` sets environment variables for each call (a YAML's `env:`).
    """

    def __init__(self, *, defaults: dict[str, Any] | None = None, engine: str | None = None,
                 workers: int | None = None, spark_master: str | None = None, progress: bool = False,
                 redo: bool = False, env: dict[str, Any] | None = None):
        self.defaults = dict(defaults or {})
        for k, v in (("engine", engine), ("workers", workers), ("spark_master", spark_master)):
            if v is not None:
                self.defaults[k] = v
        self.defaults.setdefault("progress", progress)
        self.redo = redo
        self.env = {k: str(v) for k, v in (env or {}).items()}
        self.history: list[tuple[list[str], Any]] = []

    def argv(self, name: str, *args: Any, **fields: Any) -> list[str]:
        """The `curate ...` command line this call runs (checked, nothing run)."""
        return resolve(name, list(args), fields, f"Pipeline.{name.replace('-', '_')}", defaults=self.defaults,
                       redo=self.redo)

    def stage(self, name: str, *args: Any, **fields: Any) -> Any:
        """Run stage (or command) `name` with the command's arguments and fields; returns its StageSummary."""
        return self.run_argv(self.argv(name, *args, **fields))

    def run_argv(self, argv: list[str]) -> Any:
        with environment(self.env):
            summary = execute(argv)
        self.history.append((argv, summary))
        return summary

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        commands = all_commands()
        name = attr.replace("_", "-")
        if name not in commands:
            raise AttributeError(f"Pipeline has no stage '{attr}'; stages: "
                                 f"{', '.join(sorted(n.replace('-', '_') for n in commands))}")

        def call(*args: Any, **fields: Any) -> Any:
            return self.stage(name, *args, **fields)

        call.__name__ = attr
        call.__doc__ = f"`curate {name}`: " + (commands[name].help or "")
        return call


def run_stage(name: str, *args: Any, **fields: Any) -> Any:
    """Run one stage as `curate NAME ARGS --field value ...` would, in this process; returns its StageSummary."""
    return Pipeline(progress=fields.pop("progress", False)).stage(name, *args, **fields)


@contextlib.contextmanager
def environment(env: dict[str, Any]) -> Iterator[None]:
    """os.environ with `env` set (values as strings) for the duration of the block, restored after."""
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
