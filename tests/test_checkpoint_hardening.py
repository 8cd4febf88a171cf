"""Adapter files as untrusted input, and saves that survive a kill (defects D3, D7, D8 and the
loader's memory and file modes from the hardening issue; each test failed before its fix)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import stat
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora import atomic, patterns
from minilora.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, header_bytes, tensor_bytes
from tiny_models import build, randomize_adapters

CFG = dict(target_modules=["lin0", "lin1"], r=2, lora_alpha=4, modules_to_save=["head"])


def _saved(tmp_path, **overrides):
    model = minilora.inject(build("mlp"), **{**CFG, **overrides})
    randomize_adapters(model)
    minilora.save_adapter(model, tmp_path)
    return model


def _edit_config(folder, **changes):
    data = json.loads((folder / CONFIG_NAME).read_text())
    data.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(data))


# ---------------------------------------------------------------- D3: finiteness after the cast
def test_fp32_value_that_overflows_an_fp16_model_is_refused(tmp_path):
    # modules_to_save copies take the model's dtype: 1e5 is finite in fp32, inf in fp16.
    _saved(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.head.bias"][0] = 1e5
    save_file(tensors, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    model = build("mlp").half()
    with pytest.raises(AdapterFileError, match=r"'base_model.model.head.bias' has 1 value\(s\) that are NaN or inf "
                                                r"as torch.float16"):
        minilora.load_adapter(model, tmp_path)
    assert not hasattr(model, "minilora_state")
    minilora.load_adapter(build("mlp"), tmp_path)  # the same file is fine for an fp32 model


# ---------------------------------------------------------------- D7: hostile regular expressions
# (a|a)*b backtracks exponentially on a long run of "a" that ends in something else; a module name
# of that shape makes Python's re (and so peft) spin for hours.
SLOW = r"(a|a)*b"


class Hostile(torch.nn.Module):
    def __init__(self):
        super().__init__()
        setattr(self, "a" * 40 + "bc", torch.nn.Linear(4, 4))
        self.lin = torch.nn.Linear(4, 4)


@pytest.fixture
def short_budget(monkeypatch):
    # The real budget is 5 s; the mechanism is the same with 1 s, and the suite stays fast.
    monkeypatch.setattr(patterns, "MATCH_BUDGET_S", 1.0)


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "exclude_modules"])
def test_catastrophic_regex_in_a_file_is_refused_in_seconds(tmp_path, field, short_budget):
    targets = ["lin", "a" * 40 + "bc"]  # rank_pattern keys are matched against the targets only
    model = minilora.inject(Hostile(), targets=targets, r=2)
    minilora.save_adapter(model, tmp_path)
    value = {"target_modules": SLOW, "rank_pattern": {SLOW: 2}, "exclude_modules": SLOW}[field]
    _edit_config(tmp_path, **{field: value})
    # the edited config no longer matches the weights' digest: drop it, as a peft-written file has none
    save_file(load_file(tmp_path / WEIGHTS_NAME), tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    fresh = Hostile()
    start = time.monotonic()
    with pytest.raises(AdapterFileError, match=r"adapter_config.json: matching module names against the regular "
                                               r"expression .* took more than 1 s"):
        minilora.load_adapter(fresh, tmp_path)
    assert time.monotonic() - start < 10  # was over 60 s; the budget is 1 s here, generous for a busy CI
    assert not hasattr(fresh, "minilora_state")


def test_catastrophic_regex_given_in_code_is_a_clear_error_too(short_budget):
    with pytest.raises(ValueError, match=r"took more than 1 s, so it was stopped: the pattern backtracks"):
        minilora.inject(Hostile(), targets=SLOW)


# ---------------------------------------------------------------- bounded memory while reading
def test_a_huge_file_with_a_bad_shape_is_refused_before_its_data_is_read(tmp_path):
    _saved(tmp_path)
    # every key as saved, but lora_A of lin0 declared as a 1 GiB tensor: a valid header, the file
    # made that long without writing the data (sparse)
    tensors = {k: t.clone() for k, t in load_file(tmp_path / WEIGHTS_NAME).items()}  # not views of the file
    key, count = "base_model.model.lin0.lora_A.weight", (1 << 30) // 4
    del tensors[key]
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in sorted(tensors.items())] + [(key, torch.float32, (count,))]
    with open(tmp_path / WEIGHTS_NAME, "wb") as f:
        f.write(header_bytes(layout, {"format": "pt"}))
        for k in sorted(tensors):
            f.write(tensor_bytes(tensors[k]))
        f.truncate(f.tell() + count * 4)
    tracemalloc.start()
    try:
        with pytest.raises(AdapterFileError, match=r"has shape \(268435456,\), but the module it belongs to needs"):
            minilora.load_adapter(build("mlp"), tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak >> 20} MiB while refusing a 1 GiB file"  # was the whole file


# ---------------------------------------------------------------- D8: the config/weights pair
def test_provenance_edits_keep_loading_other_edits_are_refused(tmp_path):
    model = _saved(tmp_path)
    _edit_config(tmp_path, base_model_name_or_path="somewhere/else", revision="v2", inference_mode=False)
    loaded = minilora.load_adapter(build("mlp"), tmp_path)
    x = torch.randn(3, 12)
    assert torch.equal(loaded(x), model(x))
    _edit_config(tmp_path, lora_alpha=8)
    with pytest.raises(AdapterFileError, match=r"was saved together with another adapter_config.json"):
        minilora.load_adapter(build("mlp"), tmp_path)


def _modes(folder):
    return {name: stat.S_IMODE(os.stat(folder / name).st_mode) for name in (WEIGHTS_NAME, CONFIG_NAME)}


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask_and_keep_an_existing_mode(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        model = _saved(tmp_path / "a")
        assert _modes(tmp_path / "a") == {WEIGHTS_NAME: mode, CONFIG_NAME: mode}  # was 0600 always
        os.chmod(tmp_path / "a" / WEIGHTS_NAME, 0o640)
        minilora.save_adapter(model, tmp_path / "a")
        assert _modes(tmp_path / "a") == {WEIGHTS_NAME: 0o640, CONFIG_NAME: mode}
    finally:
        os.umask(old)


def _dead_pid():
    proc = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed_by_the_next_save(tmp_path):
    model = minilora.inject(build("mlp"), **CFG)
    minilora.inject(model, targets=["lin1"], adapter_name="b")
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / "c").mkdir()  # a killed save of adapter "c" that had created its folder
    stale = [tmp_path / f".{WEIGHTS_NAME}.{dead}.0123abcd.tmp", tmp_path / "c" / f".{CONFIG_NAME}.{dead}.89abcdef.tmp"]
    kept = [tmp_path / f".{WEIGHTS_NAME}.{alive}.0123abcd.tmp",  # a writer that still runs
            tmp_path / "notes.tmp", tmp_path / "c.keep"]         # not ours
    for path in stale + kept:
        path.write_bytes(b"x")
    minilora.save_adapter(model, tmp_path)
    assert not any(p.exists() for p in stale) and not (tmp_path / "c").exists()
    assert all(p.exists() for p in kept)
    assert sorted(os.listdir(tmp_path / "b")) == [CONFIG_NAME, WEIGHTS_NAME]


def _version(seed):
    """(model, input, output) of one adapter version; versions differ in weights and in alpha."""
    model = minilora.inject(build("mlp"), **{**CFG, "lora_alpha": 2 + 2 * (seed % 2)})
    randomize_adapters(model, seed=seed)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    return model, x, model(x).detach()


def _save_forever(folder, seed_a, seed_b):
    torch.set_num_threads(1)
    models = [_version(seed_a)[0], _version(seed_b)[0]]
    i = 0
    while True:
        minilora.save_adapter(models[i % 2], folder)
        i += 1


def _crash_after_first_rename(folder, seed):
    torch.set_num_threads(1)
    model = _version(seed)[0]
    real = os.replace

    def replace_then_die(src, dst):
        real(src, dst)
        os._exit(9)  # as a SIGKILL would: no cleanup, no second rename

    os.replace = replace_then_die
    minilora.save_adapter(model, folder)


def _outcome(folder, versions):
    """Which version the folder loads as, or "refused"."""
    try:
        model = minilora.load_adapter(build("mlp"), folder)
    except AdapterFileError:
        return "refused"
    for seed, (_, x, y) in versions.items():
        if torch.equal(model(x), y):
            return seed
    return "wrong"


def test_a_save_killed_between_its_two_renames_is_refused_not_loaded_wrong(tmp_path):
    versions = {seed: _version(seed) for seed in (1, 2)}
    minilora.save_adapter(versions[1][0], tmp_path)
    proc = multiprocessing.get_context("fork").Process(target=_crash_after_first_rename, args=(tmp_path, 2))
    proc.start()
    proc.join()
    assert proc.exitcode == 9
    # new weights (seed 2, alpha 2) beside the old config (alpha 4): was a silent load, scaling 2.0 not 4.0
    assert _outcome(tmp_path, versions) == "refused"
    minilora.save_adapter(versions[2][0], tmp_path)  # the next save repairs it and leaves no temporary
    assert _outcome(tmp_path, versions) == 2
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]


def test_saves_killed_at_random_points_leave_old_new_or_refused(tmp_path):
    # A child saves two versions in turn, as fast as it can; it is SIGKILLed after a random delay.
    # Every folder left behind must load as one of the two versions, or be refused.
    versions = {seed: _version(seed) for seed in (1, 2)}
    minilora.save_adapter(versions[1][0], tmp_path)
    rng = random.Random(0)
    outcomes = []
    for _ in range(30):
        proc = multiprocessing.get_context("fork").Process(target=_save_forever, args=(tmp_path, 1, 2))
        proc.start()
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        outcomes.append(_outcome(tmp_path, versions))
    assert "wrong" not in outcomes, outcomes
    assert set(outcomes) <= {1, 2, "refused"}
    minilora.save_adapter(versions[2][0], tmp_path)
    assert _outcome(tmp_path, versions) == 2
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # killed saves' temporaries removed


def test_atomic_temporaries_are_recognised():
    assert atomic.is_temporary(f".{WEIGHTS_NAME}.123.0123abcd.tmp")
    assert not atomic.is_temporary("notes.tmp") and not atomic.is_temporary(WEIGHTS_NAME)
