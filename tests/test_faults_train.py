"""--resume into another --save name, and resuming on other data: the model file named is the
model, or one line, exit 2."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dcdh_train
from engine.state import data_mismatch
from utils.checkpoint import save_checkpoint


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def train(capsys, root, ckdir, epochs, *extra, dataset="ddh"):
    """dcdh_train.main in-process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    args = dcdh_train.get_args_parser().parse_args(
        ["--dataset", dataset, "--data-root", str(root), "--len", "12", "--epochs", str(epochs), "--bs", "32",
         "--checkpoint-dir", str(ckdir), "--eval-every", "0", "--device", "cpu", *map(str, extra)])
    try:
        dcdh_train.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished(synthetic_root, tmp_path_factory):
    """A 2-epoch DCDH run on the synthetic set: folder with other.tar and other.last.tar."""
    out = tmp_path_factory.mktemp("finished")
    args = dcdh_train.get_args_parser().parse_args(
        ["--dataset", "ddh", "--data-root", synthetic_root, "--len", "12", "--epochs", "2", "--bs", "32",
         "--checkpoint-dir", str(out), "--eval-every", "0", "--device", "cpu", "--save", "other.tar"])
    dcdh_train.main(args)
    return out


def same_model(a, b):
    return all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"]) and \
        all(torch.equal(a["centers"][k], b["centers"][k]) for k in a["centers"])


def test_finished_run_resumed_under_a_new_name_writes_the_model_there(finished, synthetic_root, tmp_path, capsys):
    last = load(finished / "other.last.tar")
    best_file = finished / ("other.last.tar" if last["best_epoch"] == 1 else "other.tar")
    code, out, _ = train(capsys, synthetic_root, tmp_path, 2, "--save", "new.tar",
                         "--resume", finished / "other.last.tar")
    assert code == 0
    new = tmp_path / "new.tar"
    assert f"copied from {best_file} to {new}" in out and f"model in {new}" in out
    assert new.read_bytes() == best_file.read_bytes()  # the best model, unchanged
    assert sorted(os.listdir(finished)) == ["other.last.tar", "other.log", "other.tar"]  # the old run untouched


def test_best_model_in_the_sibling_of_the_last_file_is_the_one_copied(finished, synthetic_root, tmp_path, capsys):
    # a run whose best epoch (1) is not its last (2): the model is in x.tar, not in x.last.tar
    state = load(finished / "other.last.tar")
    best = {k: v.clone() for k, v in state["backbone"].items()}
    key = next(k for k, v in best.items() if v.is_floating_point())
    best[key] += 1.0  # tell the two files apart
    save_checkpoint(dict(state, best_epoch=0, best_loss=0.5), str(tmp_path / "x.last.tar"))
    save_checkpoint(dict(state, backbone=best, epoch=1, best_epoch=0, best_loss=0.5), str(tmp_path / "x.tar"))
    code, out, _ = train(capsys, synthetic_root, tmp_path, 2, "--save", "new.tar", "--resume", tmp_path / "x.last.tar")
    assert code == 0 and f"model in {tmp_path / 'new.tar'}" in out
    assert (tmp_path / "new.tar").read_bytes() == (tmp_path / "x.tar").read_bytes()


def test_finished_run_without_its_best_file_is_one_line_exit_2(finished, synthetic_root, tmp_path, capsys):
    state = load(finished / "other.last.tar")
    save_checkpoint(dict(state, best_epoch=0, best_loss=0.5), str(tmp_path / "x.last.tar"))  # x.tar is gone
    code, out, err = train(capsys, synthetic_root, tmp_path, 2, "--save", "new.tar",
                           "--resume", tmp_path / "x.last.tar")
    assert code == 2
    assert err.strip() == (f"dcdh_train.py: error: --resume {tmp_path / 'x.last.tar'}: training had already ended "
                           f"(all 2 epochs are done), and no file holds its best model (epoch 1; not "
                           f"{tmp_path / 'new.tar'}); nothing was written")
    assert not (tmp_path / "new.tar").exists() and "model in" not in out


def test_resume_that_trains_on_puts_the_best_model_in_the_new_name_first(finished, synthetic_root, tmp_path,
                                                                         capsys, monkeypatch):
    # the next epoch does not improve the loss: new.tar must still be the model
    real = dcdh_train.train_one_epoch

    def worse(*args, **kwargs):
        return dict(real(*args, **kwargs), loss=1e9)
    monkeypatch.setattr(dcdh_train, "train_one_epoch", worse)
    code, out, _ = train(capsys, synthetic_root, tmp_path, 3, "--save", "new.tar",
                         "--resume", finished / "other.last.tar")
    assert code == 0 and "[epoch 3/3]" in out and f"model saved as {tmp_path / 'new.tar'}" in out
    best = load(finished / ("other.last.tar" if load(finished / "other.last.tar")["best_epoch"] == 1
                            else "other.tar"))
    assert same_model(load(tmp_path / "new.tar"), best)
    assert load(tmp_path / "new.last.tar")["epoch"] == 3


def test_ddh_checkpoint_resumed_on_an_image_folder_is_refused(finished, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 1)):
        for c in range(8):
            os.makedirs(tmp_path / "faces" / split / f"id{c}")
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "faces" / split / f"id{c}" / f"{i}.png")
    resume = finished / "other.last.tar"
    code, _, err = train(capsys, tmp_path / "faces", tmp_path / "ck", 3, "--backbone", "dfhnet", "--image-size", "32",
                         "--save", "new.tar", "--resume", resume, dataset="folder")
    assert code == 2
    assert err.strip() == (f"dcdh_train.py: error: --resume {resume}: it was trained on DDH-layout pickles "
                           "(--dataset ddh), this run reads an image folder (--dataset folder); resume on the "
                           "data it was trained on or start a new run")
    assert not os.path.exists(tmp_path / "ck" / "new.tar")


def test_data_mismatch_names_other_identities():
    run = {"dataset": "ddh", "label_map": list(range(8))}
    assert data_mismatch(run, dict(run)) is None
    assert data_mismatch(run, {"dataset": "facescrub", "label_map": list(range(8))}) is None  # same layout
    assert data_mismatch({"dataset": "ddh"}, {"dataset": "ddh", "label_map": [5]}) is None  # older file: no map
    assert data_mismatch(run, {"dataset": "ddh", "label_map": list(range(1, 9))}) == \
        "it was trained on other identities (1 of its 8 are not among this run's)"
    assert data_mismatch(run, {"dataset": "ddh", "label_map": list(range(7, -1, -1))}) == \
        "its identities are this run's in another order (class indices would change meaning)"
    assert data_mismatch({"dataset": "vggface2"}, {"dataset": "youtube", "label_map": []}).startswith(
        "it was trained on an image folder (--dataset vggface2), this run reads DDH-layout pickles")
