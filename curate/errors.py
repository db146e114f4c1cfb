"""Errors that the CLI turns into clear messages and exit codes."""

from __future__ import annotations


class CurateError(Exception):
    """A failure the user can act on. The CLI prints the message and exits with `exit_code`."""

    exit_code = 1


class InputError(CurateError):
    """Bad arguments or unreadable inputs: the message names the file, column or flag. Exit code 2."""

    exit_code = 2


class ConfigMismatchError(CurateError):
    """A rerun over existing output with a different config fingerprint (use --redo to replace)."""

    exit_code = 2


class ShardError(CurateError):
    """A whole shard could not be processed (truncated tar, unreadable input)."""
