"""The `curate` command line: one command per registered stage (curate/stages/__init__.py: its own command
module, or the generic stage command of curate/commands/stage.py) plus the commands below.

`main(argv)` is callable from tests; errors the user can act on exit with their own code
(2 for bad arguments or unreadable inputs) and a one-line message naming the file/column/flag.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys

import click

from curate import __version__, extras, logs
from curate.errors import CurateError
from curate.stages import StageEntry, entries

log = logging.getLogger(__name__)

# the command modules that are not a stage's (a stage's command comes from the stage registry)
COMMANDS: list[str] = [
    "curate.commands.demo",
    "curate.commands.doctor",
    "curate.commands.inspect",
    "curate.commands.report",
    "curate.commands.run",
    "curate.commands.search",
    "curate.commands.serve",
    "curate.commands.train_probe",
]

_STAGE_COMMANDS: dict[StageEntry, click.Command] = {}


def stage_commands() -> dict[str, click.Command]:
    """{command name: command} of every registered stage, built once per registry entry."""
    out = {}
    for entry in entries():
        cmd = _STAGE_COMMANDS.get(entry)
        if cmd is None:  # command modules are imported by name, as the ones in COMMANDS
            cmd = (importlib.import_module(entry.command).command if entry.command else
                   importlib.import_module("curate.commands.stage").stage_command(entry))
            cmd = _STAGE_COMMANDS[entry] = _checking_extras(cmd)
        out[entry.command_name] = cmd
    return out


def all_commands() -> dict[str, click.Command]:
    """Every `curate` command by name, as the stage registry is now."""
    return dict(cli.commands)


class CurateGroup(click.Group):
    """The `curate` group. Its command modules are imported when a command is first looked up, not when this
    module is: `curate run` (curate.commands.run) drives the pipeline and the Python API, which look commands
    up here, so importing them with this module would be a circle."""

    @property  # type: ignore[override]
    def commands(self) -> dict[str, click.Command]:
        if not self._loaded:
            self._loaded = True
            for mod in COMMANDS:
                self.add_command(_checking_extras(importlib.import_module(mod).command))
        # the registered stages' commands, following the registry (a stage registered or forgotten since);
        # a command put in under a stage's name by hand stays
        current = stage_commands()
        for name in self._from_registry - set(current):
            self._commands.pop(name, None)
        for name, cmd in current.items():
            self._commands.setdefault(name, cmd)
        self._from_registry = set(current)
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._commands, self._loaded, self._from_registry = value, False, set()

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(all_commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return all_commands().get(name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CurateError as e:
            click.echo(f"curate: error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=CurateGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="curate")
@click.option("-v", "--verbose", count=True, help="More of curate's logging: debug lines.")
@click.option("-q", "--quiet", count=True, help="Less of curate's logging: warnings only (-qq: errors only).")
def cli(verbose: int, quiet: int) -> None:
    """curate: URL lists -> curated, deduplicated webdataset shards, with evidence."""
    logs.configure(logs.level_for(verbose, quiet))
    log.debug("curate %s, Python %s, log level %s", __version__, sys.version.split()[0],
              logging.getLevelName(logs.level_for(verbose, quiet)))


def _checking_extras(cmd: click.Command) -> click.Command:
    """Run `cmd` only when its extras are installed (exit 2 naming the extra), after click has parsed its
    arguments, so `--help` works without them."""
    callback = cmd.callback
    if callback is None or cmd.name not in extras.NEEDS:
        return cmd

    @functools.wraps(callback)
    def checked(*args, **kwargs):
        extras.require_for(cmd.name)
        return callback(*args, **kwargs)

    cmd.callback = checked
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (for tests)."""
    try:
        # without standalone mode click *returns* the code of a ctx.exit(code) (CurateGroup's errors)
        rv = cli.main(args=argv, prog_name="curate", standalone_mode=False)
        if isinstance(rv, int):
            return rv
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 2 if e.exit_code in (1, 2) else e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
