"""One site request and its reply as plain data: what the thin ClientApp and the warm worker exchange.

Kept free of torch and the handlers' other imports, so the process Flower starts for every
message can build a request without loading them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SiteRequest:
    """One train or evaluate message, as plain data.

    Attributes:
        kind: 'train' or 'evaluate'.
        run_config: Flower's flat run config.
        node_config: The site's node config (its data, ledger and budget; see ``site.py``).
        run_id: Flower's run id (keys the noise plan in the ledger).
        config: The message's config: server-round, num-rounds, labels, run-dir.
        arrays: The global adapter, by tensor name.
    """

    kind: str
    run_config: dict[str, Any]
    node_config: dict[str, Any]
    run_id: int
    config: dict[str, Any]
    arrays: OrderedDict[str, np.ndarray]


@dataclass(frozen=True)
class SiteReply:
    """What goes back: the adapter (train only), scalar metrics, and the site's name."""

    site: str
    metrics: dict[str, int | float]
    arrays: OrderedDict[str, np.ndarray] | None = None
