"""Checkpoints: atomic writes, safe loading, authors' format, clear errors."""
import os

import pytest
import torch

from conftest import FIXTURES, needs_fixtures
from utils.checkpoint import atomic_write, load_checkpoint, resolve_checkpoint, save_checkpoint
from utils.errors import UserInputError


def minimal():
    return {"backbone": {"w": torch.ones(2)}, "centers": {"centers": torch.zeros(3, 4)}}


def test_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "m.tar"
    save_checkpoint(dict(minimal(), config={"bits": 4, "label_map": ["a", "b"]}), str(path))
    ck = load_checkpoint(str(path))
    assert ck["config"]["label_map"] == ["a", "b"] and ck["centers"]["centers"].shape == (3, 4)
    assert os.listdir(tmp_path) == ["m.tar"]


def test_crash_while_writing_keeps_old_file(tmp_path):
    path = tmp_path / "m.tar"
    save_checkpoint(minimal(), str(path))
    before = path.read_bytes()

    def explode(f):
        f.write(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), explode)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.tar"]


def test_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "m.tar"
    save_checkpoint(minimal(), str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserInputError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    torch.save({"model": 1}, str(path))
    with pytest.raises(UserInputError, match="not a DCDH checkpoint"):
        load_checkpoint(str(path))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch ran_payload_marker",))


def test_code_payload_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(dict(minimal(), extra=Payload()), "evil.tar")
    with pytest.raises(UserInputError, match="refused to load: it carries the Python object"):
        load_checkpoint("evil.tar")
    assert not os.path.exists("ran_payload_marker")


def test_resolve_like_the_authors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("checkpoint")
    save_checkpoint(minimal(), "checkpoint/a.tar")
    assert resolve_checkpoint("a.tar") == os.path.join("checkpoint", "a.tar")
    with pytest.raises(UserInputError, match="no such checkpoint"):
        resolve_checkpoint("b.tar")


@needs_fixtures
def test_authors_checkpoint_loads_weights_only():
    ck = load_checkpoint(f"{FIXTURES}/seed_format_dfhnet12.tar")
    assert ck["centers"]["centers"].shape == (299, 12)


@pytest.mark.parametrize("content,message", [
    (b"hello world", "not a checkpoint|not a readable checkpoint"),
    (b"", "empty file"),
    (b"\x80\x02}q\x00.", "not a DCDH checkpoint|not a readable checkpoint|not a checkpoint"),
])
def test_foreign_files_give_one_clear_line(tmp_path, content, message):
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=message) as e:
        load_checkpoint(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_payload_message_names_the_object(tmp_path):
    torch.save(dict(minimal(), extra=Payload()), str(tmp_path / "evil.tar"))
    with pytest.raises(UserInputError, match=r"carries the Python object (posix|os)\.system"):
        load_checkpoint(str(tmp_path / "evil.tar"))


@pytest.mark.parametrize("extra,message", [
    ({"config": [1, 2]}, "'config' is a list, expected a dict"),
    ({"config": {"method_args": "sigma=1"}}, "config 'method_args' is 'sigma=1', expected a dict"),
    ({"config": {"method": 3}}, "config 'method' is 3, expected a method name"),
    ({"config": {"bits": "12"}}, "config 'bits' is '12', expected a positive integer"),
    ({"config": {"recipe": {"patience": -1}}}, "config 'recipe' patience is -1"),
    ({"epoch": "3"}, "'epoch' is '3', expected an integer >= 0"),
    ({"best_loss": "low"}, "'best_loss' is 'low', expected a number"),
])
def test_malformed_config_and_state_name_the_file_and_entry(tmp_path, extra, message):
    path = tmp_path / "m.tar"
    torch.save(dict(minimal(), **extra), str(path))
    with pytest.raises(UserInputError) as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)
