"""Fault injection for tests and research: simulated sites that crash, hang or refuse (simulation only).

``fedtune simulate --fail-site NAME@ROUND[:crash|hang|refuse]`` (``faults.fail_sites``, parsed by
``common.config.parse_site_fault``) makes simulated site NAME fail its train message of round
ROUND:

- ``refuse``: before anything else, it refuses with ``RefusalCode.INJECTED`` (nothing trained,
  nothing charged), as a site whose policy refuses a run does;
- ``hang``: it sleeps past the round's deadline (``federation.round_timeout`` plus
  :data:`HANG_GRACE_SECONDS`, never longer), then trains and replies late; the coordinator has
  closed the round by then and names it ``timeout``. Its ledger holds the round's charge
  (privacy is spent when noise is drawn), which no reply reported;
- ``crash``: it trains, so the round's charge is in its ledger, then its ClientApp raises
  :class:`InjectedCrash`, which Flower turns into an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``)
  as it does for any exception a ClientApp lets out. The site's next reply reports an epsilon that
  includes the round it crashed in.

Why simulation only: the run config reaches every site and is written by whoever submits the run.
A deployed site (Flower sets no ``partition-id`` in its node config) refuses a run that carries
any fault plan, before it reads data or trains, so no coordinator can make a real site crash,
hang or refuse. No torch import here: the thin ClientApp process loads this module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from fedtune.common.config import RunConfig, SiteFault
from fedtune.common.errors import PolicyRefusal
from fedtune.common.messages import RefusalCode

logger = logging.getLogger(__name__)

HANG_GRACE_SECONDS = 3.0
"""A hanging site replies this long after the round's deadline (bounded: a test never waits forever)."""


class InjectedCrash(RuntimeError):
    """Raised by a simulated site's ClientApp in the round ``--fail-site NAME@ROUND:crash`` names.

    ``client/app.py`` lets it out of the ClientApp (every other exception becomes a refusal code),
    so the coordinator sees what a real crash looks like: Flower's error reply.
    """


def site_fault(run: RunConfig, node_config: Mapping[str, Any], *, server_round: int, kind: str) -> SiteFault | None:
    """The fault this site injects into this message, if any.

    Raises:
        PolicyRefusal: ``bad-request`` when this is a deployed site (no ``partition-id`` in its
            node config) and the run carries a fault plan: a deployed site never acts on one.
    """
    plan = run.faults.fail_sites
    if "partition-id" not in node_config:
        if plan:
            raise PolicyRefusal(
                RefusalCode.BAD_REQUEST,
                f"the run's config carries a fault plan (faults.fail_sites = {list(plan)}); fault injection is for "
                "simulations only, and this deployed site refuses any run that asks for it.",
            )
        return None
    if kind != "train" or not plan:
        return None
    name = f"site-{int(node_config['partition-id'])}"  # client/site.py names simulated sites so
    return next((f for f in run.faults.plan if f.site == name and f.round == server_round), None)


def before_training(fault: SiteFault | None, run: RunConfig) -> None:
    """Inject ``refuse`` (raise) or ``hang`` (sleep past the deadline), before the round's ledger charge."""
    if fault is None:
        return
    if fault.mode == "refuse":
        raise PolicyRefusal(RefusalCode.INJECTED, f"{fault.site} refuses round {fault.round}: injected by --fail-site {fault}.")
    if fault.mode == "hang":
        seconds = run.federation.round_timeout + HANG_GRACE_SECONDS
        logger.warning("%s hangs in round %d for %.1fs (--fail-site %s)", fault.site, fault.round, seconds, fault)
        time.sleep(seconds)


def after_training(fault: SiteFault | None) -> None:
    """Inject ``crash``: raise after the round's training (and so after its ledger charge)."""
    if fault is not None and fault.mode == "crash":
        raise InjectedCrash(f"{fault.site} crashes in round {fault.round} after its ledger charge (--fail-site {fault})")
