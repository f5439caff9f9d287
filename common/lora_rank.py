"""Heterogeneous LoRA ranks: a site trains the first r_i <= r rank slots of the run's adapter.

The coordinator keeps the global adapter at the run's rank r. A site that may train only rank
r_i (its ``[policy] max_lora_rank``, or ``lora.site_ranks`` in simulation) keeps the first r_i
slots of what it receives (:func:`truncate_lora`: A[:r_i, :], B[:, :r_i]), trains them and
replies at rank r_i; the coordinator pads the reply back to rank r right after screening, with
the global adapter's own values in the slots the site did not train (:func:`pad_array`; a site in
a SecAgg+ round pads its own reply with the adapter it received, :func:`pad_lora`), so every
aggregation rule sees rank-r adapters and a site's update (reply minus the global adapter) is
exactly zero in the slots it lacks. This is HetLoRA-style rank truncation (Cho, Manoel, Joshi,
Sim, Dimitriadis, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024) with global-value padding instead of HetLoRA's zeros; no SVD re-factorisation is done.

Why not zeros: a zero slot is a vote for 0. Slots only high-rank sites train would shrink every
round by the weight of the sites that lack them (plain LoRA's random A rows included), and the
update norm bound and client-level DP's clipping would see minus the global adapter's values
there, so a low-rank site's update would look large and be clipped or rejected for slots it never
touched.

What the padded mean is. With FedAvg weights w_i (sum 1) and X_g the global adapter of the round,
slot j of the aggregate is sum_{i: r_i > j} w_i X_i[j] + sum_{i: r_i <= j} w_i X_g[j]: the global
value plus the weighted mean of the changes, each site's change being 0 where it has no slot j.
Under plain LoRA the product of the averaged factors is, as ever, not the average of the products.
Under FFA-LoRA (A frozen and shared) it is exact: pad(B_i) A = B_g A + (B_i - B_g[:, :r_i]) A[:r_i, :],
so mean_w(pad(B_i)) A = B_g A + sum_i w_i (B_i - B_g[:, :r_i]) A[:r_i, :], the global product plus
the weighted mean of each site's change of what its model adds.

Why the same scale: PEFT multiplies B A by alpha / r. A site that trains rank r_i with the run's
alpha would scale its update by alpha / r_i, r / r_i times the global model's; it uses
alpha_i = alpha r_i / r instead (:func:`site_lora_alpha`), so its B_i A_i is exactly the
truncation of the global update.

Which dimension holds the rank: PEFT stores a LoRA A as [r, in] (linear; [r, in, k, k] for a
convolution; [r, num_embeddings] for an embedding's ``lora_embedding_A``) and a B as [out, r]
([out, r, 1, 1]; [embedding_dim, r]): dimension 0 of an A, 1 of a B. Other tensors (the head)
have no rank and pass unchanged.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import UpdateError

if TYPE_CHECKING:  # torch only where tensors are: a site's policy and the thin ClientApp import this module
    import torch


def rank_dim(name: str) -> int | None:
    """The dimension of tensor ``name`` that indexes LoRA's rank slots: 0 for an A, 1 for a B, None otherwise."""
    if "lora_A" in name or "lora_embedding_A" in name:
        return 0
    if "lora_B" in name or "lora_embedding_B" in name:
        return 1
    return None


def tensor_rank(name: str, shape: Sequence[int]) -> int | None:
    """The LoRA rank of a tensor of this name and shape (None for a tensor without rank slots)."""
    dim = rank_dim(name)
    return None if dim is None or len(shape) <= dim else int(shape[dim])


def shape_at_rank(name: str, shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """``shape`` with its rank dimension set to ``rank`` (unchanged for a tensor without rank slots)."""
    dim = rank_dim(name)
    if dim is None or len(shape) <= dim:
        return tuple(int(s) for s in shape)
    return tuple(rank if d == dim else int(s) for d, s in enumerate(shape))


def adapter_rank(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The rank shared by every LoRA tensor of an adapter, or None when it has no LoRA tensor.

    Raises:
        UpdateError: two LoRA tensors have different ranks (named, with their shapes).
    """
    ranks = {name: r for name, shape in shapes.items() if (r := tensor_rank(name, shape)) is not None}
    if not ranks:
        return None
    first = next(iter(ranks))
    for name, r in ranks.items():
        if r != ranks[first]:
            raise UpdateError(
                f"LoRA tensors of one adapter must share one rank: {first} has rank {ranks[first]} "
                f"(shape {list(shapes[first])}), {name} has rank {r} (shape {list(shapes[name])})"
            )
    return ranks[first]


def likely_rank(ranks: Sequence[int]) -> int | None:
    """The rank most tensors of a reply have (ties: the larger); screening blames the tensors off it."""
    counts = Counter(ranks)
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if counts else None


def truncate_lora(state: Mapping[str, torch.Tensor], rank: int) -> OrderedDict[str, torch.Tensor]:
    """Keep the first ``rank`` slots of every LoRA tensor (A[:rank, :], B[:, :rank]); others unchanged.

    Raises:
        UpdateError: ``rank`` < 1, or a LoRA tensor has fewer than ``rank`` slots.
    """
    if rank < 1:
        raise UpdateError(f"a LoRA rank must be >= 1, got {rank}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in state.items():
        dim, have = rank_dim(name), tensor_rank(name, tuple(tensor.shape))
        if dim is None or have is None:
            out[name] = tensor
            continue
        if have < rank:
            raise UpdateError(f"tensor {name} has rank {have} (shape {list(tensor.shape)}); cannot keep {rank} rank slots of it")
        # A copy: the truncation must not alias the received buffer while training writes to it.
        out[name] = tensor.narrow(dim, 0, rank).clone()
    return out


def _check_pad(name: str, shape: Sequence[int], reference: Sequence[int]) -> int | None:
    """The rank dimension to pad ``name`` along (None: nothing to pad), or UpdateError unless ``shape``
    is the reference's at a rank 1 <= r_i <= the reference's."""
    dim, have, full = rank_dim(name), tensor_rank(name, shape), tensor_rank(name, reference)
    if dim is None or have is None or tuple(shape) == tuple(reference):
        if tuple(shape) != tuple(reference):
            raise UpdateError(f"tensor {name} has shape {list(shape)}, the global adapter's is {list(reference)}")
        return None
    if full is None or not 1 <= have <= full or tuple(shape) != shape_at_rank(name, reference, have):
        raise UpdateError(
            f"tensor {name} has shape {list(shape)}; padding it to the global adapter's {list(reference)} needs the "
            f"global shape at a rank 1 <= r_i <= {full}"
        )
    return dim


def pad_array(name: str, values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``values`` padded to ``reference``'s shape with the reference's values in the slots it lacks.

    For a LoRA tensor at rank r_i trained from the global tensor ``reference`` at rank r: the
    first r_i rank slots are ``values``, the others ``reference``'s (so the update, result minus
    reference, is zero there); the result has ``values``' dtype. Any other tensor must already
    have the reference's shape and is returned as it is.

    Raises:
        UpdateError: ``values`` is not the reference's shape at a rank 1 <= r_i <= r.
    """
    dim = _check_pad(name, values.shape, reference.shape)
    if dim is None:
        return values
    padded = np.array(reference, dtype=values.dtype, copy=True)
    padded[tuple(slice(0, n) if d == dim else slice(None) for d, n in enumerate(values.shape))] = values
    return padded


def pad_lora(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Pad every LoRA tensor of ``state`` to the rank of ``reference`` (the global adapter it was
    truncated from) with the reference's values in the slots it lacks; other tensors unchanged.

    The torch counterpart of :func:`pad_array`, for a site that pads its own reply (a SecAgg+ round,
    where the coordinator sees only the sum). The new slots take ``state``'s dtype and device.

    Raises:
        UpdateError: a LoRA tensor is missing from ``reference``, or is not its shape at a rank 1 <= r_i <= r.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in state.items():
        if rank_dim(name) is None:
            out[name] = tensor
            continue
        if name not in reference:
            raise UpdateError(f"tensor {name} is not in the global adapter it is padded from")
        ref = reference[name]
        dim = _check_pad(name, tuple(tensor.shape), tuple(ref.shape))
        if dim is None:
            out[name] = tensor
            continue
        padded = ref.to(dtype=tensor.dtype, device=tensor.device, copy=True)
        padded.narrow(dim, 0, int(tensor.shape[dim])).copy_(tensor)
        out[name] = padded
    return out


def site_lora_rank(run_rank: int, max_rank: int) -> int:
    """The rank a site trains: the run's r, capped by the site's limit (0: no limit)."""
    if max_rank < 0:
        raise ValueError(f"a site's max LoRA rank must be >= 0 (0: no limit), got {max_rank}")
    return run_rank if max_rank == 0 else min(run_rank, max_rank)


def site_lora_alpha(alpha: float, run_rank: int, site_rank: int) -> float:
    """alpha_i = alpha r_i / r: PEFT scales a rank-r_i update by alpha_i / r_i = alpha / r, the global scale."""
    if not 1 <= site_rank <= run_rank:
        raise ValueError(f"a site's LoRA rank must be in [1, {run_rank}] (the run's lora.rank), got {site_rank}")
    # The run's own alpha at full rank, bit for bit (alpha * r / r can differ in the last bit).
    return alpha if site_rank == run_rank else alpha * site_rank / run_rank
