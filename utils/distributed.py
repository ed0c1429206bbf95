"""Several processes with torch.distributed, as started by ``torchrun``.

``torchrun --nproc_per_node N dcdh_train.py ...`` sets RANK, LOCAL_RANK and WORLD_SIZE;
``init_distributed`` joins the process group (NCCL on GPUs, gloo on CPUs). Without those
variables everything runs in one process and these helpers do nothing.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserInputError


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device):
    """Join the process group when started by torchrun (WORLD_SIZE > 1).

    Args: device (torch.device): the device asked for; with CUDA each process takes
    ``cuda:LOCAL_RANK``. Returns: DistInfo. Raises: UserInputError when there are fewer GPUs
    than local processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserInputError(f"torchrun started local process {local}, but this machine has "
                                 f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node <= that")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def all_reduce_sum_(tensor):
    """Sum ``tensor`` in place over all processes (no-op in a single process); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rows(tensor):
    """Every process's ``tensor`` (the same shape in each), stacked in rank order: (world, *shape),
    the same in every process; ``tensor[None]`` in a single process. One all-reduce of a
    zero-filled table where each process fills its own row (works with gloo and NCCL; NaN and
    inf values arrive unchanged, since the other rows add exact zeros)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor[None]
    table = tensor.new_zeros((dist.get_world_size(), *tensor.shape))
    table[dist.get_rank()] = tensor
    dist.all_reduce(table, op=dist.ReduceOp.SUM)
    return table


def average_gradients_(parameters):
    """Average the ``.grad`` of ``parameters`` over all processes in place (for parameters
    outside DistributedDataParallel, such as the class centers)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def barrier():
    """Wait for all processes (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup():
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
