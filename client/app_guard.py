"""Which app bundles (FABs) a deployed site accepts: config only, naming fedtune's own ClientApp.

Flower installs the bundle a run ships and puts its folder first on ``sys.path`` before loading
the ClientApp it names (``flwr/supercore/object_ref.py``). A bundle naming
``fedtune.client.app:app`` could therefore still ship its own ``fedtune/`` and run any code on
the site. The site's SuperNode (``client/supernode.py``) hands every bundle to :class:`AppGuard`
*before* anything of it is stored, installed or imported; a refused bundle never leaves memory.

A bundle is accepted only if

1. it carries no code: its files are ``pyproject.toml``, Flower's manifest ``.info/CONTENT``,
   top-level plain-text docs (``*.md``, ``LICENSE``) and optionally :data:`SIGNATURE_FILE`.
   Anything else (``.py``, ``.so``, ``.pth``, a package folder, a data file) is refused;
2. its ``pyproject.toml`` names ``fedtune.client.app:app`` as the ClientApp and asks for no
   dependencies (a site installs nothing a run names);
3. when the site lists trusted hashes or signers in ``site.toml``, its digest is one of the
   trusted hashes, or a key in the trusted signers signed it (Ed25519, offline: Flower verifies
   only Flower Hub records).

```toml
[apps]
trusted_hashes = ["3f1c...e9"]           # app digests the operator accepted (`fedtune app hash`)
trusted_signers = ["consortium-app.pub"] # Ed25519 public keys (OpenSSH or PEM) whose signature suffices
```

The *app digest* is SHA-256 over the bundle's files (name and content hash, sorted), leaving out
Flower's manifest and the signature file, so signing a bundle does not change what is signed and
a trusted hash survives signing. It pins the bundle (its components and config defaults), not
the run: a run's settings are bounded by the site's ``[policy]``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedtune.common.errors import FedtuneError
from fedtune.common.messages import RefusalCode

CLIENTAPP = "fedtune.client.app:app"
CONFIG_FILE = "pyproject.toml"
MANIFEST_FILE = ".info/CONTENT"  # Flower's list of file hashes, derived from the files themselves
SIGNATURE_FILE = "fedtune-signatures.json"
DOC_LICENSE = "LICENSE"
# Flower refuses to build a bundle over 10 MB; a config-only bundle is a few kB. The per-file cap
# bounds what a crafted archive can make the SuperNode decompress.
MAX_BUNDLE_BYTES = 10 * 1024 * 1024
MAX_FILE_BYTES = 1024 * 1024
# Domain separation: a fedtune app signature can never be mistaken for a signature over other data.
SIGNED_PREFIX = b"fedtune-app-digest-v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class UntrustedApp(FedtuneError):
    """A run's app bundle is refused; the message (what and why) stays in the site's log."""

    code = RefusalCode.UNTRUSTED_APP.value


@dataclass(frozen=True, kw_only=True)
class AppPolicy:
    """The ``[apps]`` section of ``site.toml``.

    Attributes:
        trusted_hashes: App digests (lowercase hex SHA-256) the operator accepted.
        trusted_signers: Ed25519 public-key files; a bundle one of them signed is accepted.
            With both empty, any config-only bundle naming fedtune's ClientApp is accepted.
    """

    trusted_hashes: frozenset[str] = frozenset()
    trusted_signers: tuple[Path, ...] = ()

    @property
    def requires_trust(self) -> bool:
        return bool(self.trusted_hashes or self.trusted_signers)


@dataclass(frozen=True, kw_only=True)
class AcceptedApp:
    """What the site logs about a bundle it accepted."""

    digest: str
    files: tuple[str, ...]
    trusted_by: str  # "hash", "signer <fingerprint>", or "" when the site lists no trust


def app_policy_from_mapping(raw: Mapping[str, Any], *, base: Path) -> tuple[AppPolicy, list[str]]:
    """Parse ``[apps]`` (paths relative to ``base``); returns the policy and every problem found."""
    problems: list[str] = []
    allowed = ("trusted_hashes", "trusted_signers")
    problems += [f"unknown key apps.{k}; allowed: {list(allowed)}." for k in raw if k not in allowed]
    hashes: set[str] = set()
    raw_hashes = raw.get("trusted_hashes", [])
    if not isinstance(raw_hashes, list) or not all(isinstance(h, str) for h in raw_hashes):
        problems.append(f"apps.trusted_hashes must be a list of strings, got {raw_hashes!r}.")
    else:
        for h in raw_hashes:
            if not _HEX64.fullmatch(h.strip().lower()):
                problems.append(f"apps.trusted_hashes holds {h!r}; each must be a SHA-256 app digest (64 hex digits, `fedtune app hash`).")
            else:
                hashes.add(h.strip().lower())
    signers: list[Path] = []
    raw_signers = raw.get("trusted_signers", [])
    if not isinstance(raw_signers, list) or not all(isinstance(s, str) and s for s in raw_signers):
        problems.append(f"apps.trusted_signers must be a list of public-key file names, got {raw_signers!r}.")
    else:
        for s in raw_signers:
            path = Path(s).expanduser()
            path = path if path.is_absolute() else base / path
            try:
                load_public_key(path)
            except ValueError as err:
                problems.append(f"apps.trusted_signers: {err}")
            signers.append(path)
    return AppPolicy(trusted_hashes=frozenset(hashes), trusted_signers=tuple(signers)), problems


def load_public_key(path: Path) -> Any:
    """An Ed25519 public key from an OpenSSH (``ssh-ed25519 ...``) or PEM file; ValueError names the file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key

    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read public key {path}: {err.strerror}.") from None
    try:
        key = load_pem_public_key(data) if data.lstrip().startswith(b"-----") else load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path} is not an OpenSSH or PEM public key ({err}).") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__.lstrip('_')}; app signers must be Ed25519 keys.")
    return key


def key_fingerprint(key: Any) -> str:
    """``SHA256:...`` of the raw public key, as operators compare keys."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


# ----------------------------------------------------------------------------------- inspection
def _is_doc(name: str) -> bool:
    return "/" not in name and (name.endswith(".md") or name == DOC_LICENSE)


def _bundle_files(content: bytes) -> dict[str, bytes]:
    """Every file of the archive by name; UntrustedApp for anything that is not a plain, small file."""
    if len(content) > MAX_BUNDLE_BYTES:
        raise UntrustedApp(f"the bundle is {len(content)} bytes; at most {MAX_BUNDLE_BYTES} are accepted.")
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile as err:
        raise UntrustedApp(f"the bundle is not a zip archive ({err}).") from None
    files: dict[str, bytes] = {}
    with archive:
        for info in archive.infolist():
            name = info.filename
            mode = info.external_attr >> 16
            if info.is_dir() or stat.S_ISLNK(mode):
                raise UntrustedApp(f"the bundle holds {'a folder' if info.is_dir() else 'a symbolic link'} {name!r}; only files are accepted.")
            if name in files:
                raise UntrustedApp(f"the bundle holds {name!r} twice.")
            if info.file_size > MAX_FILE_BYTES:
                raise UntrustedApp(f"{name!r} is {info.file_size} bytes; at most {MAX_FILE_BYTES} per file are accepted.")
            try:
                files[name] = archive.read(info)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError) as err:
                raise UntrustedApp(f"{name!r} cannot be read ({err}).") from None
    return files


def app_digest(files: Mapping[str, bytes]) -> str:
    """SHA-256 over ``name NUL sha256(content) LF`` for each file, sorted, without the manifest and signatures."""
    h = hashlib.sha256()
    for name in sorted(files):
        if name in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        h.update(name.encode("utf-8") + b"\0" + hashlib.sha256(files[name]).hexdigest().encode() + b"\n")
    return h.hexdigest()


def bundle_digest(content: bytes) -> str:
    """The app digest of a bundle's bytes (UntrustedApp if it is not a readable archive)."""
    return app_digest(_bundle_files(content))


def _table(doc: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    """``doc[k1][k2]...``, or an empty table where a key is missing or not a table (a crafted config must not crash the check)."""
    for key in keys:
        value = doc.get(key, {})
        doc = value if isinstance(value, dict) else {}
    return doc


def _check_config(raw: bytes) -> None:
    import tomllib

    try:
        config = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UntrustedApp(f"{CONFIG_FILE} cannot be parsed ({err}).") from None
    clientapp = _table(config, "tool", "flwr", "app", "components").get("clientapp")
    if clientapp != CLIENTAPP:
        raise UntrustedApp(f"its ClientApp is {clientapp!r}; this site runs only {CLIENTAPP!r} as installed here.")
    dependencies = _table(config, "project").get("dependencies", [])
    if dependencies:
        raise UntrustedApp(f"it asks to install dependencies {dependencies!r}; this site installs nothing a run names.")


def _signatures(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(raw public key, signature) pairs from :data:`SIGNATURE_FILE`."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, list):
            raise ValueError("expected a list")
        return [(base64.b64decode(e["public_key"], validate=True), base64.b64decode(e["signature"], validate=True)) for e in doc]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as err:
        raise UntrustedApp(f"{SIGNATURE_FILE} is not a list of {{public_key, signature}} in base64 ({err}).") from None


def signed_message(digest: str) -> bytes:
    return SIGNED_PREFIX + digest.encode("ascii")


class AppGuard:
    """Checks bundles against one site's :class:`AppPolicy` (its signer keys loaded once)."""

    def __init__(self, policy: AppPolicy = AppPolicy()) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self.policy = policy
        self._signers: dict[bytes, Any] = {}
        for path in policy.trusted_signers:
            key = load_public_key(path)
            self._signers[key.public_bytes(Encoding.Raw, PublicFormat.Raw)] = key

    def check(self, content: bytes) -> AcceptedApp:
        """Accept the bundle or raise UntrustedApp saying what was refused and why. Nothing is executed."""
        files = _bundle_files(content)
        carried = sorted(n for n in files if n not in (CONFIG_FILE, MANIFEST_FILE, SIGNATURE_FILE) and not _is_doc(n))
        if carried:
            shown = ", ".join(carried[:6]) + (f" and {len(carried) - 6} more" if len(carried) > 6 else "")
            raise UntrustedApp(f"it carries files other than {CONFIG_FILE} and plain-text docs (*.md, LICENSE): {shown}; "
                               "a site runs only the fedtune installed on it.")
        if CONFIG_FILE not in files:
            raise UntrustedApp(f"it has no {CONFIG_FILE}.")
        for name, data in files.items():
            if _is_doc(name):
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    raise UntrustedApp(f"{name!r} is not UTF-8 text; docs must be plain text.") from None
        _check_config(files[CONFIG_FILE])
        digest = app_digest(files)
        signatures = _signatures(files[SIGNATURE_FILE]) if SIGNATURE_FILE in files else []
        if not self.policy.requires_trust:
            return AcceptedApp(digest=digest, files=tuple(sorted(files)), trusted_by="")
        if digest in self.policy.trusted_hashes:
            return AcceptedApp(digest=digest, files=tuple(sorted(files)), trusted_by="hash")
        from cryptography.exceptions import InvalidSignature

        for public_key, signature in signatures:
            key = self._signers.get(public_key)
            if key is None:
                continue
            try:
                key.verify(signature, signed_message(digest))
            except InvalidSignature:
                continue
            return AcceptedApp(digest=digest, files=tuple(sorted(files)), trusted_by=f"signer {key_fingerprint(key)}")
        signed = f"{len(signatures)} signature(s), none valid from a trusted signer" if signatures else "no signature"
        raise UntrustedApp(f"its app digest {digest} is not in apps.trusted_hashes and it carries {signed} "
                           f"({len(self._signers)} trusted signer(s)).")


# ------------------------------------------------------------------------------ coordinator side
def sign_digest(digest: str, private_key: Any) -> dict[str, str]:
    """One entry of :data:`SIGNATURE_FILE`: ``private_key`` (Ed25519) signing ``digest``."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if not _HEX64.fullmatch(digest):
        raise ValueError(f"an app digest is 64 lowercase hex digits, got {digest!r}.")
    public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "digest": digest,  # informative: the site recomputes the digest from the bundle itself
        "public_key": base64.b64encode(public).decode(),
        "signature": base64.b64encode(private_key.sign(signed_message(digest))).decode(),
    }
