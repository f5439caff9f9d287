"""benchmarks/aggregation_study.py: which learning rate each method's run gets.

The centralized non-private reference keeps its own best rate (0.01) now that fedtune's default
is 0.05 in both modes; a weaker reference would flatter every federated method.
"""

from __future__ import annotations

import pytest

from fedtune.common.config import from_flat
from tests.benchmark_module import load_benchmark

def _bench():  # type: ignore[no-untyped-def]
    return load_benchmark("aggregation_study.py", "aggregation_study_bench")


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
