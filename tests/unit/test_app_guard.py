"""The site's check of a run's app bundle (FAB), on bundles built by Flower's own builder or crafted by hand.

Bundles that pass are what ``fedtune run`` ships; every other one carries code, names another
ClientApp, or is not trusted by the site's ``[apps]`` list. Flower's ``build_fab_from_files`` is
the builder ``flwr run`` uses, so the honest bundle here is byte for byte what a site receives.
"""

from __future__ import annotations

import base64
import io
import json
import stat
import tomllib
import zipfile
from pathlib import Path

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedtune.client.app_guard import (
    SIGNATURE_FILE,
    AppGuard,
    AppPolicy,
    UntrustedApp,
    app_policy_from_mapping,
    bundle_digest,
    sign_digest,
)
from fedtune.common.config import RunConfig
from fedtune.server.coordinator import app_dir


def honest_pyproject() -> dict:
    return tomllib.loads((app_dir(RunConfig().to_flat()) / "pyproject.toml").read_text())


def flower_fab(pyproject: dict, extra: dict[str, bytes] | None = None) -> bytes:
    """A bundle as `flwr run` builds it from a folder holding these files."""
    from flwr.cli.build import build_fab_from_files

    files = {"pyproject.toml": tomli_w.dumps(pyproject).encode(), **(extra or {})}
    return build_fab_from_files(files)[0]


def crafted_fab(files: dict[str, bytes], *, symlink: str | None = None, duplicate: str | None = None) -> bytes:
    """A zip built by hand: what an attacker can send without Flower's builder and its filters."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
        if duplicate:
            with pytest.warns(UserWarning):
                z.writestr(duplicate, b"second copy")
    return buffer.getvalue()


def honest_files() -> dict[str, bytes]:
    return {"pyproject.toml": tomli_w.dumps(honest_pyproject()).encode()}


def public_key_file(tmp_path: Path, key: Ed25519PrivateKey, name: str = "signer.pub") -> Path:
    path = tmp_path / name
    path.write_bytes(key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH))
    return path


def with_signatures(pyproject: dict, entries: list[dict[str, str]]) -> bytes:
    return flower_fab(pyproject, {SIGNATURE_FILE: json.dumps(entries).encode()})


# ------------------------------------------------------------------------------ what is accepted
def test_the_bundle_fedtune_run_ships_is_accepted_by_default() -> None:
    fab = flower_fab(honest_pyproject())
    accepted = AppGuard().check(fab)
    assert accepted.files == (".info/CONTENT", "pyproject.toml")
    assert accepted.trusted_by == ""


def test_plain_text_docs_are_accepted_beside_the_config() -> None:
    fab = flower_fab(honest_pyproject(), {"README.md": b"# fedtune run\n", "LICENSE": b"Apache-2.0\n"})
    assert AppGuard().check(fab).files == (".info/CONTENT", "LICENSE", "README.md", "pyproject.toml")


# ---------------------------------------------------------------------------- what carries code
def test_a_bundle_shipping_its_own_fedtune_package_is_refused_naming_the_files() -> None:
    fab = flower_fab(honest_pyproject(), {"fedtune/__init__.py": b"", "fedtune/client/__init__.py": b"",
                                          "fedtune/client/app.py": b"open('/data/notes.csv').read()\n"})
    with pytest.raises(UntrustedApp, match=r"carries files other than pyproject.toml.*fedtune/__init__.py.*fedtune/client/app.py") as info:
        AppGuard().check(fab)
    assert info.value.code == "untrusted-app"


@pytest.mark.parametrize("name", ["evil.pth", "fedtune.cpython-311-x86_64-linux-gnu.so", "sitecustomize.py", "docs/README.md",
                                  "setup.cfg", "data.json", "./pyproject.toml"])
def test_any_file_but_the_config_and_top_level_docs_is_refused(name: str) -> None:
    fab = crafted_fab({**honest_files(), name: b"import os\n"})
    with pytest.raises(UntrustedApp, match="carries files other than"):
        AppGuard().check(fab)


def test_a_symbolic_link_or_a_name_given_twice_is_refused() -> None:
    with pytest.raises(UntrustedApp, match="symbolic link"):
        AppGuard().check(crafted_fab(honest_files(), symlink="README.md"))
    with pytest.raises(UntrustedApp, match="twice"):
        AppGuard().check(crafted_fab(honest_files(), duplicate="pyproject.toml"))


def test_a_doc_that_is_not_text_is_refused() -> None:
    with pytest.raises(UntrustedApp, match="not UTF-8 text"):
        AppGuard().check(crafted_fab({**honest_files(), "README.md": b"\x7fELF\x02\x01\x01\x00\xff\xfe"}))


def test_bytes_that_are_not_a_zip_are_refused() -> None:
    with pytest.raises(UntrustedApp, match="not a zip archive"):
        AppGuard().check(b"#!/bin/sh\nrm -rf /\n")


def test_a_bundle_without_config_is_refused() -> None:
    with pytest.raises(UntrustedApp, match="no pyproject.toml"):
        AppGuard().check(crafted_fab({"README.md": b"hello"}))


# ------------------------------------------------------------------------ what the config names
@pytest.mark.parametrize("clientapp", ["evil.client:app", "fedtune.client.app:other", "fedtune.client.app:app.inner"])
def test_a_bundle_naming_another_clientapp_is_refused(clientapp: str) -> None:
    doc = honest_pyproject()
    doc["tool"]["flwr"]["app"]["components"]["clientapp"] = clientapp
    with pytest.raises(UntrustedApp, match=f"its ClientApp is '{clientapp}'"):
        AppGuard().check(flower_fab(doc))


def test_a_bundle_asking_to_install_dependencies_is_refused() -> None:
    doc = honest_pyproject()
    doc["project"]["dependencies"] = ["evil-package==1.0"]
    with pytest.raises(UntrustedApp, match="installs nothing a run names"):
        AppGuard().check(flower_fab(doc))


# ------------------------------------------------------------------------------ trusted digests
def test_a_digest_the_operator_listed_is_accepted_and_any_other_refused() -> None:
    fab = flower_fab(honest_pyproject())
    digest = bundle_digest(fab)
    assert AppGuard(AppPolicy(trusted_hashes=frozenset({digest}))).check(fab).trusted_by == "hash"
    changed = honest_pyproject()
    changed["tool"]["flwr"]["app"]["config"]["federation"]["rounds"] = 50  # same components, other defaults
    with pytest.raises(UntrustedApp, match=rf"app digest {bundle_digest(flower_fab(changed))} is not in apps.trusted_hashes"):
        AppGuard(AppPolicy(trusted_hashes=frozenset({digest}))).check(flower_fab(changed))


def test_the_digest_covers_every_file_but_not_the_manifest_or_signatures() -> None:
    doc = honest_pyproject()
    plain = bundle_digest(flower_fab(doc))
    key = Ed25519PrivateKey.generate()
    assert bundle_digest(with_signatures(doc, [sign_digest(plain, key)])) == plain
    assert bundle_digest(flower_fab(doc, {"README.md": b"x"})) != plain
    assert bundle_digest(flower_fab(doc, {"README.md": b"y"})) != bundle_digest(flower_fab(doc, {"README.md": b"x"}))


# ------------------------------------------------------------------------------ trusted signers
def test_a_bundle_signed_by_a_trusted_key_is_accepted(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    doc = honest_pyproject()
    fab = with_signatures(doc, [sign_digest(bundle_digest(flower_fab(doc)), key)])
    guard = AppGuard(AppPolicy(trusted_signers=(public_key_file(tmp_path, key),)))
    assert guard.check(fab).trusted_by.startswith("signer SHA256:")


def test_a_signature_by_a_key_the_site_does_not_trust_is_refused(tmp_path: Path) -> None:
    trusted, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    doc = honest_pyproject()
    fab = with_signatures(doc, [sign_digest(bundle_digest(flower_fab(doc)), other)])
    with pytest.raises(UntrustedApp, match="1 signature.*none valid from a trusted signer"):
        AppGuard(AppPolicy(trusted_signers=(public_key_file(tmp_path, trusted),))).check(fab)


def test_a_signature_over_another_bundle_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    signed_doc, shipped_doc = honest_pyproject(), honest_pyproject()
    shipped_doc["tool"]["flwr"]["app"]["config"]["privacy"]["target_epsilon"] = 1000.0
    fab = with_signatures(shipped_doc, [sign_digest(bundle_digest(flower_fab(signed_doc)), key)])
    with pytest.raises(UntrustedApp, match="none valid"):
        AppGuard(AppPolicy(trusted_signers=(public_key_file(tmp_path, key),))).check(fab)


def test_a_tampered_signature_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    doc = honest_pyproject()
    entry = sign_digest(bundle_digest(flower_fab(doc)), key)
    raw = bytearray(base64.b64decode(entry["signature"]))
    raw[0] ^= 1
    fab = with_signatures(doc, [{**entry, "signature": base64.b64encode(bytes(raw)).decode()}])
    with pytest.raises(UntrustedApp, match="none valid"):
        AppGuard(AppPolicy(trusted_signers=(public_key_file(tmp_path, key),))).check(fab)


def test_a_malformed_signature_file_is_refused_even_where_no_signer_is_required() -> None:
    fab = flower_fab(honest_pyproject(), {SIGNATURE_FILE: b'{"not": "a list"}'})
    with pytest.raises(UntrustedApp, match=f"{SIGNATURE_FILE} is not a list"):
        AppGuard().check(fab)


def test_without_a_trust_list_an_unsigned_bundle_is_refused_once_one_is_set(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(UntrustedApp, match="no signature"):
        AppGuard(AppPolicy(trusted_signers=(public_key_file(tmp_path, key),))).check(flower_fab(honest_pyproject()))


# ------------------------------------------------------------------------- site.toml [apps]
def test_apps_section_resolves_signer_files_and_normalises_hashes(tmp_path: Path) -> None:
    public_key_file(tmp_path, Ed25519PrivateKey.generate(), "consortium.pub")
    policy, problems = app_policy_from_mapping({"trusted_hashes": ["AB" * 32], "trusted_signers": ["consortium.pub"]}, base=tmp_path)
    assert problems == []
    assert policy.trusted_hashes == frozenset({"ab" * 32})
    assert policy.trusted_signers == (tmp_path / "consortium.pub",)


def test_apps_section_reports_every_problem_naming_the_key_and_value(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    ecdsa = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    (tmp_path / "ecdsa.pub").write_bytes(ecdsa)
    _, problems = app_policy_from_mapping({"trusted_hashes": ["abc"], "trusted_signers": ["missing.pub", "ecdsa.pub"], "extra": 1},
                                          base=tmp_path)
    text = "\n".join(problems)
    assert "apps.trusted_hashes holds 'abc'" in text
    assert f"cannot read public key {tmp_path / 'missing.pub'}" in text
    assert "app signers must be Ed25519 keys" in text
    assert "unknown key apps.extra" in text


def test_site_config_reads_the_apps_section(tmp_path: Path) -> None:
    from fedtune.client.daemon import load_site_config

    (tmp_path / "site.toml").write_text('[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n'
                                        f'[apps]\ntrusted_hashes = ["{"0" * 64}"]\n')
    assert load_site_config(tmp_path / "site.toml").apps.trusted_hashes == frozenset({"0" * 64})


# ------------------------------------------------------------ the gate inside Flower's SuperNode loop
@pytest.fixture
def gated_loop():  # type: ignore[no-untyped-def]
    """Flower's own SuperNode loop module with fedtune's gate installed (restored afterwards)."""
    import importlib

    from fedtune.client import supernode

    module = importlib.import_module("flwr.supernode.start_client_internal")
    saved = module._pull_and_store_message
    supernode.install_app_gate(AppGuard())
    yield module
    module._pull_and_store_message = saved


def _pull_one(module, fab: bytes):  # type: ignore[no-untyped-def]
    """One pass of Flower's real pull-and-store step, fed a train message of run 7 and ``fab``."""
    import hashlib

    from flwr.app import Message, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate import NodeStateFactory

    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    state, store = factory.state(), factory.objectstore_factory.store()
    state.set_node_id(1)
    msg = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    objects = get_all_nested_objects(msg)
    fab_hash = hashlib.sha256(fab).hexdigest()
    run = Run.create_empty(7)
    run.fab_hash = fab_hash
    fetched: list[str] = []

    def get_fab(h: str, run_id: int) -> Fab:
        fetched.append(h)
        return Fab(h, fab, {})

    run_id = module._pull_and_store_message(
        state=state, object_store=store, node_config={"site-name": "hospital-a"},
        receive=lambda: (msg, get_object_tree(msg)), get_run=lambda run_id: run, get_fab=get_fab,
        pull_object=lambda run_id, object_id: objects[object_id].deflate(),
        confirm_message_received=lambda run_id, object_id: None, trusted_entities=None,
    )
    return run_id, state, fetched


def test_the_supernode_refuses_an_untrusted_bundle_with_a_reply_and_stores_nothing(gated_loop, flower_task_identity) -> None:  # type: ignore[no-untyped-def]
    evil = flower_fab(honest_pyproject(), {"fedtune/__init__.py": b"", "fedtune/client/app.py": b"import os\n"})
    run_id, state, fetched = _pull_one(gated_loop, evil)
    assert run_id == 7 and fetched, "the bundle was fetched and checked"
    [reply] = state.get_messages_legacy(is_reply=True)
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (100, "untrusted-app site=hospital-a")
    assert state.get_run(7) is None, "a refused run is never stored, so no ClientApp process is ever given its bundle"


def test_the_supernode_stores_the_bundle_fedtune_run_ships(gated_loop, flower_task_identity) -> None:  # type: ignore[no-untyped-def]
    run_id, state, _ = _pull_one(gated_loop, flower_fab(honest_pyproject()))
    assert run_id == 7
    assert state.get_run(7) is not None
    assert state.get_messages_legacy(is_reply=True) == []


# ----------------------------------------------------------------------------- the write sandbox
SANDBOXED = """
import os, subprocess, sys
from pathlib import Path
from fedtune.client.supernode import SandboxUnavailable, restrict_writes
allowed, denied = Path(sys.argv[1]), Path(sys.argv[2])
try:
    restrict_writes([allowed])
except SandboxUnavailable:
    sys.exit(77)
(allowed / "ok.txt").write_text("fine")
for target in (denied / "ledger.json", denied / "new.txt"):
    try:
        target.write_text("rewritten")
        sys.exit(f"wrote {target}")
    except PermissionError:
        pass
child = subprocess.run([sys.executable, "-c", f"open({str(denied / 'ledger.json')!r}, 'a')"], capture_output=True, text=True)
sys.exit(0 if "PermissionError" in child.stderr else f"child process: {child.returncode} {child.stderr}")
"""


def test_the_write_sandbox_keeps_the_process_and_its_children_out_of_the_ledger(tmp_path: Path) -> None:
    import subprocess
    import sys

    allowed, denied = tmp_path / "state" / "flower", tmp_path / "state"
    allowed.mkdir(parents=True)
    (denied / "ledger.json").write_text("{}")
    result = subprocess.run([sys.executable, "-c", SANDBOXED, str(allowed), str(denied)], capture_output=True, text=True, timeout=60)
    if result.returncode == 77:
        pytest.skip("this kernel offers no Landlock")
    assert result.returncode == 0, result.stderr
    assert (denied / "ledger.json").read_text() == "{}"
    assert (allowed / "ok.txt").read_text() == "fine"


# ----------------------------------------------------------- the coordinator's side: hash and sign
def test_what_fedtune_run_ships_has_one_digest_sites_can_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fedtune.cli import main

    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))
    printed = CliRunner().invoke(main, ["app", "hash"])
    assert printed.exit_code == 0, printed.output
    digest = printed.output.strip()
    shipped = flower_fab(tomllib.loads((app_dir(RunConfig().to_flat()) / "pyproject.toml").read_text()))
    assert AppGuard(AppPolicy(trusted_hashes=frozenset({digest}))).check(shipped).trusted_by == "hash"


def test_a_bundle_signed_with_fedtune_app_sign_is_shipped_by_app_dir_and_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner
    from flwr.cli.build import build_fab_from_disk

    from fedtune.cli import main
    from fedtune.server.coordinator import APP_SIGNATURES

    assert APP_SIGNATURES == SIGNATURE_FILE, "coordinator and site must name the signature file alike"
    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    for args in (["app", "keygen", "--out", str(tmp_path / "keys")], ["app", "sign", "--key", str(tmp_path / "keys" / "app-signing.key")]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    fab = build_fab_from_disk(app_dir(RunConfig().to_flat()))  # what `flwr run` sends
    assert SIGNATURE_FILE in zipfile.ZipFile(io.BytesIO(fab)).namelist()
    accepted = AppGuard(AppPolicy(trusted_signers=(tmp_path / "keys" / "app-signing.pub",))).check(fab)
    assert accepted.trusted_by.startswith("signer SHA256:")
    other = Ed25519PrivateKey.generate()
    with pytest.raises(UntrustedApp, match="none valid"):
        AppGuard(AppPolicy(trusted_signers=(public_key_file(tmp_path, other),))).check(fab)


@pytest.mark.parametrize("config", [b"tool = 1\n", b"[tool]\nflwr = [1, 2]\n", b"project = 'x'\n[tool.flwr.app.components]\nclientapp = 3\n",
                                    b"\xff\xfe not toml"])
def test_a_crafted_config_is_refused_not_a_crash(config: bytes) -> None:
    with pytest.raises(UntrustedApp):
        AppGuard().check(crafted_fab({"pyproject.toml": config}))


def test_the_daemon_hands_the_supernode_its_site_config_and_writable_folder_and_flower_the_rest(tmp_path: Path) -> None:
    import sys

    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    from fedtune.client.daemon import load_site_config, supernode_command
    from fedtune.client.supernode import split_args

    (tmp_path / "site.toml").write_text('[site]\nname = "a"\ncoordinator = "127.0.0.1:9093"\ninsecure = true\n[data]\npath = "d.csv"\n')
    cmd = supernode_command(load_site_config(tmp_path / "site.toml"), site_config=tmp_path / "site.toml",
                            writable=[tmp_path / "state" / "flower"])
    assert cmd[:3] == [sys.executable, "-m", "fedtune.client.supernode"]
    site_config, writable, rest = split_args(cmd[3:])
    assert site_config == tmp_path / "site.toml" and writable == [tmp_path / "state" / "flower"]
    args = _parse_args_run_supernode().parse_args(rest)  # what flower-supernode itself accepts
    assert args.superlink == "127.0.0.1:9093" and args.insecure
