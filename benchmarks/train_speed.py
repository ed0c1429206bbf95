"""Training throughput: this project's trainer against a loop in the authors' style.

    python benchmarks/train_speed.py [--device cpu|cuda] [--steps 10] [--bs 256] [--amp]
                                     [--compile MODE] [--threads N] [--thread-scaling]
    python benchmarks/train_speed.py --method dcwh dpsh csq [--images 4992 --classes 299] [--amp]

Both train the same DFHNet (48 bits) with the DCDH loss on the same synthetic FaceScrub-size
data (67,177 images of 3x32x32, 530 identities), in the same process, alternating A/B rounds:

* baseline (the authors' loop): per-sample Dataset of float64 HWC arrays + ToTensor,
  DataLoader(shuffle=True), fp32, W through ``inverse(Y^T Y + I)``, loss with their exp/sum form;
* project: ``data.DeviceBatches`` (uint8 split on the device, normalised per batch),
  channels_last, and ``engine.loop.training_step`` (bf16 autocast on CUDA unless --no-amp;
  ``--amp`` turns it on for the CPU too; ``--compile MODE`` adds torch.compile, whose
  compilation is done in an untimed warm-up).

Prints images/s of each (median over rounds) and the ratio project / baseline. With
``--thread-scaling`` it also times the project's trainer with one CPU thread, to show how much
the second core adds.

``--method NAME ...`` compares methods instead: the project's trainer with DCDH (the baseline)
and with each named method (``methods.METHODS``; its default network, DFHNet unless the method
requires its own, and its optimizer recipe), on the same data in the same process, alternating
rounds. A method's ``epoch_end`` hook (DSDH's code update, DCWH's center update) runs once per
epoch; it is timed apart and charged to the steps of one epoch of ``--images`` images, so the
"per epoch" figure is what a training run sees. The per-step time is split into the network
(forward and backward of a plain squared loss on its codes, stepped by the run's optimizer) and
the method's share of a step (the rest; ``epoch_end`` not included). ``--compile``, ``--no-baseline``
and ``--thread-scaling`` do not apply to this mode.
"""
import argparse
import os
import statistics
import sys
import time


def _authors_style(num_classes, bits, device):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import Dataset
    from torchvision import transforms

    class PerSample(Dataset):  # their MyDataset: float64 HWC rows, ToTensor per item
        def __init__(self, x, y):
            self.x, self.y = x, y.reshape(-1, 1)
            self.t = transforms.ToTensor()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.t(self.x[i]).type(torch.FloatTensor), torch.from_numpy(self.y[i])

    def loss_fn(x, labels, centers, sigma=0.25, inner=0.1):  # their DualClasswiseLoss
        b, c = x.size(0), centers.size(0)
        d = (x.pow(2).sum(1, keepdim=True).expand(b, c) + centers.pow(2).sum(1, keepdim=True).expand(c, b).t())
        d = d.addmm(x, centers.t(), beta=1, alpha=-2)
        p = torch.exp(-0.5 * sigma * d) / (torch.exp(-0.5 * sigma * d).sum(1, keepdim=True) + 1e-6)
        mask = labels.view(-1, 1).eq(torch.arange(c, device=x.device))
        pull = -(torch.log(p + 1e-6) * mask.float()).sum() / b
        cn = F.normalize(centers, dim=1)
        theta = 0.5 * centers.size(1) * cn.mm(cn.t())
        theta = theta.masked_fill(torch.eye(c, dtype=torch.bool, device=x.device), 0)
        push = (torch.log(1 + torch.exp(-theta.abs())) + theta.clamp_min(0)).sum() / (c * (c - 1))
        return pull + inner * push

    def step(model, centers, opt, imgs, labels, eta=0.01):
        imgs, labels = imgs.to(device), labels.to(device).view(-1)
        opt.zero_grad()
        h = model(imgs)
        loss = loss_fn(h, labels, centers)
        y = torch.zeros(len(labels), num_classes, device=device).scatter_(1, labels.view(-1, 1), 1)
        w = torch.inverse(y.t() @ y + torch.eye(num_classes, device=device)) @ (y.t() @ torch.sign(h))
        b = torch.sign(y @ w + eta * h)
        loss = loss + eta * (h - b).pow(2).sum() / len(imgs)
        loss.backward()
        opt.step()
        return loss.detach()

    return PerSample, step, np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--images", type=int, default=67177)
    p.add_argument("--classes", type=int, default=530)
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--no-amp", action="store_true", help="fp32 for the project's trainer on CUDA too")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the project's trainer on the CPU too")
    p.add_argument("--compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                   help="also time the project's trainer with the network under this torch.compile mode")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--no-baseline", action="store_true", help="time the project's trainer only")
    p.add_argument("--thread-scaling", action="store_true",
                   help="also time the project's trainer with 1 CPU thread")
    p.add_argument("--method", nargs="+", default=None, metavar="NAME",
                   help="compare these methods with DCDH (images/s of the project's trainer, same data)")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np
    import torch

    from data.ddh import DDHSplit
    from data.device_loader import DeviceBatches
    from engine.loop import training_step
    from engine.recipes import build_optimizer
    from methods.dcdh import DCDH
    from models import build_model
    from utils.device import choose_precision, compile_model, cpu_capability, cpu_model, resolve_device
    from utils.errors import UserInputError

    try:
        device = resolve_device(args.device)
    except UserInputError as e:
        p.error(str(e))

    if args.threads:
        torch.set_num_threads(args.threads)

    amp = (device.type == "cuda" and not args.no_amp) or args.amp
    if amp:  # bf16 asked on a CPU without native bf16: say that it is emulated (and slow) there
        note = choose_precision("on", device)[2]
        if note:
            print(note.replace("--amp on", "--amp").replace("--amp auto picks fp32 here",
                                                               "leave out --amp for fp32"), flush=True)
    if args.method:
        from methods import METHODS
        if args.images < args.bs:
            p.error(f"--images {args.images}: expected at least --bs ({args.bs}) images")
        unknown = [m for m in args.method if m not in METHODS]
        if unknown:
            p.error(f"--method {' '.join(unknown)}: expected names of {', '.join(METHODS)}")
        return compare_methods(args, device, amp)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (args.images, 3072), dtype=np.uint8)
    labels = rng.integers(0, args.classes, args.images)
    print(f"CPU {cpu_model()}, capability {cpu_capability()}" if device.type == "cpu"
          else f"GPU {torch.cuda.get_device_name(device)}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.images} images, {args.classes} classes, {args.bits} bits, batch {args.bs}, amp {amp}, "
          f"compile {args.compile}, load average {os.getloadavg()[0]:.2f}")

    PerSample, authors_step, _ = _authors_style(args.classes, args.bits, device)
    if not args.no_baseline:  # baseline data: the authors' float64, normalised once, HWC per sample
        x = raw.astype(np.float64)
        x = np.clip((x - x.mean()) / (x.std() + 1e-5) * 0.1, -1, 1).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        base_loader = torch.utils.data.DataLoader(PerSample(x, labels), batch_size=args.bs, shuffle=True)
    # project data: uint8 split on the device
    proj_loader = DeviceBatches(DDHSplit.from_arrays(raw, labels), args.bs, device, shuffle=True, drop_last=True)

    def fresh():
        torch.manual_seed(0)
        model = build_model("dfhnet", args.bits).to(device)
        crit = DCDH(args.classes, args.bits).to(device)
        return model, crit, build_optimizer("adam", model, crit, 0.005)

    def batches(loader):  # endless: a new shuffled pass when one runs out
        while True:
            yield from loader

    def run_baseline(n):
        model, crit, opt = fresh()
        it = batches(base_loader)
        authors_step(model, crit.centers, opt, *next(it))  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(n):
            authors_step(model, crit.centers, opt, *next(it))
        sync()
        return n * args.bs / (time.perf_counter() - t)

    compiled = {}  # compile once (the first warm-up), then reuse the compiled network's code

    def run_project(n, mode="off"):
        model, crit, opt = fresh()
        model = model.to(memory_format=torch.channels_last)
        train_net = model
        if mode != "off":
            if "net" not in compiled:
                compiled["net"] = model
                compiled["fn"] = compile_model(model, mode, device)
            compiled["net"].load_state_dict(model.state_dict())
            model, train_net = compiled["net"], compiled["fn"]
            opt = build_optimizer("adam", model, crit, 0.005)
        it = batches(proj_loader)
        for _ in range(1 if mode == "off" else 3):  # warm-up (and compilation)
            imgs, y = next(it)
            training_step(train_net, crit, opt, imgs.contiguous(memory_format=torch.channels_last), y, amp=amp)
        sync()
        t = time.perf_counter()
        for _ in range(n):
            imgs, y = next(it)
            imgs = imgs.contiguous(memory_format=torch.channels_last)
            training_step(train_net, crit, opt, imgs, y, amp=amp)
        sync()
        return n * args.bs / (time.perf_counter() - t)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # A/B rounds in one process: the authors'-style loop, the project's trainer, and with
    # --compile the project's trainer compiled
    names = ["authors-style"] * (not args.no_baseline) + ["project"]
    names += [f"project + compile {args.compile}"] * (args.compile != "off")
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            if name == "authors-style":
                results[name].append(run_baseline(args.steps))
            else:
                results[name].append(run_project(args.steps, "off" if name == "project" else args.compile))
        print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1]:.1f} images/s" for name, v in results.items()))
    med = {name: statistics.median(v) for name, v in results.items()}
    line = "median: " + ", ".join(f"{name} {v:.1f} images/s" for name, v in med.items())
    if "authors-style" in med:
        line += f", ratio {med['project'] / med['authors-style']:.2f}x"
        if args.compile != "off":
            line += f" (compiled: {med[names[-1]] / med['authors-style']:.2f}x)"
    if args.compile != "off":
        line += f", compiled / eager {med[names[-1]] / med['project']:.2f}x"
    print(line)
    if args.thread_scaling:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        one = statistics.median(run_project(args.steps) for _ in range(args.rounds))
        torch.set_num_threads(threads)
        print(f"project (eager) with 1 CPU thread: {one:.1f} images/s; with {threads}: {med['project']:.1f} "
              f"images/s ({med['project'] / one:.2f}x)")


def compare_methods(args, device, amp):
    """``--method``: images/s of the project's trainer for DCDH and each named method (see the
    module docstring). Prints one line per round and a table of medians with ratios to DCDH."""
    import numpy as np
    import torch

    from data.ddh import DDHSplit
    from data.device_loader import DeviceBatches
    from engine.loop import training_step
    from engine.recipes import build_optimizer, resolve_recipe
    from methods import METHODS, HashingMethod, build_method
    from models import build_model
    from utils.device import cpu_capability, cpu_model

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (args.images, 3072), dtype=np.uint8)
    labels = rng.integers(0, args.classes, args.images)
    split = DDHSplit.from_arrays(raw, labels)
    loader = DeviceBatches(split, args.bs, device, shuffle=True, drop_last=True, with_index=True)
    steps_per_epoch = args.images // args.bs
    names = ["dcdh"] + [m for m in args.method if m != "dcdh"]
    print(f"CPU {cpu_model()}, capability {cpu_capability()}" if device.type == "cpu"
          else f"GPU {torch.cuda.get_device_name(device)}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.images} images, {args.classes} classes, {args.bits} bits, batch {args.bs}, amp {amp}, "
          f"load average {os.getloadavg()[0]:.2f}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def batches():
        while True:
            yield from loader

    def one(name):
        """(images/s of the steps, seconds of one epoch_end, network-only images/s)."""
        torch.manual_seed(0)
        backbone = METHODS[name].requires_backbone or "dfhnet"
        model = build_model(backbone, args.bits).to(device, memory_format=torch.channels_last)
        method = build_method(name, args.classes, args.bits, train_labels=split.labels).to(device)
        recipe = resolve_recipe(backbone, METHODS[name].recipe)
        opt = build_optimizer(recipe, model, method)
        model.train()
        method.train()
        it = batches()

        def step():
            imgs, y, idx = next(it)
            training_step(model, method, opt, imgs.contiguous(memory_format=torch.channels_last), y, idx, amp=amp)

        def seconds_per_step(fn):  # one untimed warm-up, then the mean over --steps
            fn()
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            return (time.perf_counter() - t) / args.steps

        step_s = seconds_per_step(step)
        hooks = []
        for _ in range(2):  # the second call is timed: the first may pay one-time setup
            t = time.perf_counter()
            with torch.no_grad():
                method.epoch_end()
            sync()
            hooks.append(time.perf_counter() - t)
        hook_s = hooks[-1]
        # the network alone: forward/backward of a plain loss on its codes, stepped by the same
        # optimizer the run uses (the recipe's, over the network only; a method with its own
        # optimisation hook, DDAH's two optimizers, gets the shared recipe's instead)
        own_optimizer = type(method).build_optimizer is not HashingMethod.build_optimizer
        net_opt = build_optimizer(resolve_recipe(backbone) if own_optimizer else recipe, model, torch.nn.Module())

        def net_step():
            imgs, y, idx = next(it)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                codes = model(imgs.contiguous(memory_format=torch.channels_last))
            net_opt.zero_grad(set_to_none=True)
            codes.float().pow(2).mean().backward()
            net_opt.step()

        net_s = seconds_per_step(net_step)
        return args.bs / step_s, hook_s, args.bs / net_s, backbone

    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            results[name].append(one(name))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1][0]:.0f} images/s" for n, v in results.items()), flush=True)
    base = None
    print(f"{'method':10s} {'network':8s} {'steps':>12s} {'epoch_end':>10s} {'per epoch':>12s} {'vs dcdh':>8s} "
          f"{'network alone':>14s} {'share of a step outside the network':>36s}")
    for name, rows in results.items():
        ips = statistics.median(r[0] for r in rows)
        hook = statistics.median(r[1] for r in rows)
        net = statistics.median(r[2] for r in rows)
        per_epoch = steps_per_epoch * args.bs / (steps_per_epoch * args.bs / ips + hook)
        base = base or per_epoch
        share = 1 - ips / net if net > 0 else float("nan")  # share of a step's time outside the network
        print(f"{name:10s} {rows[0][3]:8s} {ips:9.0f} i/s {hook:9.3f}s {per_epoch:8.0f} i/s {per_epoch / base:7.2f}x "
              f"{net:10.0f} i/s {100 * share:35.0f}%")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from utils.errors import quiet_broken_pipe
    quiet_broken_pipe(main)()  # '... | head' ends quietly
