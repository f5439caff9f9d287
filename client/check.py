"""`fedtune site check`: everything a site operator should know before starting the daemon."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Iterator

from fedtune.common.errors import FedtuneError
from fedtune.common.io import parse_host_port

from .daemon import SiteConfig


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def _check_data(site: SiteConfig) -> str:
    from fedtune.common.data import label_set, load_table, record_digests

    table = load_table(site.data_path, text_column=site.text_column, label_column=site.label_column)
    labels = label_set(table.labels)
    counts = {lab: table.labels.count(lab) for lab in labels}
    if len(labels) < 2:
        raise FedtuneError(f"{site.data_path}: only the label(s) {labels}; training needs at least 2.")
    if site.labels:
        from fedtune.common.data import check_labels

        check_labels(table, list(site.labels))  # names the first row outside the published set
    distinct = len(set(record_digests(table.texts, table.labels)))
    return f"{len(table.labels)} rows ({distinct} distinct records in the ledger's sense), {len(labels)} labels {counts}"


def _check_model(site: SiteConfig) -> str:
    from fedtune.common.config import ModelConfig
    from fedtune.common.model import load_tokenizer, resolve_base_model

    path = resolve_base_model(ModelConfig())
    load_tokenizer(ModelConfig())
    return f"default base model loads from {path}"


def _check_keys(site: SiteConfig) -> str:
    if site.insecure:
        raise FedtuneError("site.insecure = true: no TLS and no node authentication (local experiments only).")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if site.ca is None or site.node_key is None:
        raise FedtuneError("site.ca and site.node_key are required unless site.insecure = true.")
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    mode = site.node_key.stat().st_mode & 0o777
    if mode & 0o077:
        raise FedtuneError(f"{site.node_key} is readable by others (mode {mode:o}); run chmod 600 {site.node_key}.")
    load_ssh_private_key(site.node_key.read_bytes(), None)
    return f"CA {ca.subject.rfc4514_string()} (until {ca.not_valid_after_utc:%Y-%m-%d}); node key {site.node_key} (0600)"


def _check_ledger(site: SiteConfig, shown: int = 10) -> str:
    from fedtune.common.data import load_table, record_digests

    from .ledger import PrivacyLedger

    ledger = PrivacyLedger(site.state_dir)
    table = load_table(site.data_path, text_column=site.text_column, label_column=site.label_column)
    summary = ledger.summary(record_digests(table.texts, table.labels), delta=site.delta)
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
            + (f"; LoRA rank <= {p.max_lora_rank}" if p.max_lora_rank else ""))


CHECKS: tuple[tuple[str, Callable[[SiteConfig], str]], ...] = (
    ("data", _check_data),
    ("policy", _check_policy),
    ("model", _check_model),
    ("certificates", _check_keys),
    ("privacy ledger", _check_ledger),
    ("coordinator", _check_coordinator),
)


def run_checks(site: SiteConfig) -> Iterator[CheckResult]:
    """Run every check; a failure is reported with its reason and the others still run."""
    for name, check in CHECKS:
        try:
            yield CheckResult(name, True, check(site))
        except (FedtuneError, OSError, ValueError, ssl.SSLError) as err:
            yield CheckResult(name, False, f"{type(err).__name__}: {err}")
