"""Many identities: the blocked push term equals the whole-matrix one, holds no C x C tensor, and
the trainer refuses, in one line and before writing anything, a run whose method will not fit."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import run_script
from engine.preflight import LIMIT_ENV, available_memory, check_memory
from host_reads import HostReads
from methods import METHODS
from methods.dcdh import DCDH, push_block_rows, push_loss, push_loss_reference
from utils.errors import UserInputError


def both(centers, block=None, authors_constant=False):
    """(value, gradient) of the blocked and of the reference push term."""
    m = centers.clone().requires_grad_(True)
    blocked = push_loss(m, authors_constant, block=block)
    g_blocked, = torch.autograd.grad(blocked, m)
    r = centers.clone().requires_grad_(True)
    reference = push_loss_reference(r, authors_constant)
    g_reference, = torch.autograd.grad(reference, r)
    return blocked, g_blocked, reference, g_reference


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("c", [2, 3, 5, 17, 64, 65, 129, 300])
@pytest.mark.parametrize("block", [None, 1, 7, 64])
def test_blocked_equals_reference_float64(c, block):
    g = torch.Generator().manual_seed(c)
    centers = torch.randn(c, 48, generator=g, dtype=torch.float64) * 3
    v, gv, r, gr = both(centers, block)
    assert relative(v, r) < 1e-6
    assert relative(gv, gr) < 1e-6


@pytest.mark.parametrize("c", [2, 31, 300])
def test_blocked_equals_reference_float32(c):
    g = torch.Generator().manual_seed(c)
    centers = torch.randn(c, 48, generator=g)
    v, gv, r, gr = both(centers, block=16)
    assert relative(v, r) < 1e-5
    assert relative(gv, gr) < 1e-5


def test_authors_constant_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(9, 5, generator=g, dtype=torch.float64)
    v, _, r, _ = both(centers, block=4, authors_constant=True)
    assert relative(v, r) < 1e-12
    m = centers.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: push_loss(x, block=2), (m,))


def test_gradient_formula():
    """grad_U = K / (C (C-1)) sigmoid(theta) U with the diagonal of sigmoid(theta) zero, U the
    normalised centers (checked through the gradient w.r.t. U, normalisation removed)."""
    g = torch.Generator().manual_seed(1)
    c, k = 7, 6
    unit = torch.nn.functional.normalize(torch.randn(c, k, generator=g, dtype=torch.float64), dim=1)
    from methods.dcdh import _BlockedPairSoftplus
    s = torch.sigmoid(0.5 * k * unit @ unit.t()).fill_diagonal_(0.0)
    for in_forward in (True, False):  # accumulated in the forward pass, or recomputed in backward
        u = unit.clone().requires_grad_(True)
        loss = _BlockedPairSoftplus.apply(u, 0.5 * k, 3, in_forward) / (c * (c - 1))
        grad, = torch.autograd.grad(3.0 * loss, u)
        torch.testing.assert_close(grad, 3.0 * k / (c * (c - 1)) * s @ unit)


def test_block_rows():
    assert push_block_rows(2) == 2
    assert push_block_rows(4000) == 2 ** 22 // 4000
    assert push_block_rows(10 ** 6) == 64             # at least PUSH_MIN_BLOCK rows
    assert push_block_rows(10 ** 6, block=10) == 10
    assert push_block_rows(300, block=1000) == 300
    assert push_block_rows(8631, device="cuda") == 2 ** 24 // 8631


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten operation returns."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def test_no_c_by_c_tensor_at_4000_identities():
    c = 4000
    centers = torch.randn(c, 48, requires_grad=True)
    with LargestOutput() as seen:
        push_loss(centers).backward()
    assert seen.largest < c * c / 3, (seen.largest, seen.op)  # a block: 1,048 x 4,000
    assert seen.largest <= push_block_rows(c) * c
    with LargestOutput() as ref_seen:  # the detector sees the reference's C x C matrices
        push_loss_reference(centers.detach()[:500])
    assert ref_seen.largest == 500 * 500


def test_training_loss_reads_nothing_back(monkeypatch):
    import methods.dcdh
    monkeypatch.setattr(methods.dcdh, "check_batch", lambda *a: None)
    method = DCDH(300, 12)
    codes = torch.randn(16, 12, requires_grad=True)
    labels = torch.randint(0, 300, (16,))
    with HostReads() as seen:
        method(codes, labels)["total"].backward()
        push_loss(method.centers, block=7).backward()
    assert seen.found == []


def test_bf16_autocast_runs_in_float32():
    centers = torch.randn(50, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = push_loss(centers, block=8)
    assert value.dtype == torch.float32
    value.backward()
    expected = push_loss_reference(centers.detach())
    assert relative(value.detach(), expected) < 1e-5


def test_estimates_are_linear_in_classes():
    for name, cls in METHODS.items():
        small = cls.memory_estimate(1000, 48, 50000, 256)
        large = cls.memory_estimate(100000, 48, 50000, 256)
        assert 0 < small <= large
        assert large <= 100 * small + 1, name  # never quadratic in C
    # DCDH at 100,000 identities: a few hundred MiB to a few GiB, not the 140 GB of C x C tensors
    assert METHODS["dcdh"].memory_estimate(100000, 48, 10 ** 6, 256) < 4 * 2 ** 30


def test_check_memory(monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, str(10 ** 9))
    assert available_memory("cpu") <= 10 ** 9
    estimate, free = check_memory(METHODS["dcdh"], 1000, 48, 5000, 256, "cpu")
    assert estimate == METHODS["dcdh"].memory_estimate(1000, 48, 5000, 256) and free <= 10 ** 9
    with pytest.raises(UserInputError) as err:
        check_memory(METHODS["dcdh"], 10 ** 6, 48, 5000, 256, "cpu")
    message = str(err.value)
    assert "\n" not in message and "1,000,000 identities" in message and "--bs" in message
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(UserInputError, match=LIMIT_ENV):
        available_memory("cpu")


def test_trainer_refuses_before_writing(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1000")
    ck = tmp_path / "ck"
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--len", "12",
                   "--epochs", "1", "--bs", "32", "--device", "cpu", "--checkpoint-dir", str(ck),
                   "--save", "m.tar")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "8 identities" in lines[0] and "available" in lines[0] and "--bs" in lines[0]
    assert not ck.exists() or os.listdir(ck) == []
