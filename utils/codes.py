"""Binary hash codes: ``binarize`` (network outputs -> +-1 codes) and exact Hamming distances.

A code is a +-1 vector of K bits, stored as a float or signed integer tensor (int8 is the compact
choice); a set of codes is a (items, K) tensor. The Hamming distance between two codes is
``(K - <q, b>) / 2``, the number of differing bits (docs/design.md, "Retrieval metrics").

``check_codes`` / ``check_code_pair`` are the input checks shared with ``utils.metrics``.
"""
import numpy as np
import torch

Tensor = torch.Tensor

__all__ = ["binarize", "hamming_distance"]


def as_tensor(x, name):
    """``x`` as a detached tensor (arrays and lists are converted); ValueError if impossible."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as e:  # noqa: BLE001 - report any conversion failure the same way
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__} ({e})") from None


def is_signed_int(dtype):
    return dtype in (torch.int8, torch.int16, torch.int32, torch.int64)


def check_codes(x, name):
    """``x`` as a non-empty (items, K) tensor of +-1 values (float or signed integer dtype).

    Raises: ValueError naming ``name`` otherwise.
    """
    x = as_tensor(x, name)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor of shape (items, bits); got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); at least one code is needed")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has codes of length 0 (shape {tuple(x.shape)})")
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or is_signed_int(x.dtype)):
        raise ValueError(f"{name} must be a float or signed integer tensor of +-1 values, got dtype {x.dtype}")
    lo, hi = torch.aminmax(x.abs())          # (abs of an integer dtype's minimum stays negative)
    if not (bool(lo == 1) and bool(hi == 1)):
        bad = x[(x != 1) & (x != -1)][:3].tolist()
        raise ValueError(f"{name} must contain only +1 and -1 (found e.g. {bad}); "
                         "use utils.metrics.binarize(h) to turn network outputs into codes")
    return x


def check_code_pair(query_codes, database_codes):
    """Both code sets checked, with the same code length and device. Returns (q, b)."""
    q = check_codes(query_codes, "query_codes")
    b = check_codes(database_codes, "database_codes")
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"code lengths differ: query_codes has {q.shape[1]} bits, "
                         f"database_codes has {b.shape[1]} bits")
    if q.device != b.device:
        raise ValueError(f"query_codes is on {q.device} but database_codes is on {b.device}")
    return q, b


def binarize(h: Tensor) -> Tensor:
    """Binary code ``b = sign(h)`` with sign(0) = -1 (docs/design.md, "The method").

    Args:
        h: tensor of any shape, typically float (batch, K) network outputs.
    Returns:
        tensor of the same shape, dtype and device as ``h`` holding +1 where ``h > 0`` and -1
        elsewhere (0, negative values and NaN all map to -1).
    Raises:
        ValueError: if ``h`` is boolean, complex or unsigned (-1 is not representable).
    """
    h = as_tensor(h, "h")
    if h.dtype == torch.bool or h.is_complex() or not (h.is_floating_point() or is_signed_int(h.dtype)):
        raise ValueError(f"binarize expects a float (or signed integer) tensor, got dtype {h.dtype}")
    one = torch.ones((), dtype=h.dtype, device=h.device)
    return torch.where(h > 0, one, -one)


def hamming_distance(query_codes: Tensor, database_codes: Tensor) -> Tensor:
    """All pairwise Hamming distances ``(K - <q, b>) / 2`` between +-1 codes.

    Args:
        query_codes: (Q, K) +-1 codes, float or signed integer dtype.
        database_codes: (N, K) +-1 codes on the same device.
    Returns:
        int64 tensor (Q, N) of exact distances in 0..K (number of differing bits), on the
        device of the inputs. Memory is O(Q N); use the chunked functions of ``utils.metrics``
        for large sets.
    Raises:
        ValueError: for non-2-D or empty inputs, different code lengths or devices, or values
            other than +-1.
    """
    q, b = check_code_pair(query_codes, database_codes)
    k = q.shape[1]
    dtype = torch.float32 if k < 2 ** 23 else torch.float64
    ip = q.to(dtype) @ b.to(dtype).t()      # +-1 products summed exactly (also in TF32/bf16 modes)
    return torch.round((k - ip) * 0.5).long()
