"""A dispatch mode that records every operation making the host wait for the device.

On a GPU these ops (a ``.item()``, a boolean-mask index, ``nonzero``, ``bincount`` ...) read a
size or a value back to the host and stall the stream; on the CPU they are recorded all the
same, so a CPU-only test suite can prove that a training step issues none of them.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operations whose result size or value the host must read back from a GPU
HOST_READING_OPS = {"bincount", "nonzero", "_local_scalar_dense", "masked_select", "unique",
                    "_unique", "_unique2", "unique_consecutive", "unique_dim", "is_nonzero", "equal",
                    "repeat_interleave"}


class HostReads(TorchDispatchMode):
    """Records in ``found`` every aten call above that runs inside it, and indexing with a boolean mask."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in HOST_READING_OPS:
            self.found.append(name)
        if name.startswith("index") and any(
                isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                     for t in a) for a in args):
            self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))
