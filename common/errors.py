"""The error hierarchy. Every message names what was wrong, the value found, and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable


class FedtuneError(Exception):
    """Base class of every error fedtune raises on purpose."""


class ConfigError(FedtuneError):
    """A configuration value (file, flag, run_config or node_config) is invalid.

    Carries every problem found, so a user fixes them all in one go.
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(FedtuneError):
    """Local data cannot be used: missing file or column, bad row, unknown label."""


class UpdateError(FedtuneError):
    """A site update (or a message on the wire) breaks the protocol: keys, shapes, dtypes, values."""


def check_tensor_names(expected: Iterable[str], got: Iterable[str], *, source: str) -> None:
    """Raise UpdateError unless ``got`` names exactly the ``expected`` tensors (the first few of each kind named)."""
    want, have = set(expected), set(got)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing or extra:
        raise UpdateError(
            f"{source} has {len(have)} tensors, expected {len(want)}; "
            f"missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )


class PrivacyBudgetError(FedtuneError):
    """Training would spend more privacy than the site's budget allows; raised before any training."""

    def __init__(self, message: str, *, budget: float, spent: float, requested: float) -> None:
        self.budget = budget
        self.spent = spent
        self.requested = requested
        super().__init__(message)
