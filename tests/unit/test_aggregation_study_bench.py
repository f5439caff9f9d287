"""benchmarks/aggregation_study.py: which learning rate each method's run gets.

The centralized non-private reference keeps its own best rate (0.01) now that fedtune's default
is 0.05 in both modes; a weaker reference would flatter every federated method.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from fedtune.common.config import from_flat

ROOT = Path(__file__).resolve().parents[2]


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("aggregation_study_bench", ROOT / "benchmarks" / "aggregation_study.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("method", "mode", "fixed", "expected"), [
    ("central", "nodp", {}, 0.01),
    ("central", "dp", {}, 0.05),
    ("fedavg", "nodp", {}, 0.05),
    ("fedavg", "dp", {}, 0.05),
    ("central", "nodp", {"train.learning_rate": 0.05}, 0.05),  # --set wins
])
def test_learning_rate_per_method_and_mode(method: str, mode: str, fixed: dict[str, object], expected: float) -> None:
    bench = _bench()
    flat = {**bench.central_plain_rate(method, mode, fixed), **fixed, "privacy.enabled": mode == "dp"}
    assert from_flat(flat).learning_rate == pytest.approx(expected)
