"""--compile: a compiled training step computes what the eager one does, checkpoints stay plain,
and the loss traces into one graph (no data-dependent shapes, hence no host sync on a GPU)."""
import copy

import pytest
import torch

from conftest import run_script
from engine.loop import training_step
from engine.recipes import build_optimizer
from methods.dcdh import DCDH
from models import build_model
from methods.dcdh import pull_loss, push_loss, quantization_loss
from utils.device import compile_model, has_cxx_compiler
from utils.errors import UserInputError

needs_cxx = pytest.mark.skipif(not has_cxx_compiler(),
                               reason="torch.compile on the CPU needs a C++ compiler on PATH")


def test_loss_traces_without_graph_breaks():
    """Boolean-mask indexing (nonzero) or .item() in the loss would break the graph here; on a
    GPU each such break is a device-to-host sync per training step."""
    codes = torch.randn(16, 12, requires_grad=True)
    labels = torch.randint(0, 10, (16,))
    centers = torch.randn(10, 12, requires_grad=True)

    def loss(h, y, m):
        return pull_loss(h, y, m, 0.25) + 0.1 * push_loss(m) + 0.01 * quantization_loss(h, y, 10, 0.01)

    explained = torch._dynamo.explain(loss)(codes, labels, centers)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compile_mode_checked():
    with pytest.raises(UserInputError, match="--compile 'fast'"):
        compile_model(torch.nn.Linear(2, 2), "fast", torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert compile_model(model, "off", torch.device("cpu")) is model


@needs_cxx
def test_compiled_step_equals_eager_step():
    """Same losses and gradients on the first step; later steps drift apart slowly (float32
    reordering amplified by sign() in the quantization term), so only step 2's total is compared."""
    torch.manual_seed(0)
    model = build_model("dfhnet", 12).to(memory_format=torch.channels_last)
    criterion = DCDH(8, 12)
    twin, twin_criterion = copy.deepcopy(model), copy.deepcopy(criterion)
    initial = [p.detach().clone() for p in model.parameters()]
    compiled = compile_model(twin, "default", torch.device("cpu"))
    opt = build_optimizer("sgd", model, criterion, 0.005)
    twin_opt = build_optimizer("sgd", twin, twin_criterion, 0.005)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 8, (32,), generator=gen)) for _ in range(2)]
    eager = training_step(model, criterion, opt, *batches[0])
    fast = training_step(compiled, twin_criterion, twin_opt, *batches[0])
    for key in ("pull", "push", "quant", "total"):
        torch.testing.assert_close(fast[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    # measured: within 3.2e-3 of each tensor's largest gradient with 2 threads, 1.8e-2 (a BatchNorm
    # weight) with one: float32 sums in another order; conv biases ahead of BatchNorm have ~0
    # gradients, so only the absolute bound applies to them
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            gap = (q.grad - p.grad).abs().max().item()
            assert gap <= 4e-2 * p.grad.abs().max().item() + 1e-5, (name, gap)
    # the compiled module updated the twin's own parameters (shared with it, not copied)
    moved = max((p - p0).abs().max().item() for p, p0 in zip(twin.parameters(), initial))
    apart = max((p - q).abs().max().item() for p, q in zip(model.parameters(), twin.parameters()))
    assert moved > 1e-3 and apart < 0.05 * moved, (moved, apart)
    eager = training_step(model, criterion, opt, *batches[1])
    fast = training_step(compiled, twin_criterion, twin_opt, *batches[1])
    torch.testing.assert_close(fast["total"], eager["total"], rtol=1e-2, atol=0)


@needs_cxx
def test_cli_compile_writes_plain_checkpoint(synthetic_root, tmp_path):
    r = run_script("dcdh_train.py", "--dataset", "ddh", "--data-root", synthetic_root, "--len", "12",
                   "--epochs", "1", "--bs", "32", "--save", "c.tar", "--checkpoint-dir", str(tmp_path),
                   "--eval-every", "0", "--device", "cpu", "--compile", "default", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "c.tar", map_location="cpu", weights_only=True)
    assert state["config"]["compile"] == "default"
    assert sorted(state["backbone"]) == sorted(build_model("dfhnet", 12).state_dict())
    assert "torch.compile mode default" in (tmp_path / "c.log").read_text()
