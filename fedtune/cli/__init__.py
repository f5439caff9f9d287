"""The ``fedtune`` command line: the root group (root.py) and one module per command group.

Each module adds its commands to the root group; this package imports them all, so ``fedtune.cli.main``
is the whole CLI. Nothing here imports torch, transformers or Flower: ``fedtune --help`` stays instant.
"""

from fedtune.cli import model, serving, sweep, train  # noqa: F401  (they add their commands to main)
from fedtune.cli.app_signing import app
from fedtune.cli.coordinator import certs, coordinator, logs, status, stop
from fedtune.cli.privacy import audit, report
from fedtune.cli.root import main
from fedtune.cli.site import site

for _command in (certs, site, coordinator, status, logs, stop, app, report, audit):
    main.add_command(_command)

__all__ = ["main"]
