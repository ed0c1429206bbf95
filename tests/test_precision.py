"""Precision per machine (issue 21): ``--amp auto`` is bf16 on GPUs of compute capability 8.0 or
newer and on CPUs with native bf16 (AMX or AVX512-BF16), fp32 elsewhere; ``--amp on`` on a CPU without it runs bf16 with a note.

The CPU's and the GPU's capabilities are mocked, so every case runs on any machine."""
import os

import pytest
import torch

import utils.device as device_mod
from conftest import ROOT  # noqa: F401  (puts the project on sys.path)
from utils.device import choose_precision, cpu_capability

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu_kind(monkeypatch):
    """Set what torch reports of this CPU: ``cpu_kind(capability, amx, avx512_bf16)``."""
    def set_kind(capability, amx=False, avx512_bf16=False):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(device_mod, "cpu_has_amx", lambda: amx)
        monkeypatch.setattr(device_mod, "cpu_has_avx512_bf16", lambda: avx512_bf16)
    return set_kind


@pytest.mark.parametrize("capability,amx,avx512_bf16,flag,expected", [
    ("AVX2", False, False, "auto", "fp32"),        # AMD EPYC Zen 3, most laptops: emulated bf16
    ("AVX512", False, False, "auto", "fp32"),      # AVX-512 without the BF16 extension
    ("AVX512", True, True, "auto", "bf16"),        # Sapphire Rapids: AMX
    ("AVX512", False, True, "auto", "bf16"),       # Cooper Lake / Zen 4: AVX512-BF16 only
    ("AVX2", False, False, "on", "bf16"),          # asked for: runs as asked
    ("AVX512", True, True, "off", "fp32"),
    ("DEFAULT", False, False, "off", "fp32"),
])
def test_cpu_precision_follows_the_capability(cpu_kind, capability, amx, avx512_bf16, flag, expected):
    cpu_kind(capability, amx, avx512_bf16)
    amp, precision, note = choose_precision(flag, CPU)
    assert (amp, precision) == (expected == "bf16", expected)
    native = amx or avx512_bf16
    if flag == "on" and not native:
        assert note.startswith("[note] ") and capability in note and "emulated" in note
    else:
        assert note is None


@pytest.fixture
def gpu_kind(monkeypatch):
    """Set what torch reports of the GPU: ``gpu_kind(name, (major, minor))``."""
    def set_kind(name, capability):
        props = type("Props", (), {"major": capability[0], "minor": capability[1], "name": name})()
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return set_kind


@pytest.mark.parametrize("name,capability", [("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA H100 80GB HBM3", (9, 0))])
def test_cuda_auto_is_bf16_on_ampere_and_newer_whatever_the_cpu(cpu_kind, gpu_kind, name, capability):
    cpu_kind("AVX2")
    gpu_kind(name, capability)
    assert choose_precision("auto", CUDA) == (True, "bf16", None)
    assert choose_precision("on", CUDA) == (True, "bf16", None)
    assert choose_precision("off", CUDA) == (False, "fp32", None)


@pytest.mark.parametrize("name,capability", [("Tesla V100-SXM2-16GB", (7, 0)), ("Tesla T4", (7, 5))])
def test_cuda_auto_is_fp32_before_ampere(cpu_kind, gpu_kind, name, capability):
    """bf16 is emulated on GPUs older than compute capability 8.0: auto keeps fp32, on says why it is slow."""
    cpu_kind("AVX512", amx=True)  # the CPU's bf16 has no say on a GPU
    gpu_kind(name, capability)
    assert choose_precision("auto", CUDA) == (False, "fp32", None)
    amp, precision, note = choose_precision("on", CUDA)
    assert (amp, precision) == (True, "bf16")
    assert note.startswith("[note] --amp on: this GPU (" + name) and f"{capability[0]}.{capability[1]}" in note
    assert "emulated" in note


def test_cuda_without_a_gpu_here_is_taken_as_native(cpu_kind, monkeypatch):
    """A grid planned on a machine without a GPU for a GPU machine: its cells count as bf16."""
    cpu_kind("AVX2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_precision("auto", CUDA) == (True, "bf16", None)


def test_a_method_without_autocast_gets_fp32(cpu_kind, gpu_kind):
    gpu_kind("NVIDIA H100 80GB HBM3", (9, 0))
    cpu_kind("AVX512", amx=True)
    assert choose_precision("auto", CPU, method_allows_amp=False) == (False, "fp32", None)
    assert choose_precision("auto", CUDA, method_allows_amp=False) == (False, "fp32", None)


def test_unknown_flag_is_refused():
    with pytest.raises(ValueError, match="--amp 'bf16'"):
        choose_precision("bf16", CPU)


def test_capability_string_names_the_bf16_units(cpu_kind):
    cpu_kind("AVX2")
    assert cpu_capability() == "AVX2"
    cpu_kind("AVX512", amx=True, avx512_bf16=True)
    assert cpu_capability() == "AVX512+AMX+AVX512_BF16"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A DDH-layout set of 2 identities x 8 training images: one batch of 16 (bf16 is emulated, and
    slow, on AVX2 CPUs)."""
    from data.synthetic import write_synthetic_ddh
    return write_synthetic_ddh(str(tmp_path_factory.mktemp("tiny")), identities=2, train_per_id=8,
                               test_per_id=2, seed=3)


def _train(tmp_path, synthetic_root, amp, name):
    import dcdh_train
    from utils.checkpoint import load_checkpoint
    args = dcdh_train.get_args_parser().parse_args(
        ["--dataset", "ddh", "--data-root", synthetic_root, "--len", "8", "--epochs", "1", "--bs", "16",
         "--eval-every", "0", "--device", "cpu", "--amp", amp, "--checkpoint-dir", str(tmp_path),
         "--save", f"{name}.tar"])
    dcdh_train.main(args)
    with open(os.path.join(tmp_path, f"{name}.log"), encoding="utf-8") as f:
        log = f.read()
    return log, load_checkpoint(os.path.join(tmp_path, f"{name}.tar"))["config"]


@pytest.mark.parametrize("kind,amp,precision,note", [
    (("AVX2", False, False), "auto", "fp32", False),
    (("AVX2", False, False), "on", "bf16", True),
    (("AVX512", True, True), "auto", "bf16", False),
])
def test_trainer_logs_and_records_the_precision(tmp_path, tiny_root, cpu_kind, kind, amp, precision, note):
    """dcdh_train.py: the [config] line names the precision and capability, the [note] line appears
    exactly for bf16 asked on a CPU without native bf16, and the checkpoint records both."""
    cpu_kind(*kind)
    log, config = _train(tmp_path, tiny_root, amp, f"p_{amp}_{kind[0]}")
    config_line = next(line for line in log.splitlines() if "[config] dataset" in line)
    assert ("bf16 autocast" in config_line) == (precision == "bf16")
    assert f"CPU capability {cpu_capability()}" in config_line
    notes = [line for line in log.splitlines() if "[note] --amp on" in line]
    assert len(notes) == int(note)
    if note:
        assert "AVX2" in notes[0] and "emulated" in notes[0]
    assert config["precision"] == precision and config["amp"] == (precision == "bf16")
    assert config["cpu_capability"] == cpu_capability() and config["gpu_name"] is None


def test_no_experiment_file_forces_bf16():
    """Experiment files leave the precision to the machine (``amp = "auto"`` or unset)."""
    import glob
    import tomllib
    for path in glob.glob(os.path.join(ROOT, "experiments", "*.toml")):
        with open(path, "rb") as f:
            exp = tomllib.load(f)
        tables = [exp.get("train", {})] + list(exp.get("overrides", {}).values())
        assert all(t.get("amp", "auto") == "auto" for t in tables), path


def test_another_precision_never_invalidates_a_cells_progress(tmp_path):
    """A cell started with amp "on" continues (or stays finished) under "auto"; another epoch count
    is still refused."""
    import json
    import types

    from grid.runner import settings_conflict
    old = {"dataset": "ddh", "method": "dcdh", "bits": 12, "seed": 0, "amp": "on", "epochs": 28}
    with open(tmp_path / "cell.json", "w") as f:
        json.dump({"settings": old}, f)

    def cell(**change):
        return types.SimpleNamespace(dir=str(tmp_path), settings=dict(old, **change),
                                     path=lambda *p: os.path.join(tmp_path, *p))
    assert settings_conflict(cell(amp="auto"), "finished") is None
    del old["amp"]  # a cell.json without the key: auto
    with open(tmp_path / "cell.json", "w") as f:
        json.dump({"settings": old}, f)
    assert settings_conflict(cell(amp="on"), "partial") is None
    old["amp"] = "on"
    with open(tmp_path / "cell.json", "w") as f:
        json.dump({"settings": old}, f)
    assert "amp 'on' -> 'off'" in settings_conflict(cell(amp="off"), "partial")  # forced both ways: refused
    message = settings_conflict(cell(amp="auto", epochs=30), "partial")
    assert "epochs 28 -> 30" in message and "amp" not in message


def test_a_resume_in_another_precision_records_both(tmp_path, tiny_root, cpu_kind):
    """Epoch 1 in fp32 (AVX2, auto), epoch 2 resumed in bf16 (--amp on): the record says "fp32+bf16"."""
    import dcdh_train
    from utils.checkpoint import load_checkpoint
    cpu_kind("AVX2")
    argv = ["--dataset", "ddh", "--data-root", tiny_root, "--len", "8", "--bs", "16", "--eval-every", "0",
            "--device", "cpu", "--checkpoint-dir", str(tmp_path), "--save", "r.tar"]
    dcdh_train.main(dcdh_train.get_args_parser().parse_args(argv + ["--epochs", "1"]))
    assert load_checkpoint(str(tmp_path / "r.tar"))["config"]["precision"] == "fp32"
    dcdh_train.main(dcdh_train.get_args_parser().parse_args(argv + ["--epochs", "2", "--amp", "on", "--resume"]))
    assert load_checkpoint(str(tmp_path / "r.last.tar"))["config"]["precision"] == "fp32+bf16"
