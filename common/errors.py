"""The error hierarchy. Every message names what was wrong, the value found, and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable


class FedtuneError(Exception):
    """Base class of every error fedtune raises on purpose.

    ``code`` is what a site sends when this error refuses a message (a value of
    ``common.messages.RefusalCode``); the message itself stays in the site's log.
    """

    code = "internal-error"


class ConfigError(FedtuneError):
    """A configuration value (file, flag, run_config or node_config) is invalid.

    Carries every problem found, so a user fixes them all in one go.
    """

    code = "site-config"

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(FedtuneError):
    """Local data cannot be used: missing file or column, bad row, unknown label."""

    code = "data-unavailable"


class LabelsMismatchError(DataError):
    """The site's labels are not the run's label set."""

    code = "labels-mismatch"


class UpdateError(FedtuneError):
    """A site update (or a message on the wire) breaks the protocol: keys, shapes, dtypes, values."""

    code = "bad-request"


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

    code = "budget-exhausted"

    def __init__(self, message: str, *, budget: float, spent: float, requested: float) -> None:
        self.budget = budget
        self.spent = spent
        self.requested = requested
        super().__init__(message)


class PolicyRefusal(FedtuneError):
    """A run asks for more than the site's policy allows (or something the site refuses to do).

    ``code`` is the RefusalCode sent; the message (setting, limit, value asked) stays on the site.
    """

    def __init__(self, code: object, message: str) -> None:
        self.code = str(getattr(code, "value", code))  # type: ignore[misc]
        super().__init__(message)


class RoundFailedError(FedtuneError):
    """A round ended with fewer usable site updates than ``federation.min_sites``.

    The run stops after the previous round's checkpoint, before anything is aggregated or
    released for this round, and can be continued with ``--resume`` once the sites are back.
    ``missing`` names each sampled site without a usable update and why ("site-b: timeout").
    """

    def __init__(self, message: str, *, server_round: int, usable: int, sampled: int, min_sites: int, missing: list[str]) -> None:
        self.server_round = server_round
        self.usable = usable
        self.sampled = sampled
        self.min_sites = min_sites
        self.missing = list(missing)
        super().__init__(message)
