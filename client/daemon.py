"""The site daemon: its own config file (``site.toml``), and the flower-supernode it runs.

Everything that decides what a site trains on and how much privacy it may spend lives in this
file on the site's premises and reaches the ClientApp only through Flower's ``node_config``:
nothing the coordinator sends can point the site at other files or raise its budget.

```toml
[site]
name = "hospital-a"
coordinator = "coordinator.example.org:9093"
ca = "ca.crt"                 # the coordinator's CA certificate (public)
node_key = "node-key"         # this site's node-authentication private key (secret, 0600)
state_dir = "state"           # the privacy ledger; keep it
[data]
path = "/data/notes.csv"
text_column = "text"
label_column = "label"
labels = ["cardiology", "neurology"]  # optional: the label set this site publishes; runs are checked against it, not the data
val_fraction = 0.1            # this site's own validation split (a run cannot shrink it)
# prompt_column = "prompt"    # causal-lm sites: the prompt and response columns,
# response_column = "response"
# messages_column = "messages"  # or one column of chats (the run decides data.template)
[privacy]
budget_epsilon = 8.0          # lifetime epsilon of each record (the ledger accounts per row)
delta = 1e-5
[policy]                      # limits no run can loosen; see client/policy.py for every key
require_dp = true             # refuse runs without DP (they would spend privacy no ledger counts)
statistics = "none"           # none | dp | clear: what may leave besides the adapter
allowed_tasks = ["classification"]  # add "causal-lm" to let runs train a generative model here
[deid]                        # optional: redact identifiers before training (client/deid.py)
enabled = true
# entities = ["EMAIL", "PHONE", "DATE", "POSTAL_CODE", "MRN", "ACCOUNT", "IBAN", "CARD", "PERSON"]
# replacement = "<{entity}>"  # what stands in for each one
# regions = ["US", "GB", "CA", "DE", "FR", "NL"]  # phone and postal-code formats looked for
```
Relative paths are relative to the folder holding ``site.toml``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import check_model_folder, coerce_setting, unknown_key
from fedtune.common.errors import ConfigError
from fedtune.common.io import parse_host_port, read_toml

from .app_guard import AppPolicy, app_policy_from_mapping
from .deid import DeidSettings, deid_from_mapping
from .deid import to_node_config as deid_node_config
from .policy import SitePolicy, policy_from_mapping

SITE_FILE = "site.toml"
# [data] keys of a causal-lm site, and their defaults (those of common.config.DataConfig).
LM_COLUMNS = {"prompt_column": "prompt", "response_column": "response", "messages_column": ""}


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """A deployed site's own settings, as read from ``site.toml`` (paths made absolute)."""

    name: str
    coordinator: str
    ca: Path | None
    node_key: Path | None
    state_dir: Path
    data_path: Path
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()  # the site's published label set (empty: checked against the data)
    budget_epsilon: float = 8.0
    delta: float = 1e-5
    insecure: bool = False
    base_model: Path | None = None  # None: the packaged all-MiniLM-L6-v2
    policy: SitePolicy = SitePolicy()
    apps: AppPolicy = AppPolicy()  # which app bundles a run may ship (see client/app_guard.py)
    val_fraction: float = 0.1
    # causal-lm: the site's own columns (the run's data.template decides how they are rendered).
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = ""
    deid: DeidSettings = DeidSettings()  # [deid]: what this site redacts before training (off by default)

    def node_config(self) -> dict[str, str | float]:
        """What the ClientApp sees as ``context.node_config`` (see ``client/site.py``)."""
        return {
            "site-name": self.name,
            "data-path": str(self.data_path),
            "state-dir": str(self.state_dir),
            "budget-epsilon": float(self.budget_epsilon),
            "delta": float(self.delta),
            "text-column": self.text_column,
            "label-column": self.label_column,
            **({"labels": json.dumps(list(self.labels))} if self.labels else {}),
            "base-model": str(self.base_model) if self.base_model else "",
            "val-fraction": float(self.val_fraction),
            # Always set for a site that allows causal-lm: a missing one would fall back to the run's
            # (client/site.py), and the coordinator would pick which of the site's columns is trained on.
            **({"prompt-column": self.prompt_column, "response-column": self.response_column,
                "messages-column": self.messages_column} if "causal-lm" in self.policy.allowed_tasks else {}),
            **self.policy.to_node_config(),
            **deid_node_config(self.deid),
        }


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate ``site.toml``; every problem is reported at once, naming the file."""
    path = Path(path)
    raw = read_toml(path, what="site config", missing_hint="create it with `fedtune site init`")
    base = path.resolve().parent
    problems: list[str] = []
    site: dict[str, Any] = raw.get("site", {})
    data: dict[str, Any] = raw.get("data", {})
    privacy: dict[str, Any] = raw.get("privacy", {})
    allowed = {"site": {"name", "coordinator", "ca", "node_key", "state_dir", "insecure"},
               "data": {"path", "text_column", "label_column", "val_fraction", "labels", *LM_COLUMNS}, "privacy": {"budget_epsilon", "delta", "allow_no_dp"},
               "policy": set(SitePolicy.__dataclass_fields__),
               "model": {"base_model"}, "apps": {"trusted_hashes", "trusted_signers"}, "deid": set(DeidSettings.__dataclass_fields__)}
    for section, keys in allowed.items():
        if not isinstance(raw.get(section, {}), dict):  # `policy = 5`: read as an empty table, reported here
            problems.append(f"[{section}] must be a table, got {raw[section]!r}.")
            raw[section] = {}
        for key in raw.get(section, {}):
            if key not in keys:
                problems.append(unknown_key(f"key {section}.{key}", key, keys))
    site, data, privacy = raw.get("site", {}), raw.get("data", {}), raw.get("privacy", {})
    for section in raw:
        if section not in allowed:
            problems.append(unknown_key(f"section [{section}]", section, allowed))
    for key, flag in (("site.insecure", site.get("insecure", False)), ("privacy.allow_no_dp", privacy.get("allow_no_dp", False))):
        if not isinstance(flag, bool):  # bool("false") is True: a quoted "false" would turn TLS off
            problems.append(f"{key} must be true or false (unquoted), got {flag!r}.")
    for key, table in (("site.name", site.get("name")), ("site.coordinator", site.get("coordinator")), ("data.path", data.get("path"))):
        if not isinstance(table, str) or not table:
            problems.append(f"{key} is required (a non-empty string), got {table!r}.")
    name = str(site.get("name", ""))
    if name and (not name.replace("-", "").replace("_", "").replace(".", "").isalnum()):
        problems.append(f"site.name may hold letters, digits, '-', '_' and '.', got {name!r}.")
    if isinstance(site.get("coordinator"), str) and site["coordinator"]:
        try:
            parse_host_port(site["coordinator"], where="site.coordinator")
        except ConfigError as err:
            problems += err.problems
    insecure = site.get("insecure", False) is True
    if not insecure:
        for key in ("ca", "node_key"):
            if not site.get(key):
                problems.append(f"site.{key} is required unless site.insecure = true.")
    typed = len(problems)  # a range says nothing new about a value of the wrong type: one problem per key
    budget = coerce_setting("privacy.budget_epsilon", privacy.get("budget_epsilon", 8.0), 8.0, problems)
    if len(problems) == typed and not budget > 0:
        problems.append(f"privacy.budget_epsilon must be > 0, got {privacy.get('budget_epsilon')!r}.")
    typed = len(problems)
    delta = coerce_setting("privacy.delta", privacy.get("delta", 1e-5), 1e-5, problems)
    if len(problems) == typed and not 0 < delta < 1:
        problems.append(f"privacy.delta must be in (0, 1), got {privacy.get('delta')!r}.")
    legacy = privacy.get("allow_no_dp")
    policy, policy_problems = policy_from_mapping(raw.get("policy", {}), legacy_allow_no_dp=None if legacy is None else legacy is True)
    problems += [p for p in policy_problems if not p.startswith("unknown key")]  # unknown keys are reported above
    apps, app_problems = app_policy_from_mapping(raw.get("apps", {}), base=base)
    problems += [p for p in app_problems if not p.startswith("unknown key")]
    deid, deid_problems = deid_from_mapping(raw.get("deid", {}))
    problems += [p for p in deid_problems if not p.startswith("unknown key")]
    labels = data.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
        problems.append(f"data.labels must be a list of distinct, non-empty strings, got {labels!r}.")
        labels = []
    val_fraction = data.get("val_fraction", 0.1)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        problems.append(f"data.val_fraction must be a number in [0, 1), got {val_fraction!r}.")
        val_fraction = 0.1
    lm_columns = {k: data.get(k, default) for k, default in LM_COLUMNS.items()}
    for key, value in lm_columns.items():
        if not isinstance(value, str) or (key != "messages_column" and not value.strip()):
            problems.append(f"data.{key} must be a {'' if key == 'messages_column' else 'non-empty '}string (a column name), got {value!r}.")
    if not lm_columns["messages_column"] and lm_columns["prompt_column"] == lm_columns["response_column"]:
        problems.append(f"data.prompt_column and data.response_column must differ, both are {lm_columns['prompt_column']!r}.")
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])

    def resolve(value: Any) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else base / p

    return SiteConfig(
        name=name,
        coordinator=site["coordinator"],
        ca=resolve(site["ca"]) if site.get("ca") else None,
        node_key=resolve(site["node_key"]) if site.get("node_key") else None,
        state_dir=resolve(site.get("state_dir", "state")),
        data_path=resolve(data["path"]),
        text_column=str(data.get("text_column", "text")),
        label_column=str(data.get("label_column", "label")),
        labels=tuple(labels),
        budget_epsilon=budget,
        delta=delta,
        policy=policy,
        apps=apps,
        val_fraction=float(val_fraction),
        prompt_column=str(lm_columns["prompt_column"]),
        response_column=str(lm_columns["response_column"]),
        messages_column=str(lm_columns["messages_column"]),
        insecure=insecure,
        deid=deid,
        base_model=resolve(raw["model"]["base_model"]) if raw.get("model", {}).get("base_model") else None,
    )


def write_site_config(out_dir: Path, *, name: str, coordinator: str, ca: Path, data: Path, text_column: str,
                      label_column: str, budget_epsilon: float, delta: float, overwrite: bool = False,
                      base_model: Path | None = None, task: str = "classification", prompt_column: str = "prompt",
                      response_column: str = "response", messages_column: str = "") -> Path:
    """Write ``out_dir/site.toml`` (validated by reading it back).

    ``task`` 'causal-lm' writes the prompt/response (or messages) columns instead of text/label,
    and a policy that allows causal-lm runs only: the operator chose it by asking for it.
    """
    import tomli_w

    from fedtune.common.io import write_file_exclusive

    doc = {
        "site": {"name": name, "coordinator": coordinator, "ca": str(ca.resolve()), "node_key": "node-key", "state_dir": "state"},
        "data": {"path": str(data.resolve()), "text_column": text_column, "label_column": label_column},
        "privacy": {"budget_epsilon": float(budget_epsilon), "delta": float(delta)},
        # Written out whole so the operator sees every limit a run must respect (client/policy.py).
        "policy": dataclasses.asdict(SitePolicy(allowed_tasks=(task,))),
    }
    if task == "causal-lm":
        columns = {"messages_column": messages_column} if messages_column else {"prompt_column": prompt_column, "response_column": response_column}
        doc["data"] = {"path": doc["data"]["path"], **columns}
    if base_model is not None:
        doc["model"] = {"base_model": str(base_model.resolve())}
    path = out_dir / SITE_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    write_file_exclusive(path, tomli_w.dumps(doc).encode("utf-8"), mode=0o644, overwrite=overwrite)
    load_site_config(path)
    return path


def _quote(value: str) -> str:
    """A TOML basic string, as Flower parses node-config values (its parser knows no escaped quotes)."""
    if '"' in value:
        raise ConfigError(f"node-config value {value!r} contains a double quote, which Flower cannot pass; rename the file or folder.")
    return '"' + value.replace("\\", "\\\\") + '"'


def supernode_command(
    site: SiteConfig, *, runtime_port: int = 9094, max_retries: int | None = None, extra_node_config: dict[str, str] | None = None,
    site_config: Path | None = None, writable: Sequence[Path] = (),
) -> list[str]:
    """The ``flower-supernode`` command line for this site.

    ``site_config`` gives the SuperNode the site's ``[apps]`` policy (without it, the default:
    config-only bundles naming fedtune's ClientApp); ``writable`` lists the only folders the
    SuperNode and its ClientApp processes may write (see client/supernode.py).
    """
    items = {**site.node_config(), **(extra_node_config or {})}
    node_config = " ".join(f"{k}={_quote(v) if isinstance(v, str) else repr(v)}" for k, v in items.items())
    # Flower's own flower-supernode, with the app gate, the write sandbox and a short idle poll (see client/supernode.py).
    cmd = [sys.executable, "-m", "fedtune.client.supernode"]
    if site_config is not None:
        cmd += ["--fedtune-site-config", str(site_config)]
    for folder in writable:
        cmd += ["--fedtune-writable", str(folder)]
    cmd += ["--superlink", site.coordinator, "--node-config", node_config, "--port", str(runtime_port)]
    if site.insecure:
        cmd.append("--insecure")
    else:
        if site.ca is None or site.node_key is None:
            raise ConfigError(f"site {site.name}: TLS needs site.ca and site.node_key (or site.insecure = true).")
        cmd += ["--root-certificates", str(site.ca), "--auth-supernode-private-key", str(site.node_key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervising daemon dies (Linux), so nothing is orphaned."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# How long after its SuperNode first fails a daemon keeps starting it again: the coordinator keeps a crashed
# node's session for 2 missed heartbeats of 30 s (flwr.common.constant HEARTBEAT_PATIENCE, HEARTBEAT_DEFAULT_INTERVAL).
REJOIN_SECONDS = 2 * 30 + 20
REJOIN_RETRY_SECONDS = 5.0


RUNTIME_HOST = "127.0.0.1"  # flower-supernode's Runtime HTTP API host (flwr.supercore.constant.UVICORN_DEFAULT_HOST)


def check_runtime_port(port: int, *, host: str = RUNTIME_HOST, wait: float = 5.0) -> None:
    """Refuse when ``port`` is taken: flower-supernode would log a traceback ("SuperNode Runtime HTTP API
    failed to start") and keep running as if healthy, e.g. for a second site on one machine.

    It waits up to ``wait`` seconds first: a daemon restarted at once after a kill may find its old
    SuperNode still releasing the port.
    """
    import socket
    import time

    deadline = time.monotonic() + wait
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As uvicorn binds: closed connections in TIME_WAIT do not block it, a listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"--runtime-port {port}: {host}:{port} is already in use ({err.strerror}); another site daemon on this "
                        "machine? Give each site its own port, e.g. --runtime-port 9095."
                    ) from None
        time.sleep(0.5)


def run_daemon(
    config_path: Path, *, runtime_port: int, max_retries: int | None, warm_worker: bool = True, threads: int | None = None
) -> int:
    """Run the site daemon: the warm worker (optional) and flower-supernode, stopped together.

    ``threads`` caps the CPU threads of training (the worker, or each message's process); sites
    sharing a machine must split its cores, or spinning thread pools make every step many times slower.
    Returns flower-supernode's exit code. SIGTERM or SIGINT stops both processes.
    """
    import signal
    import subprocess
    import sys
    import time

    from fedtune.common.environment import flower_environment

    from .worker import prepare_worker, worker_paths

    site = load_site_config(config_path)
    if site.base_model is not None:  # here, not in load_site_config: `site ledger` must work without the model
        check_model_folder(site.base_model, where=f"{config_path}: model.base_model")
    check_runtime_port(runtime_port)
    site.state_dir.mkdir(parents=True, exist_ok=True)
    env = flower_environment()
    env["FLWR_HOME"] = str(site.state_dir / "flower")  # Flower's own files stay in the site's state folder
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)  # read by torch at import
    procs: list[subprocess.Popen[bytes]] = []

    signalled: set[int] = set()

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None and proc.pid not in signalled:
                signalled.add(proc.pid)
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    extra: dict[str, str] = {}
    try:
        if warm_worker:
            extra = prepare_worker(site)
            # Own sessions: a signal to the daemon's group reaches only this supervisor, which sends
            # each child exactly one SIGTERM (a second one cuts short the SuperNode's deactivation,
            # and the coordinator then refuses the restarted site until its heartbeat expires).
            procs.append(subprocess.Popen([sys.executable, "-m", "fedtune.cli", "site", "worker", "--config", str(config_path)],
                                          env=env, start_new_session=True, preexec_fn=_die_with_parent))
            address, _ = worker_paths(site.state_dir)
            deadline = time.monotonic() + 120
            while not address.exists():
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"the site's warm worker did not start (exit code {procs[0].poll()}); see the log above.")
                time.sleep(0.2)
        supernode_env = dict(env)
        writable: list[Path] = []
        if warm_worker:
            # The worker (not sandboxed) trains and owns the ledger, so Flower's processes need to
            # write only their own home; temporary files go there too, never to a shared /tmp.
            flower_home = Path(env["FLWR_HOME"])
            (flower_home / "tmp").mkdir(parents=True, exist_ok=True)
            supernode_env["TMPDIR"] = str(flower_home / "tmp")
            writable = [flower_home]
        else:
            print("note: without the warm worker each ClientApp process trains and writes the ledger itself: "
                  "no write sandbox for Flower's processes.", file=sys.stderr, flush=True)
        cmd = supernode_command(site, runtime_port=runtime_port, max_retries=max_retries, extra_node_config=extra,
                                site_config=Path(config_path), writable=writable)
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        # After a crash (SIGKILL, power loss) the coordinator holds this node's previous session until it
        # misses two heartbeats (Flower: 2 x 30 s) and refuses to activate it again before ("Failed to
        # activate SuperNode", exit code 305 in its log, 1 for the process). Start it again for as long
        # as that can last after the first failure, so a restarted site rejoins by itself; a refusal
        # that lasts longer (an unregistered key) still ends the daemon.
        rejoin_until: float | None = None
        restarts = 0
        while True:
            supernode = subprocess.Popen(cmd, env=supernode_env, start_new_session=True, preexec_fn=_die_with_parent)
            procs.append(supernode)
            code = supernode.wait()
            if rejoin_until is None:
                rejoin_until = time.monotonic() + REJOIN_SECONDS
            if (code == 0 or signalled or time.monotonic() > rejoin_until
                    or (max_retries is not None and restarts >= max_retries)):
                return code
            restarts += 1
            procs.remove(supernode)
            print(f"fedtune: the coordinator did not accept this site yet (its previous session may still be open); "
                  f"retrying in {REJOIN_RETRY_SECONDS:g}s", file=sys.stderr, flush=True)
            time.sleep(REJOIN_RETRY_SECONDS)
            if signalled:  # stopped while waiting
                return code
    finally:
        stop()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
