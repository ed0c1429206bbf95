"""Every method of the registry, through the one training loop: the contract, a whole step with
no host read, kill -9 then --resume continuing with identical state, and the checkpoint through
evaluation.py and search.py."""
import inspect
import json
import os
import pkgutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import methods
import methods.base
from conftest import ROOT, run_script
from engine.loop import training_step
from engine.recipes import RECIPE_KEYS, build_optimizer, resolve_recipe
from host_reads import HostReads
from methods import FEATURES, METHODS, Hyper, build_method, parse_method_args
from models import build_model

NAMES = sorted(METHODS)


def test_every_method_module_is_registered_once():
    modules = {m.name for m in pkgutil.iter_modules(methods.__path__)} - {"base"}
    registered = {inspect.getmodule(cls).__name__.split(".")[-1] for cls in METHODS.values()}
    assert modules == registered
    assert {"dcdh", "dcwh", "dpsh", "dtsh", "dsdh"} <= set(METHODS)


@pytest.mark.parametrize("name", NAMES)
def test_declarations(name):
    cls = METHODS[name]
    assert cls.name == name and issubclass(cls, methods.HashingMethod)
    doc = inspect.getmodule(cls).__doc__
    assert doc and len(doc) > 400  # the paper, the loss and the differences from it
    assert all(isinstance(h, Hyper) for h in cls.hyperparameters.values())
    assert set(cls.recipe) <= set(RECIPE_KEYS) and set(cls.unsupported) <= set(FEATURES)
    for key, spec in cls.hyperparameters.items():  # every default passes its own check
        assert spec.parse(key, spec.default) == spec.default


def test_method_args_errors():
    assert parse_method_args("dcdh", ["sigma=0.5", "authors_push_constant=true"]) == {
        "sigma": 0.5, "authors_push_constant": True}
    for items, message in ((["sigma"], "expected key=value"), (["gamma=1"], "no hyperparameter 'gamma'"),
                           (["sigma=abc"], "expected a number"), (["sigma=-1"], "must be > 0"),
                           (["sigma=1", "sigma=2"], "given twice"), (["eta=nan"], "finite")):
        with pytest.raises(ValueError, match=message):
            parse_method_args("dcdh", items)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_method_args("nope", [])


@pytest.mark.parametrize("name,key", [("dcwh", "update_every"), ("csq", "seed"), ("orthohash", "seed"),
                                      ("dsdh", "dcc_iter"), ("dtsh", "positives")])
def test_integer_hyperparameters_have_a_maximum(name, key):
    """An integer hyperparameter without a maximum of its own stops at 2**31-1 (larger values
    overflowed the C integers they reach: a seed, an epoch count) with a clear message."""
    assert parse_method_args(name, [f"{key}={2 ** 31 - 1}"]) == {key: 2 ** 31 - 1}
    with pytest.raises(ValueError, match=rf"^{key}={10 ** 30}: must be <= 2147483647$"):
        parse_method_args(name, [f"{key}={10 ** 30}"])
    with pytest.raises(ValueError, match="must be <= 2147483647"):
        METHODS[name].hyperparameters[key].parse(key, 2 ** 31)   # typed values (experiment files) too


def test_huge_integer_hyperparameter_on_the_command_line_is_one_line_exit_2(tmp_path):
    r = run_script("dcdh_train.py", "--method", "dcwh", "--method-args", f"update_every={10 ** 30}",
                   "--checkpoint-dir", str(tmp_path / "ck"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert f"--method-args: update_every={10 ** 30}: must be <= 2147483647" in r.stderr
    assert not (tmp_path / "ck").exists()


def test_recipe_resolution():
    r = resolve_recipe("dfhnet")
    assert (r["optimizer"], r["lr"], r["epochs"], r["patience"]) == ("adam", 0.005, 600, 150)
    r = resolve_recipe("dfhnet", {"optimizer": "adam", "epochs": 200, "patience": 50}, epochs=30)
    assert (r["epochs"], r["patience"]) == (30, 50)   # a flag wins; the method's patience stays
    r = resolve_recipe("dfhnet", {"weight_decay": 0.0, "epochs": 200}, optimizer="sgd")
    assert (r["optimizer"], r["weight_decay"], r["epochs"], r["patience"]) == ("sgd", 5e-4, 200, 50)
    assert resolve_recipe("spherenet20", patience=3)["patience"] == 3


def _batch(n=24, classes=6, train=48):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(train) % classes
    index = torch.randperm(train, generator=g)[:n]
    images = torch.randn(n, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return images, labels[index], index, labels


@pytest.mark.parametrize("name", NAMES)
def test_whole_training_step_reads_nothing_back(monkeypatch, name):
    monkeypatch.setattr(methods.base, "CHECK_VALUES", False)  # CPU-only range checks are host reads
    torch.manual_seed(0)
    images, labels, index, train_labels = _batch()
    backbone = METHODS[name].requires_backbone or "dfhnet"  # DDAH trains its own two-branch network
    model = build_model(backbone, 12).to(memory_format=torch.channels_last)
    method = build_method(name, 6, 12, train_labels=train_labels)
    opt = build_optimizer("adam", model, method, 0.005)
    training_step(model, method, opt, images, labels, index)   # optimizer state made outside the check
    with HostReads() as seen:
        for amp in (False, True):
            terms = training_step(model, method, opt, images, labels, index, amp=amp)
    assert seen.found == []
    with torch.no_grad():  # once per epoch; it may read back (DSDH's coordinate descent stops early)
        method.epoch_end()
    assert "total" in terms and all(t.dim() == 0 for t in terms.values())
    assert torch.isfinite(terms["total"])


def _train_cmd(name, root, ckdir, epochs, *extra):
    return [sys.executable, "dcdh_train.py", "--method", name, "--dataset", "ddh", "--data-root", root,
            "--len", "12", "--epochs", str(epochs), "--patience", "20", "--bs", "32", "--save", "m.tar",
            "--checkpoint-dir", str(ckdir), "--eval-every", "0", "--device", "cpu", *extra]


def _train_in_process(cmd):
    """Run dcdh_train.main with the flags of ``cmd`` in this process; returns its log text."""
    import dcdh_train
    args = dcdh_train.get_args_parser().parse_args(cmd[2:])
    dcdh_train.main(args)
    with open(os.path.join(args.checkpoint_dir, "m.log"), encoding="utf-8") as f:
        return f.read()


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a, b):
    for part in ("backbone", "centers"):
        assert list(a[part]) == list(b[part])
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=0, msg=f"{part}.{key}")


class _Stopped(Exception):
    """Raised in place of a kill, right after a checkpoint was written."""


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dcdh"])
def test_stopped_then_resume_continues_identically(synthetic_root, tmp_path, monkeypatch, name):
    """Every method: a run of 2 epochs stopped right after its first epoch's checkpoints were written (in this
    process, as a kill would leave it; the real kill -9 is dcdh's test below), then resumed, ends
    bit-identical to a run that was never stopped (method state, random streams, optimizer)."""
    import dcdh_train
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _train_in_process(_train_cmd(name, synthetic_root, straight, 2))
    real_save = dcdh_train.save_checkpoint

    def save_then_stop(state, path):
        real_save(state, path)
        if path.endswith(".last.tar") and state["epoch"] == 1:
            raise _Stopped
    monkeypatch.setattr(dcdh_train, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stopped):
        _train_in_process(_train_cmd(name, synthetic_root, stopped, 2))
    monkeypatch.undo()
    assert _load(stopped / "m.last.tar")["epoch"] == 1
    out = _train_in_process(_train_cmd(name, synthetic_root, stopped, 2, "--resume"))
    assert "1 epochs done" in out
    resumed, reference = _load(stopped / "m.last.tar"), _load(straight / "m.last.tar")
    assert resumed["epoch"] == reference["epoch"] == 2
    assert resumed["config"]["method"] == name and resumed["config"]["method_args"] == reference["config"]["method_args"]
    _assert_same_state(resumed, reference)


@pytest.mark.parametrize("name", ["dcdh"])
def test_kill_9_then_resume_continues_identically(synthetic_root, tmp_path, name):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    straight = tmp_path / "straight"
    _train_in_process(_train_cmd(name, synthetic_root, straight, 3))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(name, synthetic_root, killed, 3), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:   # kill -9 once the second epoch's checkpoints are written
        line = proc.stdout.readline()
        if line.startswith("[epoch 2/3]") or not line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _load(killed / "m.last.tar")["epoch"]
    assert done in (1, 2)  # the kill can land while the second epoch's files are written
    out = _train_in_process(_train_cmd(name, synthetic_root, killed, 3, "--resume"))
    assert f"{done} epochs done" in out
    resumed, reference = _load(killed / "m.last.tar"), _load(straight / "m.last.tar")
    assert resumed["epoch"] == reference["epoch"] == 3
    assert resumed["config"]["method"] == name and resumed["config"]["method_args"] == reference["config"]["method_args"]
    _assert_same_state(resumed, reference)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "dcdh"])
def test_checkpoint_through_evaluation_and_search(synthetic_root, tmp_path, name):
    import evaluation
    import search
    from data import build_datasets, make_loader
    from engine.evaluate import encode, evaluate
    _train_in_process(_train_cmd(name, synthetic_root, tmp_path, 1))
    ck = str(tmp_path / "m.tar")
    js = tmp_path / "m.json"
    r = run_script("evaluation.py", "--load", ck, "--dataset", "ddh", "--data-root", synthetic_root,
                   "--device", "cpu", "--json", str(js))
    assert r.returncode == 0, r.stderr
    reported = json.loads(js.read_text())
    model, ckpt, config = evaluation.load_hashing_model(ck, torch.device("cpu"))
    assert config["method"] == name
    encoder = evaluation.load_encoder(ckpt, config, ck, torch.device("cpu"))   # the method's encode step
    database, queries, _ = build_datasets("ddh", synthetic_root)
    loaders = make_loader(queries, 64), make_loader(database, 64)
    expected = evaluate(model, *loaders, torch.device("cpu"), encoder=encoder)
    assert reported["map"] == pytest.approx(expected["map"], abs=1e-9)
    assert reported["precision_radius_2"] == pytest.approx(expected["precision_radius_2"], abs=1e-9)

    meta = search.main(search.get_args_parser().parse_args(
        ["index", "--load", ck, "--gallery", synthetic_root, "--out", str(tmp_path / "ix"), "--device", "cpu"]))
    assert meta["bits"] == 12 and len(meta["paths"]) == len(database)
    import faiss
    import numpy as np
    index = faiss.read_index_binary(os.path.join(tmp_path / "ix", search.INDEX_FILE))
    packed = faiss.vector_to_array(index.xb).reshape(index.ntotal, -1)
    stored = np.unpackbits(packed, axis=1, bitorder="little").astype(np.float32)[:, :12] * 2 - 1
    codes, _ = encode(model, loaders[1], torch.device("cpu"), encoder)
    np.testing.assert_array_equal(stored, codes.numpy())
    if name == "classifier":   # its codes are codewords of classes, one code per class
        words = {tuple(w) for w in ckpt["centers"]["codewords"].tolist()}
        assert {tuple(c) for c in codes.tolist()} <= words
