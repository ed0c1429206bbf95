"""Faults during training: kill -9 at any moment, NaN losses; nothing good is lost."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dcdh_train
from conftest import ROOT


def train_cmd(root, ckdir, epochs, *extra):
    return [sys.executable, "dcdh_train.py", "--dataset", "ddh", "--data-root", root, "--len", "12",
            "--epochs", str(epochs), "--bs", "32", "--save", "m.tar", "--checkpoint-dir", str(ckdir),
            "--eval-every", "0", "--device", "cpu", *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_kill_9_keeps_checkpoints_and_resume_continues(synthetic_root, tmp_path, delay):
    proc = subprocess.Popen(train_cmd(synthetic_root, tmp_path, 200), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saved = 0
    deadline = time.time() + 120
    while saved < 3 and time.time() < deadline:   # wait until some epochs were saved
        line = proc.stdout.readline()
        saved += line.startswith("[epoch ")
    time.sleep(delay)                              # then kill at some moment of the next epochs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saved == 3
    best, last = load(tmp_path / "m.tar"), load(tmp_path / "m.last.tar")   # both intact
    done = last["epoch"]
    assert done >= 2                                  # the kill may have hit the 3rd epoch's saving
    # the best file is written first: it is the last file's best, or one epoch newer
    assert best["epoch"] in (last["best_epoch"] + 1, done + 1) and best["best_loss"] <= last["best_loss"]

    r = subprocess.run(train_cmd(synthetic_root, tmp_path, done + 1, "--resume"), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{done} epochs done" in r.stdout and f"[epoch {done + 1}/{done + 1}]" in r.stdout
    assert f"[epoch {done}/" not in r.stdout
    resumed = load(tmp_path / "m.last.tar")
    assert resumed["epoch"] == done + 1
    assert resumed["best_loss"] <= best["best_loss"]
    # the optimizer state went on from the killed run (Adam's step count grew by one epoch)
    steps = lambda ck: max(int(s["step"]) for s in ck["optimizer"]["state"].values())
    assert steps(resumed) == steps(last) + 4
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synthetic_root, tmp_path, monkeypatch, capsys):
    real = dcdh_train.train_one_epoch
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise dcdh_train.NonFiniteLoss("the loss became nan at epoch 2, batch 3")
        return real(*args, **kwargs)
    monkeypatch.setattr(dcdh_train, "train_one_epoch", flaky)
    args = dcdh_train.get_args_parser().parse_args(
        ["--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "5", "--bs", "32",
         "--save", "m.tar", "--checkpoint-dir", str(tmp_path), "--eval-every", "0", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        dcdh_train.main(args)
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "epoch 2, batch 3" in out and "(epoch 1) is kept" in out
    assert load(tmp_path / "m.tar")["epoch"] == 1


def test_nan_from_divergence_names_epoch_and_batch(synthetic_root, tmp_path):
    r = subprocess.run(train_cmd(synthetic_root, tmp_path, 2, "--lr", "1e10"), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "the loss became nan at epoch 1, batch 2" in r.stdout
