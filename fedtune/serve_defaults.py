"""Defaults that `fedtune serve` shares with the commands it mirrors, importable without torch or FastAPI.

The CLI's options read them at import time (`fedtune --help` loads no model library), and
`fedtune.serve.ServeSettings` reads the same names, so that ``POST /generate`` without
``max_new_tokens`` answers what ``fedtune generate`` prints without ``--max-new-tokens``.
"""

from __future__ import annotations

DEFAULT_NEW_TOKENS = 64  # greedy tokens per prompt: `fedtune generate --max-new-tokens`, serve's /generate
