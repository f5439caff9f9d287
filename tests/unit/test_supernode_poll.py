"""The SuperNode entry point that shortens Flower's fixed idle poll."""

from __future__ import annotations

import importlib
import inspect
import time

import pytest

from fedtune.client import supernode


def test_the_sleeps_it_caps_are_still_in_flowers_supernode_loop() -> None:
    source = inspect.getsource(importlib.import_module("flwr.supernode.start_client_internal"))
    assert "time.sleep(3)" in source, "the idle poll this module shortens has moved: re-check client/supernode.py"
    assert "time.sleep(0.5)" in source


def test_capped_clock_shortens_long_sleeps_and_passes_the_rest_through() -> None:
    clock = supernode.CappedClock(0.05)
    started = time.perf_counter()
    clock.sleep(3)
    assert time.perf_counter() - started < 1.0
    assert clock.time() == pytest.approx(time.time(), abs=1.0)
    assert clock.monotonic is time.monotonic


def test_install_gives_only_flowers_loop_module_the_capped_clock() -> None:
    module = importlib.import_module("flwr.supernode.start_client_internal")
    saved = module.time
    try:
        supernode.install(0.1)
        assert isinstance(module.time, supernode.CappedClock) and module.time.cap == 0.1
        assert time.sleep is not module.time.sleep, "the real time module is untouched"
    finally:
        module.time = saved


@pytest.mark.parametrize(("raw", "expected"), [("", 0.2), ("0.5", 0.5), ("3", 3.0)])
def test_poll_interval_from_the_environment(raw: str, expected: float) -> None:
    assert supernode.poll_interval({supernode.POLL_ENV: raw}) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "fast", "10"])
def test_a_bad_poll_interval_names_the_variable_and_the_value(raw: str) -> None:
    with pytest.raises(SystemExit, match=f"FEDTUNE_SUPERNODE_POLL.*{raw}"):
        supernode.poll_interval({supernode.POLL_ENV: raw})
