"""DDP and a non-finite loss: when one process's loss becomes NaN, every process stops at the same
batch with the same message (none is left waiting in a collective for a process that stopped).

Two gloo processes train one epoch of 5 batches; process 1's loss is made NaN at its 3rd batch
(after the method computed it, so nothing carries it to process 0 within that step). Before the
fix, process 1 stopped at batch 3 and process 0 went on to batch 4 and waited in DDP's gradient
all-reduce until the process group's timeout.
"""
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT

BATCHES, NAN_BATCH, NAN_RANK, WORLD = 5, 3, 1, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NanAt(torch.nn.Module):
    """A method whose ``total`` is NaN at the ``at``-th call (1-based); ``at`` None: never."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, codes, labels, index=None):
        terms = self.inner(codes, labels, index)
        self.calls += 1
        if self.calls == self.at:
            terms = dict(terms, total=terms["total"] * float("nan"))
        return terms

    def epoch_end(self):
        self.inner.epoch_end()


def worker(rank, port, out_dir):
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a bounded wait: a process left in a collective fails after 20 s instead of hanging the test
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=20))
    outcome = "finished"
    try:
        from engine.loop import NonFiniteLoss, train_one_epoch
        from engine.recipes import build_optimizer
        from methods.dcdh import DCDH
        from models import build_model
        torch.manual_seed(0)
        model, inner = build_model("dfhnet", 12), DCDH(4, 12)
        method = NanAt(inner, NAN_BATCH if rank == NAN_RANK else None)
        optimizer = build_optimizer("sgd", model, inner, lr=0.01)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        g = torch.Generator().manual_seed(rank)
        loader = [(torch.randn(8, 3, 32, 32, generator=g).clamp(-1, 1), torch.arange(8) % 4)
                  for _ in range(BATCHES)]
        try:
            train_one_epoch(ddp, method, optimizer, loader, torch.device("cpu"), 0, progress=False)
        except NonFiniteLoss as e:
            outcome = f"NonFiniteLoss: {e}"
    except Exception as e:  # e.g. the gloo timeout of a process left waiting
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
        dist.destroy_process_group()


def test_nan_on_one_process_stops_all_at_the_same_batch(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)]
    expected = (f"NonFiniteLoss: the loss became nan at epoch 1, batch {NAN_BATCH} "
                f"in process {NAN_RANK} of {WORLD}")
    assert outcomes == [expected] * WORLD  # a process left waiting would report the gloo timeout instead


def test_single_process_message_is_unchanged():
    from engine.loop import NonFiniteLoss, train_one_epoch
    from engine.recipes import build_optimizer
    from methods.dcdh import DCDH
    from models import build_model
    torch.manual_seed(0)
    model, inner = build_model("dfhnet", 12), DCDH(4, 12)
    optimizer = build_optimizer("sgd", model, inner, lr=0.01)
    loader = [(torch.randn(8, 3, 32, 32).clamp(-1, 1), torch.arange(8) % 4) for _ in range(3)]
    try:
        train_one_epoch(model, NanAt(inner, 2), optimizer, loader, torch.device("cpu"), 4, progress=False)
    except NonFiniteLoss as e:
        assert str(e) == "the loss became nan at epoch 5, batch 2"
    else:
        raise AssertionError("no NonFiniteLoss")
