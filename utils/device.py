"""Choosing the compute device from ``--device``."""
import torch

from .errors import UserInputError


def resolve_device(name=None):
    """``--device`` value -> torch.device; None picks CUDA when available, else CPU.

    Raises: UserInputError for an unparsable name or a CUDA device this machine lacks.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserInputError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UserInputError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return device
