"""The GPU fast path, checked on the CPU: a training step issues no operation that makes the
host wait for the device, the fused optimizers compute the default ones' update, and a resumed
run keeps the fused optimizer."""
import copy
import subprocess
import sys

import pytest
import torch

import methods.dcdh
from conftest import ROOT
from host_reads import HostReads
from engine.loop import training_step
from engine.recipes import build_optimizer
from methods.dcdh import DCDH
from models import build_model

def test_host_reads_detector_catches_them():
    labels = torch.randint(0, 10, (16,))
    with HostReads() as seen:
        torch.bincount(labels, minlength=10)
        torch.randn(4, 4)[torch.eye(4, dtype=torch.bool)]
        float(labels.sum())
    assert seen.found == ["bincount", "index with a boolean mask", "_local_scalar_dense"]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_step_reads_nothing_back(monkeypatch, optimizer):
    # the label-range check reads labels only when they are on the CPU; on a GPU it is skipped
    monkeypatch.setattr(methods.dcdh, "check_batch", lambda *a: None)
    torch.manual_seed(0)
    model = build_model("dfhnet", 12).to(memory_format=torch.channels_last)
    criterion = DCDH(8, 12)
    opt = build_optimizer(optimizer, model, criterion, 0.005)
    images = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (16,))
    training_step(model, criterion, opt, images, labels)  # optimizer state created outside the check
    with HostReads() as seen:
        for amp in (False, True):
            terms = training_step(model, criterion, opt, images, labels, amp=amp)
    assert seen.found == []
    assert torch.isfinite(terms["total"])


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_optimizer_equals_default(name):
    torch.manual_seed(0)
    model, criterion = build_model("dfhnet", 12), DCDH(8, 12)
    twin, twin_criterion = copy.deepcopy(model), copy.deepcopy(criterion)
    fused = build_optimizer(name, model, criterion, 0.005)
    plain = build_optimizer(name, twin, twin_criterion, 0.005)
    for group in plain.param_groups:
        group["fused"], group["foreach"] = False, False  # the single-tensor reference loop
    assert all(group["fused"] for group in fused.param_groups)
    gen = torch.Generator().manual_seed(1)
    params = list(model.parameters()) + list(criterion.parameters())
    twin_params = list(twin.parameters()) + list(twin_criterion.parameters())
    for _ in range(3):  # the same gradients for both, several steps (amsgrad's running max too)
        for p, q in zip(params, twin_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_from_unfused_checkpoint_uses_fused_optimizer(synthetic_root, tmp_path):
    def train(*extra):
        r = subprocess.run([sys.executable, "dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root,
                            "--len", "12", "--bs", "32", "--save", "m.tar", "--checkpoint-dir", str(tmp_path),
                            "--eval-every", "0", "--device", "cpu", *extra],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    train("--epochs", "1")
    last = tmp_path / "m.last.tar"
    state = torch.load(last, map_location="cpu", weights_only=True)
    for group in state["optimizer"]["param_groups"]:  # as written by an older, unfused version
        group["fused"], group["foreach"] = None, None
    torch.save(state, last)
    train("--epochs", "2", "--resume")
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 2
    assert [g["fused"] for g in resumed["optimizer"]["param_groups"]] == [True, True]
