"""lmlab checkpoints: exact round trips, atomic replacement, and a specific, actionable error for
every way a checkpoint directory can be broken."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmlab import atomic
from lmlab.model import ModelConfig, RopeScaling, build_model
from lmlab.model import checkpoint as ckpt
from lmlab.model.checkpoint import (
    CONFIG_FILE,
    CRC_KEY,
    FORMAT_VERSION,
    VERSION_KEY,
    WEIGHTS_FILE,
    CheckpointConfigError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    atomic_directory,
    is_checkpoint,
    load_checkpoint,
    read_config,
    read_metadata,
    save_checkpoint,
    write_checkpoint_files,
)


def tiny_config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=48,
        d_model=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=32,
        max_seq_len=32,
        rope_scaling=RopeScaling(kind="yarn", factor=2.0, original_max_seq_len=16, beta_fast=16.0),
        qk_norm=True,
        meta={"source": "test", "nested": {"a": [1, 2]}},
    )
    base.update(changes)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(tiny_config(**changes))
    with torch.no_grad():  # norms start at exactly 1: make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def leftovers(parent: Path) -> list[str]:
    """Temporary or set-aside directories that atomic_directory must never leave behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def header_of(file: Path) -> tuple[int, dict]:
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def rewrite_weights(file: Path, tensors: dict[str, torch.Tensor], checksums: bool = True) -> None:
    """Write `tensors` as the checkpoint's weights, with valid checksums, as a buggy or foreign
    writer would: the file itself is sound, only its contents disagree with config.json."""
    meta = {"format": "pt"}
    if checksums:
        meta[CRC_KEY] = json.dumps({k: ckpt._crc32(v) for k, v in tensors.items()})
    save_file(tensors, file, metadata=meta)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = tiny_model()
    path = tmp_path / "ckpt"
    save_checkpoint(model, path)
    return model, path


# --- round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(tmp_path: Path, tie: bool):
    model = tiny_model(tie_embeddings=tie)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tok_dir / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (tok_dir / "tokenizer.model").write_bytes(bytes(range(256)))
    tok_files = [
        tok_dir / "tokenizer.json",
        tok_dir / "tokenizer_config.json",
        str(tok_dir / "tokenizer.model"),
    ]
    path = tmp_path / "out" / "ckpt"  # the parent is created too

    assert save_checkpoint(model, path, tokenizer_files=tok_files, metadata={"step": 7}) == path

    loaded = load_checkpoint(path)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd2)
    for name in sd:
        assert sd2[name].dtype == sd[name].dtype, name
        assert torch.equal(sd2[name], sd[name]), name
    assert ("lm_head.weight" in sd) is not tie
    ids = torch.randint(0, 48, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)

    for src in tok_files:
        src = Path(src)
        assert (path / src.name).read_bytes() == src.read_bytes()
    assert read_config(path) == model.cfg  # dataclass equality, nested RopeScaling included
    assert isinstance(read_config(path).rope_scaling, RopeScaling)
    assert read_config(path / CONFIG_FILE) == model.cfg
    assert loaded.cfg == model.cfg
    assert read_metadata(path) == {"step": 7}
    assert is_checkpoint(path)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "tokenizer_config.json", "tokenizer.model"]
    )
    assert leftovers(path.parent) == []


def test_file_format(saved):
    model, path = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config[VERSION_KEY] == FORMAT_VERSION
    assert config["rope_scaling"]["kind"] == "yarn"
    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    crcs = json.loads(meta[CRC_KEY])
    assert set(crcs) == set(model.state_dict())
    # plain safetensors readers load it too
    plain = load_file(path / WEIGHTS_FILE)
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())


def test_loaded_model_is_materialized_and_trainable(saved):
    _, path = saved
    model = load_checkpoint(path)
    for name, p in model.named_parameters():
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad, name
        assert not p.is_meta and p.device.type == "cpu", name
    ids = torch.randint(0, 48, (1, 5))
    model(ids, targets=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dtypes(tmp_path: Path):
    model = tiny_model().to(torch.bfloat16)
    save_checkpoint(model, tmp_path / "bf16")
    loaded = load_checkpoint(tmp_path / "bf16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters(), strict=True)
    )
    upcast = load_checkpoint(tmp_path / "bf16", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in upcast.parameters())
    assert torch.equal(upcast.embed.weight, model.embed.weight.float())
    with pytest.raises(ValueError, match="not a floating type"):
        load_checkpoint(tmp_path / "bf16", dtype=torch.int32)


# --- atomicity ------------------------------------------------------------------------------
def test_exception_inside_atomic_directory_leaves_checkpoint_intact(saved):
    _, path = saved
    before = tree_bytes(path)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(path, overwrite=True) as tmp:
            assert tmp.parent == path.parent and tmp != path
            (tmp / CONFIG_FILE).write_text("{}")
            raise RuntimeError("boom")
    assert tree_bytes(path) == before
    assert leftovers(path.parent) == []


def test_failure_during_save_leaves_checkpoint_intact(saved, monkeypatch):
    _, path = saved
    before = tree_bytes(path)

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a partial file
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(seed=1), path, overwrite=True)
    assert tree_bytes(path) == before
    assert leftovers(path.parent) == []
    load_checkpoint(path)


def test_failure_on_a_fresh_path_leaves_nothing(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(
        ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        save_checkpoint(tiny_model(), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces(saved, monkeypatch, exchange: bool):
    _, path = saved
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    (path / "stale.txt").write_text("from the old checkpoint")
    other = tiny_model(seed=1)
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite=True"):
        save_checkpoint(other, path)  # never replaced by accident
    assert not torch.equal(load_checkpoint(path).embed.weight, other.embed.weight)
    save_checkpoint(other, path, overwrite=True)  # replaced as a whole
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.embed.weight, other.embed.weight)
    assert not (path / "stale.txt").exists()
    assert leftovers(path.parent) == []


def test_failed_swap_restores_the_old_checkpoint(saved, monkeypatch):
    _, path = saved
    before = tree_bytes(path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # target moved aside; now putting the new one in place fails
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tiny_model(seed=1), path, overwrite=True)
    monkeypatch.undo()
    assert tree_bytes(path) == before
    assert leftovers(path.parent) == []


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path: Path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite=True"):
        save_checkpoint(tiny_model(), target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []
    save_checkpoint(tiny_model(), target, overwrite=True)
    assert not (target / "notes.txt").exists()
    load_checkpoint(target)

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_checkpoint(tiny_model(), a_file)
    assert a_file.read_text() == "x"


def test_empty_directory_is_replaced(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    save_checkpoint(tiny_model(), tmp_path / "empty")
    load_checkpoint(tmp_path / "empty")


def test_train_state_in_the_same_transaction(tmp_path: Path):
    model, path = tiny_model(), tmp_path / "step100"
    with atomic_directory(path) as tmp:
        write_checkpoint_files(model, tmp, metadata={"step": 100})
        torch.save({"step": 100}, tmp / ckpt.TRAIN_STATE_FILE)
        assert not path.exists()  # nothing is visible before the block succeeds
    assert torch.load(path / ckpt.TRAIN_STATE_FILE)["step"] == 100
    assert read_metadata(path) == {"step": 100}
    load_checkpoint(path)


def test_bad_save_inputs_fail_before_writing(tmp_path: Path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        save_checkpoint(model, tmp_path / "c", tokenizer_files=[tmp_path / "nope.json"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="overwrite the checkpoint's own config.json"):
        save_checkpoint(model, tmp_path / "c", tokenizer_files=[tmp_path / "config.json"])
    with pytest.raises(ValueError, match="plain JSON"):
        save_checkpoint(model, tmp_path / "c", metadata={"when": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_hand_tied_weights_are_refused(tmp_path: Path):
    model = tiny_model()
    model.lm_head.weight = model.embed.weight
    with pytest.raises(ValueError, match="tie_embeddings"):
        save_checkpoint(model, tmp_path / "c")


# --- corruption and mismatches ----------------------------------------------------------------
def expect(exc_type, path: Path, *fragments: str, tensor: str | None = None, **load_kwargs):
    with pytest.raises(exc_type) as info:
        load_checkpoint(path, **load_kwargs)
    # the test's tmp directory is named after the test: keep it out of what is checked
    message = str(info.value).replace(str(path.parent), "<tmp>")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    if tensor is not None:
        assert info.value.tensor == tensor
    return info.value


@pytest.mark.parametrize("where", ["length", "header", "header_end", "data", "last_byte", "empty"])
def test_truncated_weights(saved, where: str):
    _, path = saved
    file = path / WEIGHTS_FILE
    data = file.read_bytes()
    n, _ = header_of(file)
    cut = {
        "length": 5,
        "header": 8 + n // 2,
        "header_end": 8 + n,
        "data": (8 + n + len(data)) // 2,
        "last_byte": len(data) - 1,
        "empty": 0,
    }[where]
    file.write_bytes(data[:cut])
    err = expect(CheckpointCorruptError, path, WEIGHTS_FILE, "truncated", "last good checkpoint")
    detail = {"length": "too short", "empty": "too short", "header": "header claims"}.get(
        where, "header describes"
    )
    assert detail in str(err)


@pytest.mark.parametrize("which", [0, -1, 3, 7])
def test_flipped_byte_is_caught_by_checksum(saved, which: int):
    _, path = saved
    file = path / WEIGHTS_FILE
    n, header = header_of(file)
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    name = names[which]
    begin, end = header[name]["data_offsets"]
    data = bytearray(file.read_bytes())
    data[8 + n + (begin + end) // 2] ^= 0x40
    file.write_bytes(bytes(data))
    err = expect(CheckpointCorruptError, path, WEIGHTS_FILE, repr(name), "CRC32", tensor=name)
    assert err.path == path / WEIGHTS_FILE
    # it is the checksum that finds it: the damaged file is otherwise well-formed
    load_checkpoint(path, verify=False)


def test_garbage_header(saved):
    _, path = saved
    file = path / WEIGHTS_FILE
    n, _ = header_of(file)
    data = bytearray(file.read_bytes())
    data[8 : 8 + n] = b"#" * n
    file.write_bytes(bytes(data))
    expect(CheckpointCorruptError, path, WEIGHTS_FILE, "header")


def test_garbage_length_prefix(saved):
    _, path = saved
    file = path / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(b"\xff" * 8 + data[8:])
    expect(CheckpointCorruptError, path, WEIGHTS_FILE)


def test_trailing_bytes(saved):
    _, path = saved
    with open(path / WEIGHTS_FILE, "ab") as f:
        f.write(b"\0" * 16)
    expect(CheckpointCorruptError, path, WEIGHTS_FILE)


def test_damaged_checksum_table(saved):
    _, path = saved
    file = path / WEIGHTS_FILE
    tensors = load_file(file)
    save_file(tensors, file, metadata={"format": "pt", CRC_KEY: "{not json"})
    expect(CheckpointCorruptError, path, WEIGHTS_FILE, CRC_KEY)


def test_missing_checksums_need_verify_false(saved):
    model, path = saved
    rewrite_weights(path / WEIGHTS_FILE, load_file(path / WEIGHTS_FILE), checksums=False)
    expect(CheckpointCorruptError, path, WEIGHTS_FILE, "verify=False")
    assert torch.equal(load_checkpoint(path, verify=False).embed.weight, model.embed.weight)


def test_missing_directory_and_files(tmp_path: Path, saved):
    _, path = saved
    expect(CheckpointNotFoundError, tmp_path / "nowhere", "nowhere", "does not exist")
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        read_config(tmp_path / "nowhere")
    (path / WEIGHTS_FILE).unlink()
    expect(CheckpointNotFoundError, path, WEIGHTS_FILE, "missing")
    (path / CONFIG_FILE).unlink()
    expect(CheckpointNotFoundError, path, CONFIG_FILE, "missing")
    assert not is_checkpoint(path)


def test_missing_tensor(saved):
    _, path = saved
    tensors = load_file(path / WEIGHTS_FILE)
    del tensors["blocks.1.attn.k_proj.weight"]
    rewrite_weights(path / WEIGHTS_FILE, tensors)
    name = "blocks.1.attn.k_proj.weight"
    expect(CheckpointMismatchError, path, WEIGHTS_FILE, repr(name), "lacks", tensor=name)


def test_unexpected_tensor(saved):
    _, path = saved
    tensors = load_file(path / WEIGHTS_FILE)
    tensors["blocks.0.attn.extra_proj.weight"] = torch.zeros(3, 3)
    rewrite_weights(path / WEIGHTS_FILE, tensors)
    name = "blocks.0.attn.extra_proj.weight"
    expect(CheckpointMismatchError, path, WEIGHTS_FILE, repr(name), "no place", tensor=name)


def test_tied_weights_loaded_into_untied_config(tmp_path: Path):
    save_checkpoint(tiny_model(tie_embeddings=True), tmp_path / "c")
    config = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())
    config["tie_embeddings"] = False
    (tmp_path / "c" / CONFIG_FILE).write_text(json.dumps(config))
    expect(CheckpointMismatchError, tmp_path / "c", "'lm_head.weight'", tensor="lm_head.weight")


def test_shape_changed_in_config_after_save(saved):
    _, path = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    config["d_ff"] = 40
    (path / CONFIG_FILE).write_text(json.dumps(config))
    name = "blocks.0.mlp.gate_proj.weight"
    expect(
        CheckpointMismatchError, path, WEIGHTS_FILE, repr(name), "[32, 16]", "[40, 16]", tensor=name
    )


def test_non_floating_dtype(saved):
    _, path = saved
    tensors = load_file(path / WEIGHTS_FILE)
    name = "blocks.0.attn_norm.weight"
    tensors[name] = torch.ones(16, dtype=torch.int32)
    rewrite_weights(path / WEIGHTS_FILE, tensors)
    expect(CheckpointMismatchError, path, WEIGHTS_FILE, repr(name), "I32", tensor=name)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{ not json", "not valid JSON"),
        ("[1, 2]", "not an object"),
        ('{"vocab_size": 10}', "lmlab convert"),  # no format version: a foreign config
        ('{"lmlab_format_version": 99}', "upgrade lmlab"),
        ('{"lmlab_format_version": "one"}', "not a valid version"),
    ],
)
def test_invalid_config_json(saved, text: str, fragment: str):
    _, path = saved
    (path / CONFIG_FILE).write_text(text)
    expect(CheckpointConfigError, path, CONFIG_FILE, fragment)
    with pytest.raises(CheckpointConfigError, match=fragment):
        read_config(path)


def test_unknown_and_invalid_config_fields(saved):
    _, path = saved
    good = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**good, "n_experts": 8}))
    expect(CheckpointConfigError, path, CONFIG_FILE, "n_experts")
    (path / CONFIG_FILE).write_text(json.dumps({**good, "n_heads": 3}))
    expect(CheckpointConfigError, path, CONFIG_FILE, "n_heads")
    (path / CONFIG_FILE).write_text(
        json.dumps({**good, "rope_scaling": {"kind": "yarn", "bogus": 1}})
    )
    expect(CheckpointConfigError, path, CONFIG_FILE, "bogus")


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    with atomic.atomic_file(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(FileExistsError), atomic.atomic_file(target, overwrite=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
