"""Every bad adapter folder, built here, gets a specific error and leaves the model exactly as it
was; saves are atomic (a failure halfway leaves the previous files and no temporary files)."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora import atomic, checkpoint
from minilora.inject import lora_state
from tiny_models import build, randomize_adapters

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CFG = dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=4, modules_to_save=["head"])


@pytest.fixture
def folder(tmp_path):
    """A good adapter folder for the MLP."""
    model = minilora.inject(build("mlp"), **CFG)
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path)
    return tmp_path


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [type(m) for m in model.modules()], lora_state(model))


def _assert_unchanged(model, snap):
    sd, grads, types, state = snap
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [type(m) for m in model.modules()] == types
    assert lora_state(model) is state


def _edit_tensors(folder, fn):
    tensors = load_file(folder / WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def _edit_config(folder, fn):
    data = json.loads((folder / CONFIG).read_text())
    fn(data)
    (folder / CONFIG).write_text(json.dumps(data))


KEY_A = "base_model.model.lin0.lora_A.weight"


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) - 40])


def _flip_header(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    for i in range(10, 40):  # inside the JSON header (after the 8-byte length)
        data[i] ^= 0x5A
    (folder / WEIGHTS).write_bytes(bytes(data))


def _duplicate_header_key(folder):
    data = (folder / WEIGHTS).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode()
    first = header.index('"base_model.model.lin0')
    entry_end = header.index("}", first) + 1
    doubled = header[:entry_end] + "," + header[first:entry_end] + header[entry_end:]
    doubled += " " * (-len(doubled) % 8)
    (folder / WEIGHTS).write_bytes(len(doubled).to_bytes(8, "little") + doubled.encode() + data[8 + n:])


def _garbage_length(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[:8] = (10 ** 12).to_bytes(8, "little")
    (folder / WEIGHTS).write_bytes(bytes(data))


BAD_FILES = {
    "truncated": (_truncate, r"not a valid safetensors file .*truncated or corrupt"),
    "flipped header bytes": (_flip_header, r"not a valid safetensors file"),
    "header length too large": (_garbage_length, r"not a valid safetensors file \(it declares a 1000000000000-byte "
                                                 r"header in a \d+-byte file\)"),
    "duplicate header key": (_duplicate_header_key, r"not a valid safetensors file .*names 'base_model.model.lin0"),
    "dropped key": (lambda f: _edit_tensors(f, lambda t: t.pop(KEY_A)),
                    r"lacks 1 key\(s\) the config implies: 'base_model.model.lin0.lora_A.weight'"),
    "unexpected key": (lambda f: _edit_tensors(f, lambda t: t.update({"base_model.model.lin9.lora_A.weight":
                                                                       torch.zeros(2, 3)})),
                       r"1 unexpected key\(s\): 'base_model.model.lin9.lora_A.weight'"),
    "wrong shape": (lambda f: _edit_tensors(f, lambda t: t.update({KEY_A: torch.zeros(3, 12)})),
                    r"'base_model.model.lin0.lora_A.weight' has shape \(3, 12\), but the module it belongs to "
                    r"needs \(2, 12\)"),
    "nan": (lambda f: _edit_tensors(f, lambda t: t[KEY_A].view(-1).__setitem__(5, float("nan"))),
            r"'base_model.model.lin0.lora_A.weight' has 1 value\(s\) that are NaN or inf as torch.float32"),
    # D3: finite in the file, inf in the dtype it is used in (fp64 1e300 -> fp32 adapter)
    "fp64 beyond fp32": (lambda f: _edit_tensors(f, lambda t: t.update({KEY_A: t[KEY_A].double().fill_(1e300)})),
                         r"'base_model.model.lin0.lora_A.weight' has 24 value\(s\) that are NaN or inf as "
                         r"torch.float32 .* beyond that dtype's range"),
    "inf in modules_to_save": (lambda f: _edit_tensors(f, lambda t: t["base_model.model.head.bias"].fill_(float("inf"))),
                               r"'base_model.model.head.bias' has 6 value\(s\) that are NaN or inf"),
    "int dtype": (lambda f: _edit_tensors(f, lambda t: t.update({KEY_A: torch.ones(2, 12, dtype=torch.int64)})),
                  r"'base_model.model.lin0.lora_A.weight' has dtype torch.int64, but adapter tensors are floating "
                  r"point \(it would become torch.float32\)"),
    "bool dtype": (lambda f: _edit_tensors(f, lambda t: t.update({KEY_A: torch.ones(2, 12, dtype=torch.bool)})),
                   r"has dtype torch.bool, but adapter tensors are floating point"),
    "uint32 dtype": (lambda f: _edit_tensors(f, lambda t: t.update({KEY_A: torch.ones(2, 12, dtype=torch.uint32)})),
                     r"has dtype torch.uint32, but adapter tensors are floating point"),
    "missing weights": (lambda f: os.remove(f / WEIGHTS), rf"has {CONFIG} but no {WEIGHTS}"),
    "missing config": (lambda f: os.remove(f / CONFIG), rf"{CONFIG} is missing"),
    "bad json": (lambda f: (f / CONFIG).write_text('{"r": 2,'), r"is not valid JSON"),
    "deeply nested json": (lambda f: (f / CONFIG).write_text("[" * 200_000 + "]" * 200_000),
                           r"nests JSON values more than 64 deep, which peft's adapter config never does"),
    "huge config": (lambda f: (f / CONFIG).write_bytes(b" " * (16 << 20) + b"{}"),
                    r"is larger than 16 MiB, far more than peft's adapter config needs"),
    "config is a folder": (lambda f: (os.remove(f / CONFIG), os.mkdir(f / CONFIG)), rf"{CONFIG} is missing"),
    "json list": (lambda f: (f / CONFIG).write_text("[1, 2]"), r"holds a JSON list, expected an object"),
    "prefix tuning": (lambda f: _edit_config(f, lambda d: d.update(peft_type="PREFIX_TUNING")),
                      r"peft_type='PREFIX_TUNING'; minilora loads only LoRA adapters"),
    "no peft_type": (lambda f: _edit_config(f, lambda d: d.pop("peft_type")), r"peft_type=None"),
    "bad rank in config": (lambda f: _edit_config(f, lambda d: d.update(r=0)), r"LoraConfig.r=0 is invalid"),
    "huge rank in config": (lambda f: _edit_config(f, lambda d: d.update(r=10**30)),
                            r"LoraConfig.r=10{30} is invalid: the rank must be an integer from 1 to 65536"),
    "huge alpha in config": (lambda f: _edit_config(f, lambda d: d.update(lora_alpha=1e308)),
                             r"LoraConfig.lora_alpha=1e\+308 is invalid"),
    "qalora": (lambda f: _edit_config(f, lambda d: d.update(use_qalora=True)),
               r"use_qalora=True is invalid: use_qalora switches on a peft feature minilora does not implement"),
    # D8: a config that is not the one the weights were saved with (a save killed between its two
    # renames leaves exactly this: new weights, old config)
    "config changed after save": (lambda f: _edit_config(f, lambda d: d.update(lora_alpha=8)),
                                  rf"{WEIGHTS} was saved together with another {CONFIG} than the one beside it"),
    # a peft-written file has no digest: then the shapes catch a config that does not fit
    "config rank differs from a peft file": (
        lambda f: (_edit_tensors(f, lambda t: None), _edit_config(f, lambda d: d.update(r=3))),
        r"lora_A.weight' has shape \(2, \d+\), but the module it belongs to needs \(3, \d+\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_specific_error_model_unchanged(case, folder):
    damage, message = BAD_FILES[case]
    damage(folder)
    for model in (build("mlp"), minilora.inject(build("mlp"), targets=["lin1"], adapter_name="other")):
        snap = _snapshot(model)
        with pytest.raises(checkpoint.AdapterFileError, match=message):
            minilora.load_adapter(model, folder)
        _assert_unchanged(model, snap)


def test_error_is_a_value_error_and_load_works_after_repair(folder):
    model = build("mlp")
    data = (folder / CONFIG).read_text()
    (folder / CONFIG).write_text("{")
    with pytest.raises(ValueError):
        minilora.load_adapter(model, folder)
    (folder / CONFIG).write_text(data)
    minilora.load_adapter(model, folder)
    assert minilora.adapted_modules(model) == ["lin0", "lin1"]


def test_missing_folder(tmp_path):
    with pytest.raises(checkpoint.AdapterFileError, match=r"is missing \(the folder itself does not exist\)"):
        minilora.load_adapter(build("mlp"), tmp_path / "nowhere")


def test_targets_not_in_model_is_refused_untouched(folder):
    model = build("embed_conv1d")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="no module matches target_modules"):
        minilora.load_adapter(model, folder)
    _assert_unchanged(model, snap)


def test_existing_adapter_name_is_refused_untouched(folder):
    model = minilora.inject(build("mlp"), targets=["lin1"])
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="an adapter named 'default' is already injected"):
        minilora.load_adapter(model, folder)
    _assert_unchanged(model, snap)


def test_pickle_refused_unless_allowed(folder):
    tensors = load_file(folder / WEIGHTS)
    torch.save(tensors, folder / "adapter_model.bin")
    os.remove(folder / WEIGHTS)
    model = build("mlp")
    snap = _snapshot(model)
    with pytest.raises(checkpoint.AdapterFileError,
                       match=r"holds only adapter_model.bin, a pickle: unpickling can run arbitrary code.*"
                             r"torch.load\('adapter_model.bin', weights_only=True\).*save_file.*allow_pickle=True"):
        minilora.load_adapter(model, folder)
    _assert_unchanged(model, snap)
    minilora.load_adapter(model, folder, allow_pickle=True)
    assert torch.equal(model.lin0.adapters["default"].lora_A, tensors[KEY_A])


def test_allow_pickle_uses_weights_only(folder, monkeypatch):
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    os.remove(folder / WEIGHTS)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    minilora.load_adapter(build("mlp"), folder, allow_pickle=True)
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_unsafe_pickle_refused_even_when_allowed(folder):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    os.remove(folder / WEIGHTS)
    with pytest.raises(checkpoint.AdapterFileError, match=r"could not be read with torch.load\(weights_only=True\)"):
        minilora.load_adapter(build("mlp"), folder, allow_pickle=True)


def test_load_does_not_move_the_global_rng(folder):
    model = build("mlp")  # build() seeds torch itself
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    minilora.load_adapter(model, folder)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- atomic saves
def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_failed_save_leaves_previous_adapters_and_no_temp_files(tmp_path, monkeypatch, fail_at):
    model = minilora.inject(build("mlp"), **CFG)
    minilora.inject(model, targets=["lin1"], adapter_name="b")
    minilora.save_adapter(model, tmp_path)
    before = _files(tmp_path)
    assert set(before) == {WEIGHTS, CONFIG, f"b/{WEIGHTS}", f"b/{CONFIG}"}
    randomize_adapters(model, seed=9)  # the next save would write different bytes

    calls = []
    real = atomic._write_all

    def write_half_then_fail(handle, data):
        calls.append(len(data))
        if len(calls) - 1 == fail_at:
            real(handle, data[: len(data) // 2])
            raise OSError("disk full")
        real(handle, data)

    monkeypatch.setattr(atomic, "_write_all", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        minilora.save_adapter(model, tmp_path)
    assert _files(tmp_path) == before  # same files, same bytes, no temporaries
    monkeypatch.undo()
    minilora.save_adapter(model, tmp_path)
    assert _files(tmp_path) != before and set(_files(tmp_path)) == set(before)


def test_failed_first_save_leaves_no_folders(tmp_path, monkeypatch):
    model = minilora.inject(build("mlp"), **CFG)
    minilora.inject(model, targets=["lin1"], adapter_name="b")
    monkeypatch.setattr(atomic, "_write_all", lambda handle, data: (_ for _ in ()).throw(OSError("no")))
    with pytest.raises(OSError):
        minilora.save_adapter(model, tmp_path / "new" / "deeper")
    assert os.listdir(tmp_path) == []


def test_save_is_deterministic_and_overwrites(tmp_path):
    model = minilora.inject(build("mlp"), **CFG)
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path / "a")
    minilora.save_adapter(model, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    with torch.no_grad():
        model.lin0.adapters["default"].lora_A.add_(1.0)
    minilora.save_adapter(model, tmp_path / "a")
    assert torch.equal(load_file(tmp_path / "a" / WEIGHTS)[KEY_A], model.lin0.adapters["default"].lora_A)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match=r"has no minilora adapters; call minilora.inject"):
        minilora.save_adapter(build("mlp"), tmp_path)
    model = minilora.inject(build("mlp"), targets=["lin0"])
    with pytest.raises(ValueError, match=r"no adapter named 'x'; this model has \['default'\]"):
        minilora.save_adapter(model, tmp_path, adapter_name="x")
    assert os.listdir(tmp_path) == []


def test_random_byte_damage_never_loads_silently_wrong(folder):
    # Flip random bytes anywhere: the load either fails with AdapterFileError, or (damage inside
    # tensor data, which safetensors does not checksum) loads exactly the damaged values.
    rng = random.Random(0)
    good = (folder / WEIGHTS).read_bytes()
    for _ in range(20):
        data = bytearray(good)
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        (folder / WEIGHTS).write_bytes(bytes(data))
        model = build("mlp")
        snap = _snapshot(model)
        try:
            minilora.load_adapter(model, folder)
        except checkpoint.AdapterFileError:
            _assert_unchanged(model, snap)
            continue
        loaded = load_file(folder / WEIGHTS)
        assert torch.equal(model.lin0.adapters["default"].lora_A, loaded[KEY_A])


@pytest.mark.parametrize("text,message", [
    ('{"r": ' + "9" * 5000 + "}", r"is not valid JSON \(Exceeds the limit"),  # was a bare ValueError
    ("[" * 100 + "]" * 100, r"nests JSON values more than 64 deep"),          # parses, but too deep
])
def test_config_json_edge_cases_name_the_file(folder, text, message):
    (folder / CONFIG).write_text(text)
    with pytest.raises(checkpoint.AdapterFileError, match=rf"adapter_config\.json {message}"):
        minilora.load_adapter(build("mlp"), folder)
