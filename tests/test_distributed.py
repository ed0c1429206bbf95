"""Two processes (gloo, CPU): one DDP step equals the single-process step on the global batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT

GLOBAL_BATCH, CLASSES, BITS = 16, 5, 12


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup():
    """Model, loss, optimizer and a fixed global batch, identical in every process.

    BatchNorm layers are put in eval mode: on CPUs there is no SyncBatchNorm, so per-process
    batch statistics would differ from the global batch's; with fixed statistics the step
    isolates what this test checks — gradient averaging of the network and the class centers,
    and the regression W computed over the global batch.
    """
    from engine.recipes import build_optimizer
    from methods.dcdh import DCDH
    from models import build_model
    torch.manual_seed(0)
    model = build_model("dfhnet", BITS).eval()
    criterion = DCDH(CLASSES, BITS)
    optimizer = build_optimizer("sgd", model, criterion, lr=0.05)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g).clamp(-1, 1)
    labels = torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)
    return model, criterion, optimizer, images, labels


def flat_state(model, criterion):
    return {**{f"net.{k}": v.detach().clone() for k, v in model.named_parameters()},
            "centers": criterion.centers.detach().clone(),
            **{f"grad.{k}": v.grad.clone() for k, v in model.named_parameters() if v.grad is not None},
            "grad.centers": criterion.centers.grad.clone()}


def worker(rank, world, port, out):
    sys.path.insert(0, ROOT)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from engine.loop import training_step
        from utils.distributed import all_reduce_sum_
        model, criterion, optimizer, images, labels = setup()
        criterion.all_reduce = all_reduce_sum_
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        terms = training_step(ddp, criterion, optimizer, images[part], labels[part])
        if rank == 0:
            torch.save({"state": flat_state(model, criterion), "quant": terms["quant"]}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_step_equals_single_process_step(tmp_path):
    from engine.loop import training_step
    out = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)["state"]

    model, criterion, optimizer, images, labels = setup()
    training_step(model, criterion, optimizer, images, labels)
    want = flat_state(model, criterion)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
    # the step really moved the weights (so equality is not trivially true)
    model0 = setup()[0]
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), model0.parameters()))
    assert moved > 1e-4


def torchrun(*argv, timeout=180):
    """``torchrun --nproc_per_node 2 dcdh_train.py ARGV`` on the CPU, one thread a process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "dcdh_train.py", *map(str, argv)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ddp_run(synthetic_root, tmp_path_factory):
    """One epoch under torchrun with 2 processes: (its folder, the CompletedProcess)."""
    folder = tmp_path_factory.mktemp("ddp")
    r = torchrun("--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "1", "--bs", "32",
                 "--save", "m.tar", "--checkpoint-dir", folder, "--eval-every", "1", "--device", "cpu")
    return folder, r


def test_torchrun_two_processes_train_and_save_once(ddp_run):
    tmp_path, r = ddp_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("[epoch 1/1]") == 1 and "x 2 processes" in r.stdout   # rank 0 alone logs
    assert "mAP" in r.stdout
    ck = torch.load(tmp_path / "m.tar", map_location="cpu", weights_only=True)
    assert ck["config"]["world_size"] == 2 and ck["epoch"] == 1
    assert (tmp_path / "m.log").read_text().count("[epoch 1/1]") == 1


def test_torchrun_resume_without_the_best_file_stops_every_process(ddp_run, synthetic_root, tmp_path):
    """A finished run whose best model no file holds: under torchrun only process 0 looked for the
    file, so it exited 2 while process 1 said nothing and exited 0. Now process 0's answer is
    broadcast and both stop with the one-line error (exit 2), and nothing is written."""
    from utils.checkpoint import load_checkpoint, save_checkpoint
    assert ddp_run[1].returncode == 0, ddp_run[1].stderr[-3000:]
    state = load_checkpoint(str(ddp_run[0] / "m.last.tar"))  # made a 2-epoch run whose best epoch was the first
    save_checkpoint(dict(state, epoch=2, best_epoch=0, best_loss=0.5), str(tmp_path / "x.last.tar"))  # no x.tar
    r = torchrun("--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "2", "--bs", "32",
                 "--checkpoint-dir", tmp_path, "--device", "cpu", "--save", "new.tar",
                 "--resume", tmp_path / "x.last.tar")
    line = (f"dcdh_train.py: error: --resume {tmp_path / 'x.last.tar'}: training had already ended (all 2 epochs "
            f"are done), and no file holds its best model (epoch 1; not {tmp_path / 'new.tar'}); nothing was written")
    assert r.returncode != 0
    assert r.stderr.count(line) == 2, r.stderr[-3000:]   # one line from each process
    assert not (tmp_path / "new.tar").exists()
