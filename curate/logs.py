"""curate's logging and process-wide settings, applied by the CLI and by each task process, never on import.

Every module logs to `logging.getLogger(__name__)`, so all of curate's loggers sit under the `curate`
logger. The CLI's -v/-q set that logger's level (info by default, -v debug, -q warning, -qq error); one
stderr handler sits on the root logger, which stays at WARNING, so other libraries (open_clip logs its
chatter with the root `logging.info`) show warnings only. The handler is on the root, not on `curate`,
because a library's root-level `logging.info` call would otherwise install a second handler
(`logging.basicConfig`) and print every curate line twice. Task processes that an engine spawns take the
level from the environment the CLI set, so -v reaches the workers too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

ROOT = "curate"
LEVEL_ENV = "CURATE_LOG_LEVEL"  # set by the CLI, read by spawned task processes
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def level_for(verbose: int = 0, quiet: int = 0) -> int:
    """The `curate` logger's level for -v/-q counts: INFO by default, each -v one step more, each -q one less."""
    return max(logging.DEBUG, min(logging.CRITICAL, logging.INFO - 10 * (verbose - quiet)))


def configure(level: int, stream: Any = None) -> None:
    """Set curate's log level and (re)attach the one stderr handler; called once per CLI invocation.

    The handler is replaced rather than added, so tests that call `curate.cli.main` many times do not
    print each line many times.
    """
    logging.getLogger(ROOT).setLevel(level)
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_curate", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._curate = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings only, whatever -v says
    os.environ[LEVEL_ENV] = logging.getLevelName(level)
    process_settings()


def configure_task_process() -> None:
    """In a task process an engine started (spawned pool worker, Spark executor): the CLI's level, if known."""
    name = os.environ.get(LEVEL_ENV)
    level = logging.getLevelName(name) if name else None
    if isinstance(level, int) and not any(getattr(h, "_curate", False) for h in logging.getLogger().handlers):
        configure(level)
    else:
        process_settings()


def process_settings() -> None:
    """Warning filters for the whole process (idempotent).

    Pillow's DecompressionBombWarning is noise: curate.imaging checks the pixel count against its own, lower
    --max-pixels before Pillow would warn."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
