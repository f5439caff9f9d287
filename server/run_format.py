"""The format of a run directory, and the refusal of one that another fedtune version wrote.

Kept apart from ``server/resume.py`` (which needs Flower and torch) so that ``fedtune report`` can
check a run directory in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune import __version__
from fedtune.common.errors import ConfigError

RUN_FILE = "run.json"
FORMAT = 1
"""Format of run.json, resume-state.json and complete.json; another one is refused, never guessed at."""


def format_problem(path: Path, data: Any, *, action: str) -> str:
    """Why a run.json of another format is refused: both formats and both fedtune versions, and the fix."""
    found = data.get("format") if isinstance(data, dict) else None
    writer = data.get("fedtune_version", "unknown") if isinstance(data, dict) else "unknown"
    return (f"{path} has format {found!r} (written by fedtune {writer}); this fedtune {__version__} reads format {FORMAT} "
            f"only: {action} with fedtune {writer}, which wrote it.")


def check_run_format(run_dir: Path, *, action: str) -> None:
    """Refuse a run directory that another fedtune version wrote in a format this one does not read.

    Its ``run.json`` (written before round 1 by every fedtune that writes one) carries the format of
    the whole directory; a directory without one is older and is left to the reader's own checks of
    the files it needs. ``action`` says what the user wanted ("report on it").

    Raises:
        ConfigError: naming run.json, its format and writer, this fedtune's version and format.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {err}); is RUN_DIR a fedtune run directory?") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(format_problem(path, data, action=action))
