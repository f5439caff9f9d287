"""The mask generator for SecAgg+: a ChaCha20 keystream instead of Flower's 32-bit-seeded MT19937.

Flower 1.42's ``pseudo_rand_gen`` XOR-folds the 256-bit mask secrets (a private seed, or an ECDH +
HKDF shared key) into a 32-bit seed for numpy's Mersenne Twister. A coordinator holding one site's
masked vector (and, after unmasking, that site's private seed) can then try all 2**32 seeds of a
pairwise mask and recognise the right one, because the unmasked values fall in the narrow
quantized range: the site's update would be exposed with a few hours of computation.

:func:`expand` keeps Flower's contract (same arguments, int64 arrays in ``[0, num_range)``) and
draws from ChaCha20 keyed with SHA-256 of the whole secret, so guessing a mask means guessing a
256-bit key. :func:`install` points both ends of the protocol (the coordinator's workflow and the
sites' mod) at it; every fedtune process that takes part in secure aggregation installs it, so
masks still cancel. A party without it produces masks that do not cancel, and the coordinator's
check on the aggregate fails the round loudly.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numpy.typing import NDArray

# The modules that imported Flower's generator by name.
_USERS = (
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
)
_NONCE = b"fedtune-secagg+\0"  # ChaCha20 in `cryptography` takes a 16-byte nonce (counter + nonce)


def expand(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[NDArray[np.int64]]:
    """Arrays of the given shapes, uniform in [0, num_range), from the secret ``seed``.

    ``num_range`` must be a power of two no larger than 2**62 (SecAgg+ uses 2**32), so reducing
    64-bit words modulo it is exactly uniform.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if num_range <= 0 or num_range & (num_range - 1) or num_range > 2**62:
        raise ValueError(f"num_range must be a power of two <= 2**62, got {num_range}")
    sizes = [math.prod(shape) for shape in dimensions_list]
    key = hashlib.sha256(seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor().update(bytes(8 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u8") & np.uint64(num_range - 1)
    out: list[NDArray[np.int64]] = []
    start = 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        out.append(words[start : start + size].astype(np.int64).reshape(shape))
        start += size
    return out


def install() -> None:
    """Make Flower's SecAgg+ workflow and mod draw their masks from :func:`expand` (idempotent)."""
    import importlib

    for name in _USERS:
        module = importlib.import_module(name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise RuntimeError(f"{name} no longer imports pseudo_rand_gen; re-check the SecAgg+ mask generator")
        module.pseudo_rand_gen = expand  # type: ignore[attr-defined]
