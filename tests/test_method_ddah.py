"""DDAH: its loss against naive loops, the gradients of its two optimizers against the reference's
two backward passes, each optimizer updating only its own parameters, a whole step with no host
read, the optimizer set's state, and the trainer's backbone rules."""
import io
import math

import pytest
import torch

import dcdh_train
import methods.base
from engine.loop import training_step
from engine.recipes import build_optimizer, resolve_recipe
from host_reads import HostReads
from methods.ddah import DDAH
from models import build_model
from utils.errors import UserInputError
from utils.optimizers import OptimizerSet

BITS, CLASSES = 6, 4


def _naive_branch(codes, labels, weight, bias, weight_quant):
    ce = quant = 0.0
    for u, y in zip(codes, labels):
        t = [math.tanh(v) for v in u]
        scores = [sum(w * x for w, x in zip(weight[c], t)) + bias[c] for c in range(len(bias))]
        top = max(scores)
        ce += -(scores[y] - top - math.log(sum(math.exp(s - top) for s in scores)))
        quant += sum(abs(abs(v) - 1) for v in u)
    return ce / len(codes), quant / len(codes), (ce + weight_quant * quant) / len(codes)


def test_loss_matches_naive_loops():
    torch.manual_seed(0)
    method = DDAH(CLASSES, BITS, weight_quant=0.05, margin=0.2).double()
    with torch.no_grad():
        method.classifier.bias.normal_()
    codes = 2 * torch.randn(5, 2 * BITS, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1])
    terms = method(codes, labels)
    w, b = method.classifier.weight.tolist(), method.classifier.bias.tolist()
    soft_a, quant_a, loss_a = _naive_branch(codes[:, :BITS].tolist(), labels.tolist(), w, b, 0.05)
    soft_b, quant_b, loss_b = _naive_branch(codes[:, BITS:].tolist(), labels.tolist(), w, b, 0.05)
    for key, value in (("softmax_a", soft_a), ("quant_a", quant_a), ("softmax_b", soft_b), ("quant_b", quant_b),
                       ("total", loss_a + loss_b), ("hinge", max(0.0, 0.2 + loss_a - loss_b))):
        assert terms[key].item() == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert method.attention_grad_scale.item() == (2.0 if 0.2 + loss_a - loss_b > 0 else 1.0)
    assert (DDAH(2, 4).weight_quant, DDAH(2, 4).margin) == (0.001, 0.0)  # the reference's LOSS_01 and m


def test_gradcheck_codes():
    torch.manual_seed(1)
    method = DDAH(3, 4).double()
    codes = (torch.rand(5, 8, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert torch.autograd.gradcheck(lambda c: method(c, labels)["total"], (codes,))


def _setup(margin, seed=0):
    torch.manual_seed(seed)
    model = build_model("ddahnet", BITS).train()
    method = DDAH(CLASSES, BITS, margin=margin)
    images = torch.randn(12, 3, 32, 32)
    labels = torch.arange(12) % CLASSES
    return model, method, images, labels


@pytest.mark.parametrize("margin", [5.0, -5.0])  # hinge active / inactive
def test_gradients_match_the_references_two_backward_passes(margin):
    """Trunk and classifier: grad(L_a + L_b); spatial network: grad(L_a + L_b + hinge), as the
    reference's ``loss_c.backward(retain_graph=True)`` then ``loss_s.backward()`` give them (on the
    same, not yet updated, weights)."""
    model, method, images, labels = _setup(margin)
    opt = method.build_optimizer(model, resolve_recipe("ddahnet", DDAH.recipe))
    parts = model.branch_parameters()
    trunk = parts["trunk"] + list(method.parameters())
    terms = method(model(images), labels)
    loss_c = terms["total"]
    # the reference's hinge, with its gradient: max(0, m + L_a - L_b)
    loss_a = terms["softmax_a"] + method.weight_quant * terms["quant_a"]
    loss_b = terms["softmax_b"] + method.weight_quant * terms["quant_b"]
    loss_s = torch.clamp(margin + loss_a - loss_b, min=0)
    ref_trunk = torch.autograd.grad(loss_c, trunk, retain_graph=True)
    ref_attention = torch.autograd.grad(loss_c + loss_s, parts["attention"], retain_graph=True)
    assert (loss_s.item() > 0) == (margin > 0)

    opt.zero_grad(set_to_none=True)
    loss_c.backward()
    opt.before_step()  # what step() does before the two optimizers step
    for p, g in zip(trunk, ref_trunk):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    for p, g in zip(parts["attention"], ref_attention):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_each_optimizer_updates_only_its_own_parameters():
    model, method, images, labels = _setup(1.0)
    opt = build_optimizer(resolve_recipe("ddahnet", DDAH.recipe), model, method)
    assert isinstance(opt, OptimizerSet) and set(opt.optimizers) == {"attention", "trunk"}
    parts = model.branch_parameters()
    own = {"attention": parts["attention"], "trunk": parts["trunk"] + list(method.parameters())}
    everything = [p for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]
    assert sorted(map(id, own["attention"] + own["trunk"])) == sorted(map(id, everything))
    for name in ("attention", "trunk"):
        listed = [p for g in opt.optimizers[name].param_groups for p in g["params"]]
        assert [id(p) for p in listed] == [id(p) for p in own[name]]
        assert all(not g.get("amsgrad") for g in opt.optimizers[name].param_groups)  # the reference's plain Adam
        before = [p.detach().clone() for p in everything]
        opt.zero_grad()
        method(model(images), labels)["total"].backward()
        opt.optimizers[name].step()
        mine = {id(p) for p in own[name]}
        for p, old in zip(everything, before):
            assert torch.equal(p, old) != (id(p) in mine), (name, p.shape)
    # the learning-rate schedule reaches both optimizers through param_groups
    for group in opt.param_groups:
        group["lr"] = 0.123
    assert all(g["lr"] == 0.123 for o in opt.optimizers.values() for g in o.param_groups)


def test_whole_step_reads_nothing_back_and_state_round_trips(monkeypatch):
    monkeypatch.setattr(methods.base, "CHECK_VALUES", False)
    model, method, images, labels = _setup(0.0)
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
    opt = build_optimizer(resolve_recipe("ddahnet", DDAH.recipe), model, method)
    training_step(model, method, opt, images, labels)
    with HostReads() as seen:
        for amp in (False, True):
            terms = training_step(model, method, opt, images, labels, amp=amp)
    assert seen.found == []
    assert set(terms) == {"softmax_a", "quant_a", "softmax_b", "quant_b", "hinge", "total"}
    assert all(torch.isfinite(v) for v in terms.values())
    # the optimizer set's state survives a checkpoint round trip (weights_only) into a fresh set
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = method.build_optimizer(model, resolve_recipe("ddahnet", DDAH.recipe))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for name in ("attention", "trunk"):
        a, b = opt.optimizers[name].state_dict(), fresh.optimizers[name].state_dict()
        assert a["param_groups"] == b["param_groups"]
        for key in a["state"]:
            for field, value in a["state"][key].items():
                torch.testing.assert_close(b["state"][key][field], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected the set"):
        fresh.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


def test_sgd_and_errors():
    model, method, images, labels = _setup(0.0)
    opt = build_optimizer(resolve_recipe("ddahnet", DDAH.recipe, optimizer="sgd"), model, method)
    assert all(isinstance(o, torch.optim.SGD) for o in opt.optimizers.values())
    with pytest.raises(ValueError, match="two-branch ddahnet network, not DFHNet"):
        method.build_optimizer(build_model("dfhnet", BITS), resolve_recipe("ddahnet", DDAH.recipe))
    with pytest.raises(ValueError, match=r"needs both branches' codes, \(B, 12\)"):
        method(torch.zeros(3, BITS), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shares parameters"):
        p = torch.nn.Parameter(torch.zeros(1))
        OptimizerSet({"a": torch.optim.SGD([p], lr=1), "b": torch.optim.SGD([p], lr=1)})


def _setup_args(*flags):
    args = dcdh_train.get_args_parser().parse_args(["--dataset", "ddh", "--data-root", "x", *flags])
    return dcdh_train._setup(args, {}, 1)


def test_trainer_backbone_rules():
    backbone, size, recipe, _, _ = _setup_args("--method", "ddah")  # the method's own network by default
    assert (backbone, size, recipe["lr"], recipe["lr_step"], recipe["epochs"]) == ("ddahnet", 32, 0.001, 100, 1000)
    assert _setup_args("--method", "ddh")[0] == "dfhnet"  # a loss: the shared backbone by default
    assert _setup_args("--method", "ddh", "--backbone", "ddhnet")[0] == "ddhnet"
    assert _setup_args("--method", "dcdh", "--backbone", "ddhnet")[0] == "ddhnet"
    with pytest.raises(UserInputError, match="--method ddah trains its own network: use --backbone ddahnet"):
        _setup_args("--method", "ddah", "--backbone", "dfhnet")
    with pytest.raises(UserInputError, match="only --method ddah trains it, not dcdh"):
        _setup_args("--method", "dcdh", "--backbone", "ddahnet")


def _ddp_setup():
    """Network (BatchNorm statistics fixed, so halves of a batch see the global batch's
    normalisation; the network stays in training mode, with both branches), method, optimizers,
    a global batch, and a margin for which the global batch's hinge is active while one half's
    alone is not: a per-process decision would scale the two processes' gradients differently."""
    model, method, images, labels = _setup(0.0, seed=3)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    with torch.no_grad():
        gaps = []
        for half in (slice(0, 6), slice(6, 12)):
            t = method(model(images[half]), labels[half])
            gaps.append((t["softmax_a"] - t["softmax_b"] + method.weight_quant * (t["quant_a"] - t["quant_b"])).item())
    low, mean = min(gaps), sum(gaps) / 2
    method.margin = -(mean + low) / 2          # margin + mean > 0 > margin + low
    opt = method.build_optimizer(model, dict(resolve_recipe("ddahnet", DDAH.recipe, optimizer="sgd"), lr=0.05))
    return model, method, opt, images, labels


def _ddp_worker(rank, world, port, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from utils.distributed import all_reduce_sum_
        model, method, opt, images, labels = _ddp_setup()
        method.all_reduce = all_reduce_sum_
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * 6, rank * 6 + 6)
        training_step(ddp, method, opt, images[part], labels[part])
        torch.save({k: v.detach().clone() for k, v in list(model.named_parameters()) + list(method.named_parameters())},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_step_equals_the_single_process_step(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    model, method, opt, images, labels = _ddp_setup()
    training_step(model, method, opt, images, labels)
    assert method.attention_grad_scale.item() == 2.0
    want = {k: v.detach() for k, v in list(model.named_parameters()) + list(method.named_parameters())}
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {k}")
