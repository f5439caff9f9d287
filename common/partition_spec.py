"""The partition syntax of a simulation ('iid', 'dirichlet:ALPHA', 'column:NAME'), parsed without numpy.

The config checks it on every load, `fedtune --help` included; the seeded splits themselves live in
common/partition.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedtune.common.errors import ConfigError

PartitionKind = Literal["iid", "dirichlet", "column"]
_FORMS = "'iid', 'dirichlet:ALPHA' (ALPHA > 0, e.g. 'dirichlet:0.5') or 'column:NAME'"

@dataclass(frozen=True, kw_only=True)
class PartitionSpec:
    """How a simulation spreads examples over sites; build it with `parse_partition`.

    Attributes:
        kind: 'iid', 'dirichlet' (label skew) or 'column' (one site per distinct value of a column).
        alpha: The Dirichlet concentration, > 0, for 'dirichlet' only; smaller is more skewed.
        column: The column whose values name the sites, for 'column' only.
    """

    kind: PartitionKind
    alpha: float | None = None
    column: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("iid", "dirichlet", "column"):
            problems.append(f"`kind` must be 'iid', 'dirichlet' or 'column', got {self.kind!r}")
        if self.kind == "dirichlet":
            if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
                problems.append(f"`alpha` must be a finite number > 0 for 'dirichlet', got {self.alpha!r}")
        elif self.alpha is not None:
            problems.append(f"`alpha` applies to 'dirichlet' only, got {self.alpha!r} for {self.kind!r}")
        if self.kind == "column":
            if not (isinstance(self.column, str) and self.column):
                problems.append(f"`column` must name a column for 'column', got {self.column!r}")
        elif self.column is not None:
            problems.append(f"`column` applies to 'column' only, got {self.column!r} for {self.kind!r}")
        if problems:
            raise ConfigError(problems)

    def __str__(self) -> str:
        """The spec in the form `parse_partition` reads, for logs and run records."""
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha!r}"
        if self.kind == "column":
            return f"column:{self.column}"
        return "iid"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse 'iid', 'dirichlet:ALPHA' (ALPHA > 0) or 'column:NAME'; case and spaces are significant.

    Raises:
        ConfigError: naming the value and the allowed forms.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"partition must be one of {_FORMS}, got {spec!r}.")
    kind, colon, argument = spec.partition(":")
    if kind == "iid" and not colon:
        return PartitionSpec(kind="iid")
    if kind == "dirichlet" and colon:
        try:
            alpha = float(argument)
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(
                f"partition {spec!r}: ALPHA must be a number > 0, got {argument!r}; allowed: {_FORMS}."
            )
        return PartitionSpec(kind="dirichlet", alpha=alpha)
    if kind == "column" and argument:
        return PartitionSpec(kind="column", column=argument)
    raise ConfigError(f"partition must be one of {_FORMS}, got {spec!r}.")
