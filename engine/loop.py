"""One optimisation step and one epoch, for any method of the registry."""
import math
import sys
import time

import torch
from tqdm import tqdm

from utils.distributed import all_reduce_sum_, average_gradients_, gather_rows


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def training_step(model, method, optimizer, images, labels, index=None, amp=False):
    """One optimisation step on a batch; returns the method's loss terms, detached.

    ``model`` (the network, possibly DistributedDataParallel-wrapped or compiled) maps images to
    codes ``u``; ``method`` (a ``methods.HashingMethod``) turns ``(u, labels, index)`` into loss
    terms. The method's own parameters (class centers, ...) live outside DDP, so their gradients
    are averaged over processes here. ``amp``: bfloat16 autocast for the network; the method's
    loss always runs in float32. ``optimizer`` is the shared torch optimizer or the object of the
    method's ``build_optimizer`` hook (DDAH's two optimizers); the step is the same for both.

    Args: images float32 (B, 3, S, S); labels int64 (B,); index int64 (B,) positions in the
    training set or None. Returns: dict name -> 0-d float32 tensor (on the device; no host sync).
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        codes = model(images)
    terms = method(codes.float(), labels, index)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    average_gradients_(method.parameters())
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


def train_one_epoch(model, method, optimizer, loader, device, epoch, amp=False, progress=True):
    """One pass over ``loader`` (batches ``(images, labels[, index])``) minimising ``method``'s loss,
    then the method's ``epoch_end()`` hook.

    The loss is checked for NaN/inf after every batch on the CPU and every 25 batches on a GPU
    (one device sync per check); nothing is saved from inside an epoch, so a stop leaves the
    checkpoints of the last good epoch. Under torch.distributed each check looks at the losses
    of all processes (``gather_rows``), so every process stops at the same batch with the same
    message when any one of them has a non-finite loss.

    Returns: dict with ``loss`` (the mean of ``total``) and the sample-weighted mean of every
    other term the method returns, over all processes (floats), ``images`` (int, all processes)
    and ``seconds`` (float).
    Raises: NonFiniteLoss naming the epoch (1-based) and batch (and, with several processes,
    the first process) when the loss is NaN or infinite.
    """
    model.train()
    method.train()
    keys, sums = None, None  # term names fixed by the first batch; sums stay on the device
    local_images = 0
    check_every = 1 if device.type == "cpu" else 25
    pending = []
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=None if progress else True,
               file=sys.stderr, unit="batch")

    def check(batch):
        # every process decides on every process's losses (one all-reduce): all of them stop at the
        # same batch with the same message, none is left waiting in a collective for the others
        table = gather_rows(torch.stack(pending).double())  # (processes, len(pending))
        values = torch.cat([table.reshape(-1), sums[:1]]).tolist()  # one sync
        rows = [values[r * len(pending):(r + 1) * len(pending)] for r in range(table.shape[0])]
        for i in range(len(pending)):
            bad = [(r, row[i]) for r, row in enumerate(rows) if not math.isfinite(row[i])]
            if bad:
                where = f" in process {bad[0][0]} of {len(rows)}" if len(rows) > 1 else ""
                raise NonFiniteLoss(f"the loss became {bad[0][1]} at epoch {epoch + 1}, "
                                    f"batch {batch - len(pending) + i + 2}{where}")
        pending.clear()
        bar.set_postfix(loss=f"{values[-1] / max(local_images, 1):.4f}")

    batch = -1
    for batch, item in enumerate(bar):
        images, labels = item[0], item[1]
        index = item[2] if len(item) > 2 else None
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if index is not None:
            index = index.to(device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last)  # faster convolutions, CPU and GPU
        terms = training_step(model, method, optimizer, images, labels, index, amp)
        if keys is None:
            keys = ["total"] + [k for k in terms if k != "total"]
            sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
        pending.append(terms["total"])
        n = images.shape[0]
        sums += torch.stack([terms[k] for k in keys]).double() * n  # no host-to-device copy
        local_images += n
        if len(pending) >= check_every:
            check(batch)
    if pending:
        check(batch)
    with torch.no_grad():
        method.epoch_end()
    keys = keys or ["total"]
    sums = sums if sums is not None else torch.zeros(1, dtype=torch.float64, device=device)
    totals = torch.cat([sums, sums.new_tensor([local_images])])
    all_reduce_sum_(totals)
    seen = int(totals[-1].item())
    means = [float(v) / max(seen, 1) for v in totals[:-1].tolist()]
    out = {("loss" if k == "total" else k): v for k, v in zip(keys, means)}
    out.update(images=seen, seconds=time.perf_counter() - start)
    return out
