"""`fedtune site check`: everything a site operator should know before starting the daemon."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from cryptography import x509

from fedtune.common.errors import ConfigError, DataError, FedtuneError
from fedtune.common.io import parse_host_port, read_bytes
from fedtune.common.tls import (
    check_ca_certificate,
    check_server_certificate,
    now_utc,
    parse_pem_certificate,
    served_certificate,
)

from .daemon import SiteConfig
from .prepare_report import SHOWN_ROWS, row_list

if TYPE_CHECKING:
    from fedtune.common.data import RowProblem


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # ok, but the operator should act (e.g. the data changed since `site prepare`)


def _table(site: SiteConfig) -> Any:
    """A classification site's rows (a ``TextTable``), read by the training path's reader.

    Raises:
        DataError: naming every unusable row by number and reason, never its value (``_unusable_rows``).
    """
    from fedtune.common.data import load_table

    problems: list[RowProblem] = []
    table = load_table(site.data_path, text_column=site.text_column, label_column=site.label_column, problems=problems)
    if problems:
        raise _unusable_rows(site, len(table), problems, {site.text_column: "blank texts", site.label_column: "missing labels"},
                             fix="every row has a text and a label")
    return table


def _check_data(site: SiteConfig) -> str:
    from fedtune.common.data import label_set, record_digests

    table = _table(site)
    labels = label_set(table.labels)
    counts = {lab: table.labels.count(lab) for lab in labels}
    if len(labels) < 2:
        raise FedtuneError(f"{site.data_path}: only the label(s) {labels}; training needs at least 2.")
    if site.labels:
        from fedtune.common.data import check_labels

        check_labels(table, list(site.labels))  # names the first row outside the published set
    distinct = len(set(record_digests(table.texts, table.labels)))
    return f"{len(table.labels)} rows ({distinct} distinct records in the ledger's sense), {len(labels)} labels {counts}"


def _unusable_rows(site: SiteConfig, kept: int, problems: Sequence[RowProblem], blank: Mapping[str, str], *, fix: str) -> DataError:
    """The rows a reader refused (``kept``: the rows it accepted), by number and reason, never their values.

    ``site check`` and ``site ledger`` print it, while the training path's own messages quote the values they
    refuse: so the readers run in their collecting mode here (``common.data.RowProblem``). ``blank``: column ->
    what its blank cells are called ("blank prompts"); every other problem is an unusable row."""
    def row(p: RowProblem) -> str:
        return p.where.removeprefix(f"{site.data_path} ")

    found = []
    for column, what in blank.items():
        rows = [row(p) for p in problems if p.blank and p.column == column]
        if rows:
            found.append(f"{len(rows)} {what} in column {column!r} ({row_list(rows)})")
    bad = [f"{row(p)}: column {p.column!r} {p.reason}" for p in problems if not (p.blank and p.column in blank)]
    if bad:
        found.append(f"{len(bad)} unusable rows: " + "; ".join(bad[:SHOWN_ROWS]))
    return DataError(f"{site.data_path}: {kept + len(problems)} rows; " + "; ".join(found) + f". Training refuses the file until "
                     f"{fix}: fill or remove those rows.")


def _lm_table(site: SiteConfig) -> Any:
    """A causal-lm site's examples (an ``LMTable``), read by the training path's reader.

    Raises:
        DataError: naming the file, how many rows are unusable and why, and their row numbers, never
            their text (``_unusable_rows``).
    """
    from fedtune.common.causal_lm import LMDataSettings, load_lm_table

    problems: list[RowProblem] = []
    settings = LMDataSettings(prompt_column=site.prompt_column, response_column=site.response_column,
                              messages_column=site.messages_column)
    table = load_lm_table(site.data_path, settings, problems=problems)
    if problems:
        blank = {} if site.messages_column else {site.prompt_column: "blank prompts", site.response_column: "empty responses"}
        raise _unusable_rows(site, len(table), problems, blank, fix="every row has a prompt and a response")
    return table


def _check_lm_data(site: SiteConfig, *, max_length: int = 0) -> str:
    """Rows, empty responses and token lengths against ``max_length`` (0: the causal-lm default),
    with the site's base model's tokenizer, encoded by the training path's ``encode_lm``. Only counts
    and row numbers are printed, never text."""
    import statistics

    from fedtune.common.causal_lm import encode_lm, lm_record_digests, load_lm_tokenizer, use_chat
    from fedtune.common.config import TASK_MAX_LENGTH, ModelConfig
    from fedtune.common.model import resolve_base_model

    max_length = max_length or TASK_MAX_LENGTH["causal-lm"]
    table = _lm_table(site)
    tokenizer = load_lm_tokenizer(resolve_base_model(ModelConfig(base_model=str(site.base_model or "")), "causal-lm"))
    chat = use_chat(tokenizer, "auto", needed=bool(site.messages_column))
    no_tokens: list[RowProblem] = []
    encoded = encode_lm(tokenizer, table, max_length=max_length, template="auto", problems=no_tokens)
    if no_tokens:
        rows = [p.where.removeprefix(f"{table.source} ") for p in no_tokens]
        raise FedtuneError(f"{site.data_path}: {len(rows)} rows whose prompt or response encodes to no tokens ({row_list(rows)}).")
    distinct = len(set(lm_record_digests(table)))
    columns = f"chats in {site.messages_column!r}" if site.messages_column else f"{site.prompt_column!r} -> {site.response_column!r}"
    lengths, dropped = sorted(encoded.lengths), [f"row {r}" for r in encoded.dropped_rows]
    return (f"causal-lm: {len(table)} rows ({distinct} distinct records in the ledger's sense), {columns}, rendered "
            f"{'with the chat template' if chat else 'as plain text'}; tokens per example: median {statistics.median(lengths):g}, "
            f"95th percentile {lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]}, max {lengths[-1]}; at max_length {max_length}: "
            f"{encoded.truncated} would be truncated (end of the response cut), {len(dropped)} dropped (the prompt alone fills it"
            + (f": {row_list(dropped)}" if dropped else "") + ")")


def _check_site_data(site: SiteConfig, *, max_length: int = 0) -> str:
    """The data checks of every task the site's policy allows."""
    details = []
    if "classification" in site.policy.allowed_tasks:
        details.append(_check_data(site))
    if "causal-lm" in site.policy.allowed_tasks:
        details.append(_check_lm_data(site, max_length=max_length))
    return "; ".join(details)


def site_record_digests(site: SiteConfig) -> list[str]:
    """The privacy ledger's keys of the site's rows, for every task its policy allows."""
    from fedtune.common.data import record_digests

    records: list[str] = []
    if "classification" in site.policy.allowed_tasks:
        table = _table(site)  # a bad row is named by its number, never quoted
        records += record_digests(table.texts, table.labels)
    if "causal-lm" in site.policy.allowed_tasks:
        from fedtune.common.causal_lm import lm_record_digests

        records += lm_record_digests(_lm_table(site))  # a bad row is named by its number, never quoted
    return list(dict.fromkeys(records))


def _check_model(site: SiteConfig) -> str:
    from fedtune.common.config import ModelConfig
    from fedtune.common.model import load_tokenizer, resolve_base_model

    config = ModelConfig(base_model=str(site.base_model or ""))
    found = []
    for task in site.policy.allowed_tasks:  # the site's own folder, else each task's packaged default
        path = resolve_base_model(config, task)
        load_tokenizer(config, task)
        found.append(f"{task}: {'base model' if site.base_model else 'default base model'} loads from {path}")
    return "; ".join(found)


def _check_keys(site: SiteConfig) -> str:
    if site.insecure:
        raise FedtuneError("site.insecure = true: no TLS and no node authentication (local experiments only).")
    if site.ca is None or site.node_key is None:
        raise FedtuneError("site.ca and site.node_key are required unless site.insecure = true.")
    ca, _ = check_credentials(site, probe=False)
    mode = site.node_key.stat().st_mode & 0o777
    if mode & 0o077:
        raise FedtuneError(f"{site.node_key} is readable by others (mode {mode:o}); run chmod 600 {site.node_key}.")
    return f"CA {ca.subject.rfc4514_string()} (until {ca.not_valid_after_utc:%Y-%m-%d}); node key {site.node_key} (0600)"


def check_credentials(
    site: SiteConfig, *, probe: bool = True, at: dt.datetime | None = None, timeout: float = 5.0
) -> tuple[x509.Certificate, x509.Certificate | None]:
    """Check a secure site's TLS and node-authentication inputs before any Flower process uses them.

    ``site.ca`` must be a PEM CA certificate valid now and ``site.node_key`` a key flower-supernode
    can use (``identity.check_node_private_key``). With ``probe``, the certificate the coordinator
    presents at ``site.coordinator`` is read (a handshake that verifies nothing and sends nothing) and
    must be issued by that CA, valid now and name the host dialled. A coordinator that does not
    answer is not an error here: the daemon keeps trying, and `site check` reports it.

    Returns:
        The CA certificate, and the coordinator's certificate (None if not probed or not reachable).

    Raises:
        ConfigError: naming the setting and file (or the coordinator's address), what was found
            (the validity window and now, the names the certificate covers, its issuer, the key's
            type) and what to do.
    """
    from .identity import check_node_private_key

    if site.ca is None or site.node_key is None:
        raise ConfigError("site.ca and site.node_key are required unless site.insecure = true.")
    when = now_utc(at)
    ca = parse_pem_certificate(read_bytes(site.ca), source=f"site.ca {site.ca}")
    check_ca_certificate(ca, subject=f"site.ca {site.ca}", at=when)
    check_node_private_key(site.node_key)
    return ca, check_coordinator_certificate(site, ca, at=when, timeout=timeout) if probe else None


def check_coordinator_certificate(
    site: SiteConfig, ca: x509.Certificate, *, at: dt.datetime | None = None, timeout: float = 5.0
) -> x509.Certificate | None:
    """Read the certificate the coordinator presents at ``site.coordinator`` and check it against ``ca``.

    Returns:
        The certificate, or None when nothing answers there with TLS.

    Raises:
        ConfigError: it is not issued by ``ca``, not valid now or does not name the host dialled.
    """
    host, port = parse_host_port(site.coordinator, where="site.coordinator")
    served = served_certificate(host, port, where="site.coordinator", timeout=timeout,
                                not_tls="is the coordinator started with --insecure, or is this not its sites' port "
                                        "(`coordinator start --port`)?")
    if served is not None:
        check_server_certificate(
            served, ca, host=host, at=now_utc(at), subject=f"the certificate the coordinator at {site.coordinator} presents",
            ca_subject=f"site.ca {site.ca}", fix_host=f"set site.coordinator to a name it covers, or have the coordinator "
                                                      f"create one that names {host!r} (`fedtune certs init --host {host}`)",
        )
    return served


def _check_ledger(site: SiteConfig, shown: int = 10) -> str:
    from .ledger import PrivacyLedger

    ledger = PrivacyLedger(site.state_dir)
    summary = ledger.summary(site_record_digests(site), delta=site.delta)
    lines = [f"{ledger.path}: max epsilon {summary.max_epsilon:.3f} of budget {site.budget_epsilon:g} (delta {site.delta:g}), "
             f"left {summary.left(site.budget_epsilon):.3f}; {summary.at_max} of {summary.records} records at the max, "
             f"{summary.never_spent} never spent; {len(summary.charges)} charges"]
    if summary.charges:
        header, *rows = summary.table()
        if len(rows) > shown:
            lines.append(f"  ... {len(rows) - shown} earlier charges: see `fedtune site ledger`")
        lines += ["  " + line for line in [header, *rows[-shown:]]]
    return "\n".join(lines)


def _check_coordinator(site: SiteConfig, timeout: float = 5.0) -> str:
    host, port = parse_host_port(site.coordinator, where="site.coordinator")
    if not site.insecure and site.ca is not None:
        # Names a wrong certificate (expired, another host, another CA) before the verified handshake below.
        check_coordinator_certificate(site, parse_pem_certificate(read_bytes(site.ca), source=f"site.ca {site.ca}"), timeout=timeout)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if site.insecure:
            return f"{site.coordinator} accepts TCP connections (no TLS: insecure)"
        context = ssl.create_default_context(cafile=str(site.ca))
        with context.wrap_socket(sock, server_hostname=host) as tls:
            return f"{site.coordinator} reachable over {tls.version()}, certificate verified against {site.ca}"


def _check_policy(site: SiteConfig) -> str:
    p = site.policy
    secure = (f"required (threshold >= {p.min_secure_agg_threshold}, participants >= {p.min_secure_agg_participants})"
              if p.require_secure_agg else "optional")
    return (f"DP {'required' if p.require_dp else 'optional'}; per run epsilon <= {p.max_epsilon_per_run:g}, z >= {p.min_noise_multiplier:g}, "
            f"C <= {p.max_clip_norm:g}, q <= {p.max_sample_rate:g}, steps {p.min_steps_per_round}-{p.max_steps_per_round}; "
            f"secure aggregation {secure}; statistics released: {p.statistics}; validation split {site.val_fraction:g}"
            + (f"; LoRA rank <= {p.max_lora_rank}" if p.max_lora_rank else "") + f"; tasks allowed: {', '.join(p.allowed_tasks)}")


def check_prepared(site: SiteConfig) -> CheckResult | None:
    """The `site prepare` report of the configured data file: a warning when the file changed since it was
    written (its sha256 and size are in the report), or when site.toml still names the raw file; None when
    there is no report (preparing is optional, so `site check` then prints no line for it)."""
    from .prepare import report_warning

    try:
        report, warning = report_warning(site.data_path)
    except (ConfigError, OSError) as err:
        return CheckResult("prepare report", False, f"{type(err).__name__}: {err}")
    if report is None:
        return None
    if warning:
        return CheckResult("prepare report", True, warning, warning=True)
    return CheckResult("prepare report", True, f"{site.data_path.name} is unchanged since `site prepare` wrote {report.name}")


CHECKS: tuple[tuple[str, Callable[[SiteConfig], str]], ...] = (
    ("data", _check_site_data),
    ("policy", _check_policy),
    ("model", _check_model),
    ("certificates", _check_keys),
    ("privacy ledger", _check_ledger),
    ("coordinator", _check_coordinator),
)


def run_checks(site: SiteConfig, *, max_length: int = 0) -> Iterator[CheckResult]:
    """Run every check; a failure is reported with its reason and the others still run.

    ``max_length``: causal-lm, the run's ``model.max_length`` that truncation is counted against
    (0: the task's default).
    """
    for name, check in CHECKS:
        try:
            yield CheckResult(name, True, _check_site_data(site, max_length=max_length) if check is _check_site_data else check(site))
        except (FedtuneError, OSError, ValueError, ssl.SSLError) as err:
            yield CheckResult(name, False, f"{type(err).__name__}: {err}")
        prepared = check_prepared(site) if check is _check_site_data else None
        if prepared is not None:
            yield prepared
