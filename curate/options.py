"""One declaration per option: a config field carries its type, default, choices, help and flag name.

A stage config declares a field with `option(...)`; from that one declaration come

- the click options of its command (`options_from(Config)`: generated when the command is first used,
  so `curate --help` does not import the stages),
- the pipeline YAML check of a step's fields (`check_step`: unknown keys, wrong types and choices exit 2
  naming the key and the step), and
- the options reference `docs/OPTIONS.md` (`python -m curate.commands.reference` writes it,
  `--check` compares).

Adding an option to a stage is one `option(...)` line in its config class; a subclass that adds a field
gets the flag, the YAML key and the reference entry without further code. Options a command has but its
config does not (`--out`, `--redo`, the engine) stay plain click options and are checked and documented
the same way through their click types.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from curate.errors import InputError

_KEY = "curate.option"
_SAME = object()  # "the CLI default is the field's default"
_SCALARS = (bool, int, float, str)
_UNSET = getattr(click.core, "UNSET", None)  # click >= 8.2: the default of an option without one
# a config class, "module:Class" imported on first use, or a function returning the class
ConfigRef = type | str | Callable[[], type]
REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "OPTIONS.md"


@dataclasses.dataclass(frozen=True)
class Opt:
    """What a config field needs to become a command-line option (kept in the field's metadata)."""

    help: str
    flag: str | None = None  # the flag without '--' (default: the field name with '-' for '_')
    choices: tuple[str, ...] | None = None
    cli: bool = True  # False: not a flag (the command sets it, e.g. from a positional argument or a preset)
    cli_default: Any = _SAME  # the flag's default when it differs from the field's (None: "decided later")
    cli_type: Any = None  # the CLI value's type when `convert` turns it into another (e.g. 'auto' -> 0)
    convert: Callable[[Any], Any] | None = None  # the parsed CLI value (None too) -> the field's value
    metavar: str | None = None
    click_type: Any = None  # a click type for the flag, e.g. click.Path(exists=True) (the YAML check uses `type`)


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,  # noqa: A002 - click's name
           choices: Iterable[str] | None = None, runtime: bool = False, cli: bool = True,
           cli_default: Any = _SAME, cli_type: Any = None, convert: Callable[[Any], Any] | None = None,
           metavar: str | None = None, click_type: Any = None) -> Any:
    """A config field declared once: its default, help, flag and choices (`runtime`: not in the fingerprint)."""
    opt = Opt(help=help, flag=flag, choices=tuple(choices) if choices is not None else None, cli=cli,
              cli_default=cli_default, cli_type=cli_type, convert=convert, metavar=metavar,
              click_type=click_type)
    return dataclasses.field(default=default, metadata={"runtime": runtime, _KEY: opt})


def unique(values: Iterable[Any]) -> tuple[Any, ...]:
    """A repeated option's values in first-seen order, without repeats."""
    return tuple(dict.fromkeys(values))


def at_least(flag: str, value: int, least: int) -> None:
    """Refuse a number option below `least` (InputError: exit 2), for a config's check before anything runs."""
    if value < least:
        raise InputError(f"{flag}: must be at least {least}")


def absolute(path: str | None) -> str | None:
    """A path option made absolute (shard tasks may run in other directories or on other machines)."""
    import os

    return os.path.abspath(path) if path else None


@dataclasses.dataclass(frozen=True)
class Declared:
    """One declared field of one config class, resolved (annotation evaluated)."""

    name: str
    opt: Opt
    type: Any
    default: Any
    runtime: bool
    owner: str  # the config class's name, for the reference

    @property
    def flag(self) -> str:
        return self.opt.flag or self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """The pipeline YAML key: the flag's name with '_' (what `curate run` turns into the flag)."""
        return self.flag.replace("-", "_")

    @property
    def cli_default(self) -> Any:
        return self.default if self.opt.cli_default is _SAME else self.opt.cli_default

    def shape(self) -> tuple[type, bool]:
        """(scalar type, repeatable) of the value on the command line."""
        return _shape(self.opt.cli_type or self.type, f"{self.owner}.{self.name}")


def _shape(tp: Any, where: str) -> tuple[type, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else tp  # X | None: None is "not given"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
        return args[0], True
    if tp in _SCALARS:
        return tp, False
    raise TypeError(f"{where}: a {tp} field cannot be a flag; declare cli_type= and convert=")


def declarations(cls: type) -> list[Declared]:
    """The declared fields of a config dataclass, in field order (base classes' groups first)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(_KEY)
        if opt is not None:
            out.append(Declared(f.name, opt, hints[f.name], f.default, bool(f.metadata.get("runtime")),
                                cls.__name__))
    return out


class DeclaredOption(click.Option):
    """A click option generated from a config field; keeps the declaration for YAML checks and the reference."""

    def __init__(self, *args: Any, declaration: Declared, **kw: Any):
        super().__init__(*args, **kw)
        self.declaration = declaration


def click_option(d: Declared) -> DeclaredOption:
    base, multiple = d.shape()
    flag = "--" + d.flag
    default = d.cli_default
    if base is bool and not multiple:
        decls = [f"{flag}/--no-{d.flag}" if default else flag, d.name]
        return DeclaredOption(decls, is_flag=True, default=bool(default), show_default=bool(default),
                              help=d.opt.help, declaration=d)
    ptype = d.opt.click_type or (click.Choice(d.opt.choices) if d.opt.choices else
                                 {int: click.INT, float: click.FLOAT}.get(base, click.STRING))
    if default is dataclasses.MISSING:  # a field without a default: the flag is required
        return DeclaredOption([flag, d.name], type=ptype, required=True, multiple=multiple, help=d.opt.help,
                              metavar=d.opt.metavar, declaration=d)
    return DeclaredOption([flag, d.name], type=ptype, default=default, multiple=multiple, help=d.opt.help,
                          show_default=default is not None and default != (), metavar=d.opt.metavar,
                          declaration=d)


@dataclasses.dataclass
class Options:
    """A command's parsed declared options: field values (converted) and the names the user gave explicitly."""

    configs: tuple[type, ...]
    values: dict[str, Any]
    explicit: frozenset[str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def build(self, config: type | None = None, **overrides: Any) -> Any:
        """A config (the command's first, or the one that is `config` or its subclass): its parsed values,
        then `overrides` (fields the command decides)."""
        cls = self.configs[0] if config is None else next(c for c in self.configs if issubclass(c, config))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in self.values.items() if k in names}, **overrides})


def _resolve(config: ConfigRef) -> type:
    if isinstance(config, type):
        return config
    if callable(config):  # a function that finds the class (a registered stage's config_cls)
        return config()
    module, _, name = config.partition(":")
    return getattr(importlib.import_module(module), name)




class ConfigCommand(click.Command):
    """A click command whose declared options come from a config class, generated on first use.

    The callback gets the command's own parameters plus `options` (an `Options`), so a command builds its
    config with one `options.build(...)` call. `with_config(Sub)` is the same command for a subclass.
    """

    def __init__(self, *args: Any, config: ConfigRef | tuple[ConfigRef, ...], after: str | None = None,
                 **kw: Any):
        self._config_ref = config
        self._after = after
        self._generated: list[click.Parameter] | None = None
        super().__init__(*args, **kw)

    # click reads and writes `params`; the declared options join the explicit ones on first read
    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        if self._generated is None:
            explicit = list(self._explicit)
            names = [p.name for p in explicit]
            at = names.index(self._after) + 1 if self._after in names else \
                sum(1 for p in explicit if isinstance(p, click.Argument))
            gen = [click_option(d) for c in self.configs for d in declarations(c) if d.opt.cli]
            self._generated = explicit[:at] + gen + explicit[at:]
        return self._generated

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._explicit = list(value)
        self._generated = None

    @property
    def configs(self) -> tuple[type, ...]:
        refs = self._config_ref if isinstance(self._config_ref, tuple) else (self._config_ref,)
        return tuple(_resolve(r) for r in refs)

    def with_config(self, config: ConfigRef | tuple[ConfigRef, ...]) -> ConfigCommand:
        """This command with other config classes (e.g. a subclass adding fields)."""
        other = copy.copy(self)
        other._config_ref, other._generated = config, None
        return other

    def collect(self, ctx: click.Context) -> Options:
        """Take the declared options out of ctx.params as one `Options` (converted, explicit ones noted)."""
        values: dict[str, Any] = {}
        explicit = set()
        for p in self.params:
            if isinstance(p, DeclaredOption) and p.name in ctx.params:
                d = p.declaration
                v = ctx.params.pop(p.name)
                if ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
                    explicit.add(d.name)
                values[d.name] = d.opt.convert(v) if d.opt.convert else v
        return Options(self.configs, values, frozenset(explicit))

    def invoke(self, ctx: click.Context) -> Any:
        ctx.params["options"] = self.collect(ctx)
        return super().invoke(ctx)


def options_from(config: ConfigRef | tuple[ConfigRef, ...], name: str, *,
                 after: str | None = None) -> Callable[[Callable], ConfigCommand]:
    """`@options_from("curate.stages.download:DownloadConfig", "download")`: a command with the config's options.

    `config` may be a dotted "module:Class" so the stage module is imported only when the command is used,
    or several (a command that builds two configs); each config's declared fields become options;
    the generated options go after the parameter named `after` (default: after the positional arguments).
    """
    return click.command(name, cls=ConfigCommand, config=config, after=after)  # type: ignore[return-value]


# ---- pipeline YAML: a step's fields --------------------------------------------------------------------------

def flag_params(cmd: click.Command) -> dict[str, click.Parameter]:
    """YAML key -> click option, for every --long option of a command (the key is the flag with '_')."""
    out = {}
    for p in cmd.params:
        if isinstance(p, click.Option):
            for opt in p.opts:
                if opt.startswith("--"):
                    out[opt[2:].replace("-", "_")] = p
    return out


def _expected(p: click.Parameter) -> tuple[type, bool, tuple[str, ...] | None]:
    """(scalar type, repeatable, choices) a parameter takes, from its declaration or its click type."""
    if isinstance(p, DeclaredOption):
        base, multiple = p.declaration.shape()
        return base, multiple, p.declaration.opt.choices
    if isinstance(p, click.Option) and p.is_flag:
        return bool, False, None
    choices = tuple(p.type.choices) if isinstance(p.type, click.Choice) else None
    base: type = str
    if isinstance(p.type, click.types.IntParamType):
        base = int
    elif isinstance(p.type, click.types.FloatParamType):
        base = float
    return base, bool(getattr(p, "multiple", False)), choices


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _fits(base: type, v: Any) -> bool:
    if base is bool:
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False  # YAML `yes`/`true` where a value is wanted
    if base is int:
        return isinstance(v, int)
    if base is float:
        return isinstance(v, (int, float))
    return isinstance(v, (str, int, float))  # a YAML number where text is wanted is still its text


def check_value(key: str, p: click.Parameter, value: Any, where: str) -> None:
    """A YAML value against the option's type and choices; exit 2 naming the key and the step."""
    if value is None or (isinstance(value, str) and "${" in value):
        return  # None: the default; a ${placeholder} is checked by the command once substituted
    base, multiple, choices = _expected(p)
    items = value if multiple and isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, str) and "${" in v:
            continue
        if not _fits(base, v):
            want = _WORDS[base] + (" or a list of them" if multiple else "")
            raise InputError(f"{where}: field '{key}' must be {want}, not {v!r}")
        if choices is not None and str(v) not in choices:
            raise InputError(f"{where}: field '{key}': {v!r} is not one of {', '.join(choices)}")


def check_step(cmd: click.Command, fields: Mapping[str, Any], where: str) -> None:
    """A pipeline step's fields against its command's options: unknown keys, types and choices (exit 2)."""
    flags = flag_params(cmd)
    keys = [k for k in fields if k not in ("stage", "id", "args")]
    unknown = sorted(k for k in keys if k not in flags)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                         f"`curate {cmd.name}` has: {', '.join(sorted(flags))}")
    for k in keys:
        check_value(k, flags[k], fields[k], where)


def negate_flags(cmd: click.Command, fields: Mapping[str, Any]) -> dict[str, Any]:
    """`key: false` for an on/off flag that defaults to on (`--progress/--no-progress`) as `no_key: true`,
    since a false field gives no flag at all (the default)."""
    flags = flag_params(cmd)
    out: dict[str, Any] = {}
    for k, v in fields.items():
        p = flags.get(k)
        if v is False and isinstance(p, click.Option) and p.is_flag and p.secondary_opts:
            out[p.secondary_opts[0][2:].replace("-", "_")] = True
        else:
            out[k] = v
    return out


# ---- the options reference ----------------------------------------------------------------------------------

def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_words(p: click.Parameter) -> str:
    base, multiple, choices = _expected(p)
    if isinstance(p, click.Option) and p.is_flag:
        words = "flag"
    elif choices:
        words = "one of " + ", ".join(f"`{c}`" for c in choices)
    else:
        words = {int: "integer", float: "number"}.get(base, "path" if isinstance(p.type, click.Path) else "text")
    return words + (", repeatable" if multiple else "")


def _default_words(p: click.Parameter, ctx: click.Context) -> str:
    if p.required:
        return "required"
    d = p.get_default(ctx, call=False)
    if d is _UNSET:
        return ""
    if isinstance(p, click.Option) and p.is_flag:
        if p.secondary_opts:
            return f"`{p.opts[0] if d else p.secondary_opts[0]}`"
        return "on" if d is True else "off"
    if d is None or d == () or callable(d):
        return ""
    if isinstance(d, (tuple, list)):
        return ", ".join(f"`{x}`" for x in d)
    return f"`{d}`"


def command_markdown(name: str, cmd: click.Command) -> list[str]:
    """One command's section of the reference."""
    args = [p.human_readable_name for p in cmd.params if isinstance(p, click.Argument)]
    out = [f"## curate {name}", "", _cell(cmd.help or cmd.short_help or ""), ""]
    if args:
        out += ["Arguments: " + " ".join(f"`{a}`" for a in args) + " (in a pipeline step: `args: [...]`).", ""]
    out += ["| option | YAML key | type | default | sets | help |", "|---|---|---|---|---|---|"]
    ctx = click.Context(cmd, info_name=name)
    for p in cmd.params:
        if not isinstance(p, click.Option) or not any(o.startswith("--") for o in p.opts):
            continue
        flag = next(o for o in p.opts if o.startswith("--"))
        shown = "/".join([flag] + [o for o in p.secondary_opts if o.startswith("--")])
        sets = ""
        if isinstance(p, DeclaredOption):
            d = p.declaration
            sets = f"`{d.owner}.{d.name}`" + (" (runtime)" if d.runtime else "")
        out.append(f"| `{shown}` | `{flag[2:].replace('-', '_')}` | {_type_words(p)} | {_default_words(p, ctx)} | "
                   f"{sets} | {_cell(p.help or '')} |")
    return out + [""]


def reference_markdown(commands: Mapping[str, click.Command]) -> str:
    """docs/OPTIONS.md: the commands' options, generated (`python -m curate.commands.reference` writes it)."""
    lines = [
        "# curate options reference",
        "",
        "Generated by `python -m curate.commands.reference` from the config declarations (`curate/options.py`) and the",
        "commands; do not edit by hand. In a pipeline step (`pipelines/*.yaml`) an option is set by its YAML key:",
        "`true` gives a flag (`false` turns an on-by-default one off), a list repeats a repeatable option; a wrong",
        "key, type or choice stops `curate run` with exit code 2. *sets* names the config field an option fills;",
        "*(runtime)* fields change how work runs, not what it writes, and are left out of the config fingerprint,",
        "so changing them resumes instead of being refused.",
        "",
    ]
    for name in sorted(commands):
        lines += command_markdown(name, commands[name])
    return "\n".join(lines).rstrip() + "\n"


AUTO = "auto"


def cosine_or_auto(value: str) -> float | str:
    """A cosine flag that also takes 'auto' (dedup --threshold): the number, or AUTO."""
    if str(value).strip().lower() == AUTO:
        return AUTO
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not 'auto' or a cosine", param_hint="--threshold") from None


def parse_k(value: str) -> int:
    """--k of the k-means stages (dedup, target-filter): 'auto' (0) or a positive integer."""
    if value == AUTO:
        return 0
    try:
        k = int(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not 'auto' or an integer", param_hint="--k") from None
    if k < 1:
        raise click.BadParameter("must be at least 1", param_hint="--k")
    return k

