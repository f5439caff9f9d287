"""De-identification before training: a site's text, redacted where it lives, is what trains.

Opt-in per site (``[deid]`` in site.toml; ``data.deidentify`` in a simulation). Entities are found by
Microsoft Presidio's analyzer (pattern recognizers; e-mail, phone via Google's libphonenumber, IBAN
with its ISO 13616 mod-97 check, card numbers with the Luhn check, dates) and by fedtune's own
recognizers where Presidio has none or needs a model (medical record and account numbers by the
words before them, postal codes by region, person names by titles, cue words and a name
gazetteer, phone numbers in the ranges reserved for fiction that libphonenumber calls invalid):
``client/deid_recognizers.py``. Nothing is downloaded and no model is loaded.

What it is not: a guarantee. Pattern recognizers miss what has no pattern (a name without a title,
cue or known first name; an identifier without its cue word); DP-SGD is what bounds what the
adapter can reveal about any one row. De-identification lowers what the model could memorise
verbatim and what a site's own prepared files hold.

The counts per entity type stay at the site (its log and ``fedtune site prepare``'s report);
nothing here reaches the coordinator (``common/messages.py`` carries no such field).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fedtune.common.config import unknown_key
from fedtune.common.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.common.causal_lm import LMTable

logger = logging.getLogger(__name__)

# The entity types, in report order.
ENTITIES = ("EMAIL", "PHONE", "DATE", "POSTAL_CODE", "MRN", "ACCOUNT", "IBAN", "CARD", "PERSON")
# The regions whose phone-number and postal-code formats are known (those of deid_recognizers.POSTAL_FORMATS,
# kept equal by a test; not imported from there, which would load Presidio with the settings), all looked for by default.
REGIONS = ("US", "GB", "CA", "DE", "FR", "NL")
# Findings below this score are dropped: Presidio's weakest date patterns ("5/10", a pain score) score 0.1-0.2.
SCORE_THRESHOLD = 0.35


@dataclass(frozen=True, kw_only=True)
class DeidSettings:
    """What a site redacts from its text before anything trains on it.

    Attributes:
        enabled: Redact before training (off by default: the site's operator opts in).
        entities: The entity types to redact (``ENTITIES``; default all).
        replacement: What stands in for each one; ``{entity}`` becomes its type ("<{entity}>" gives
            "<EMAIL>"). A fixed text ("[REDACTED]") hides the type too.
        regions: ISO 3166 codes whose phone-number and postal-code formats are looked for
            (``REGIONS``); a phone number in international form (+44 ...) is found whatever they are.
    """

    enabled: bool = False
    entities: tuple[str, ...] = ENTITIES
    replacement: str = "<{entity}>"
    regions: tuple[str, ...] = REGIONS

    def __post_init__(self) -> None:
        if self.problems():
            raise ConfigError(self.problems())

    def problems(self, where: str = "deid") -> list[str]:
        p: list[str] = []
        bad = [e for e in self.entities if e not in ENTITIES]
        if bad or not self.entities:
            p.append(f"{where}.entities must be a non-empty list of {list(ENTITIES)}, got {list(self.entities)}"
                     f"{f' ({bad} unknown)' if bad else ''}.")
        if len(set(self.entities)) != len(self.entities):
            p.append(f"{where}.entities must be distinct, got {list(self.entities)}.")
        bad = [r for r in self.regions if r not in REGIONS]
        if bad or not self.regions:
            p.append(f"{where}.regions must be a non-empty list of {list(REGIONS)}, got {list(self.regions)}"
                     f"{f' ({bad} unknown)' if bad else ''}.")
        try:
            self.replacement.format(entity="EMAIL")
        except (KeyError, IndexError, ValueError):
            p.append(f"{where}.replacement may hold {{entity}} and no other {{...}} field, got {self.replacement!r}.")
        if "\n" in self.replacement or '"' in self.replacement:
            p.append(f"{where}.replacement must not hold a newline or a double quote, got {self.replacement!r}.")
        return p


@dataclass(frozen=True)
class DeidResult:
    """The redacted texts (same order and length as the input) and what was redacted.

    Attributes:
        texts: The redacted texts.
        counts: Redactions per entity type (every type looked for, zeros included); empty when disabled.
        rows_changed: How many texts lost at least one entity.
    """

    texts: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    rows_changed: int = 0


def deidentify(texts: Sequence[str], settings: DeidSettings) -> DeidResult:
    """Redact ``settings.entities`` from each text; the texts as they are when ``settings.enabled`` is False.

    Results are memoised per process (a site prepares the same rows every round).
    """
    if not settings.enabled:
        return DeidResult(texts=list(texts))
    counts: Counter[str] = Counter({e: 0 for e in settings.entities})
    out: list[str] = []
    changed = 0
    for text in texts:
        redacted, found = _redact(text, settings)
        out.append(redacted)
        counts.update(dict(found))
        changed += bool(found)
    return DeidResult(texts=out, counts=dict(counts), rows_changed=changed)


@functools.lru_cache(maxsize=1 << 17)
def _redact(text: str, settings: DeidSettings) -> tuple[str, tuple[tuple[str, int], ...]]:
    if not text.strip():
        return text, ()
    from .deid_recognizers import analyzer

    engine = analyzer(settings.entities, settings.regions)
    results = engine.analyze(text=text, language="en", entities=list(settings.entities), score_threshold=SCORE_THRESHOLD)
    spans = _resolve(results)
    if not spans:
        return text, ()
    parts: list[str] = []
    last = 0
    for start, end, entity in spans:
        parts += [text[last:start], settings.replacement.format(entity=entity)]
        last = end
    parts.append(text[last:])
    return "".join(parts), tuple(sorted(Counter(e for _, _, e in spans).items()))


def _resolve(results: Sequence[Any]) -> list[tuple[int, int, str]]:
    """Non-overlapping spans: the highest score first, then the longest; an overlapping weaker finding is dropped.

    A checksum-validated IBAN or card (score 1.0) wins over the phone number libphonenumber reads in its digits.
    """
    chosen: list[tuple[int, int, str]] = []
    for r in sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start)):
        if all(r.end <= s or r.start >= e for s, e, _ in chosen):
            chosen.append((r.start, r.end, r.entity_type))
    return sorted(chosen)


def deidentify_lm(table: LMTable, settings: DeidSettings) -> tuple[LMTable, DeidResult]:
    """A causal-LM table with every message's content redacted (system, user and assistant turns alike).

    The returned DeidResult's ``texts`` are the redacted contents, flattened; its counts cover them all.
    """
    from fedtune.common.causal_lm import ChatMessage, LMTable

    contents = [m.content for conv in table.conversations for m in conv]
    result = deidentify(contents, settings)
    redacted = iter(result.texts)
    conversations = [tuple(ChatMessage(role=m.role, content=next(redacted)) for m in conv) for conv in table.conversations]
    return LMTable(conversations=conversations, source=table.source, from_messages=table.from_messages), result


# ---- where the settings come from: site.toml, Flower's node_config, a simulation's run config ----

NODE_KEYS = ("deid-entities", "deid-replacement", "deid-regions")


def deid_from_mapping(raw: Mapping[str, Any], *, where: str = "deid") -> tuple[DeidSettings, list[str]]:
    """``[deid]`` of site.toml: the settings and every problem found (unknown keys with a did-you-mean)."""
    problems: list[str] = []
    allowed = set(DeidSettings.__dataclass_fields__)
    for key in raw:
        if key not in allowed:
            problems.append(unknown_key(f"key {where}.{key}", key, allowed))
    values: dict[str, Any] = {}
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):  # bool("false") is True
        problems.append(f"{where}.enabled must be true or false (unquoted), got {enabled!r}.")
    values["enabled"] = enabled is True
    for key in ("entities", "regions"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{where}.{key} must be a list of strings, got {value!r}.")
            else:
                values[key] = tuple(v.strip().upper() for v in value)
    if "replacement" in raw:
        if not isinstance(raw["replacement"], str):
            problems.append(f"{where}.replacement must be a string, got {raw['replacement']!r}.")
        else:
            values["replacement"] = raw["replacement"]
    try:
        settings = DeidSettings(**values)
    except ConfigError as err:
        problems += [p.replace("deid.", f"{where}.", 1) for p in err.problems]
        settings = DeidSettings()
    return settings, problems


def to_node_config(settings: DeidSettings) -> dict[str, str]:
    """The node_config keys a deployed site passes to its ClientApp (none when de-identification is off)."""
    if not settings.enabled:
        return {}
    return {"deid-entities": ",".join(settings.entities), "deid-replacement": settings.replacement,
            "deid-regions": ",".join(settings.regions)}


def from_node_config(node_config: Mapping[str, Any]) -> DeidSettings:
    """A deployed site's settings, from its own node_config (``to_node_config``); off when it sets none."""
    if "deid-entities" not in node_config:
        return DeidSettings()
    split = lambda key: tuple(s for s in str(node_config.get(key, "")).split(",") if s)  # noqa: E731
    try:
        return DeidSettings(enabled=True, entities=split("deid-entities"), regions=split("deid-regions") or REGIONS,
                            replacement=str(node_config.get("deid-replacement", "<{entity}>")))
    except ConfigError as err:
        raise ConfigError([f"node-config: {p}" for p in err.problems]) from None


def site_deid(node_config: Mapping[str, Any], *, simulated: bool, run_deidentify: bool) -> DeidSettings:
    """What this site redacts. A deployed site follows only its own site.toml (through its node_config):
    a run can neither switch de-identification off nor change what it redacts. A simulated site follows
    the run's ``data.deidentify``."""
    if simulated:
        return DeidSettings(enabled=run_deidentify)
    settings = from_node_config(node_config)
    if run_deidentify and not settings.enabled:
        logger.warning("the run sets data.deidentify, but this site's site.toml has no [deid] enabled = true; "
                       "its own setting applies (no de-identification)")
    return settings
