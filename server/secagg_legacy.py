"""Flower's legacy SecAgg+ pieces, adapted: imported only when a secure round runs.

The workflow reads a ``LegacyContext`` and a legacy strategy; :class:`HandOver` is the smallest
such strategy (it hands over fedtune's instructions and keeps the unmasked mean), and
:class:`LoudSecAggPlus` runs Flower's stages but raises where Flower would only log "halted".
Importing this module also points both ends of the protocol at fedtune's mask generator.
"""

from __future__ import annotations

from typing import Any

from flwr.common import Parameters
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedtune.common.masks import install

from .secure_agg import SecureAggregationError

install()  # 256-bit mask generator on both ends (see common/masks.py)


class HandOver(LegacyStrategy):
    """Gives the workflow the instructions fedtune's strategy made; keeps the unmasked mean."""

    def __init__(self, instructions: list[tuple[Any, Any]]) -> None:
        self.instructions = instructions
        self.aggregate: Parameters | None = None

    def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        # The workflow hands every result the same unmasked weighted mean.
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


class LoudSecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, stage by stage, raising where Flower would only log and return."""

    def __call__(self, grid, context) -> None:  # type: ignore[no-untyped-def]
        state = WorkflowState()
        stages = (
            ("setup", self.setup_stage),
            ("share keys", self.share_keys_stage),
            ("collect masked vectors", self.collect_masked_vectors_stage),
            ("unmask", self.unmask_stage),
        )
        for name, stage in stages:
            if not stage(grid, context, state):
                raise SecureAggregationError(
                    f"secure aggregation failed at stage '{name}': {len(state.active_node_ids)} of "
                    f"{len(state.sampled_node_ids)} sampled sites still taking part, {state.threshold} needed"
                )
