"""`minilora merge` / `inspect` on checkpoint folders as untrusted input, and merges that are killed:
no code from the folder ever runs (and nobody is asked), OUT never lands inside BASE, a killed
merge leaves OUT complete or absent and its leftovers are removed by the next merge, symlinks to
files are followed but folder loops are one short error, and what merge writes has the modes of
new files (the umask), whatever the modes in BASE."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import minilora
from minilora import atomic
from minilora.checkpoint import save_adapter
from minilora.cli import main
from minilora import offline_merge as merge_module
from minilora.offline_merge import merge_checkpoint

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval()


@pytest.fixture
def ckpt(tmp_path):
    """A sharded tiny Llama with a tokenizer file, and a matching adapter (q_proj, v_proj)."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    (tmp_path / "base" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    model = minilora.inject(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"minilora {command}: error: ")
    return lines[0]


# ---------------------------------------------------------------- code in the checkpoint folder never runs
def write_custom_code_folder(folder: Path, marker: Path, model_type: str, architectures: list[str] | None) -> None:
    """config.json with an auto_map pointing at evil.py, which writes ``marker`` when imported."""
    folder.mkdir(exist_ok=True)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else \
        tiny_llama().config.to_dict()
    config.update(model_type=model_type, auto_map={
        "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel", "AutoModelForCausalLM": "evil.EvilModel"})
    if architectures is None:
        config.pop("architectures", None)
    else:
        config["architectures"] = architectures
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("checkpoint code ran")
        from transformers import PretrainedConfig, PreTrainedModel
        class EvilConfig(PretrainedConfig):
            model_type = {model_type!r}
        class EvilModel(PreTrainedModel):
            config_class = EvilConfig
    """))


@pytest.mark.parametrize("model_type, architectures, outcome", [
    ("evil-model", ["EvilForCausalLM"], r"model_type 'evil-model', which transformers .* does not know \(its "
                                        r"auto_map names custom code in the folder, which minilora never runs\)"),
    ("llama", None, None),  # a known model_type with an auto_map: transformers' own LlamaModel is built
])
def test_inspect_never_runs_checkpoint_code(tmp_path, capsys, monkeypatch, model_type, architectures, outcome):
    marker = tmp_path / "MARKER"
    write_custom_code_folder(tmp_path / "model", marker, model_type, architectures)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # whoever asks "run the custom code?" gets a yes
    code = main(["inspect", str(tmp_path / "model")])
    out, err = capsys.readouterr()
    assert not marker.exists()
    assert "[y/N]" not in out + err and "custom code which must be executed" not in out + err
    if outcome is None:
        assert code == 0, err
        assert "LlamaModel" in out.splitlines()[0]
    else:
        assert code == 1
        import re
        assert re.search(outcome, one_error_line(err, "inspect"))


def test_merge_never_runs_checkpoint_code(ckpt, capsys, monkeypatch):
    """Model facts are optional to merge: an unknown (custom-code) model_type means 'use the shapes'."""
    base, adapter = ckpt
    marker = base.parent / "MARKER"
    write_custom_code_folder(base, marker, "evil-model", ["EvilForCausalLM"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    code = main(["merge", "--no-progress", str(base), str(adapter), str(base.parent / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert not marker.exists()
    assert "[y/N]" not in out + err
    assert (base.parent / "out" / "evil.py").read_text() == (base / "evil.py").read_text()  # copied, never run


# ---------------------------------------------------------------- OUT inside BASE
@pytest.mark.parametrize("via_link", [False, True])
def test_out_inside_base_is_refused(ckpt, capsys, via_link):
    base, adapter = ckpt
    before = snapshot(base)
    parent = base
    if via_link:  # the parent of OUT is a symlink to BASE
        parent = base.parent / "link"
        parent.symlink_to(base)
    code = main(["merge", "--no-progress", str(base), str(adapter), str(parent / "merged")])
    line = one_error_line(capsys.readouterr().err, "merge")
    assert code == 1
    assert f"OUT {parent / 'merged'} is inside BASE {base}; the merge copies BASE and never writes into it" in line
    assert f"such as {base.parent / 'base-merged'}" in line
    assert snapshot(base) == before
    assert leftovers(base) == [] and leftovers(base.parent) == []


# ---------------------------------------------------------------- killed merges
# Kill points, installed into the merge module of the process that runs it: after the partial folder
# is made, after every block of rows written, after every side file copied, just before and just
# after the final rename. Deterministic: the N-th point kills, whatever the speed of the machine.
_KILL_POINTS = """
def install(m, event, set_attr):
    from minilora import atomic
    real_blocks, real_copy, real_claim, real_rename = m._Merger.blocks, m._copy_file, atomic.claim_folder, m.os.rename

    def blocks(self, key):
        for block in real_blocks(self, key):
            yield block
            event()

    def copy_file(src, dst):
        real_copy(src, dst)
        event()

    def claim(out):
        made = real_claim(out)
        event()
        return made

    def rename(src, dst):
        event()
        real_rename(src, dst)
        event()

    set_attr(m._Merger, "blocks", blocks)
    set_attr(m, "_copy_file", copy_file)
    set_attr(atomic, "claim_folder", claim)
    set_attr(m.os, "rename", rename)
"""

_KILLED_MERGE = _KILL_POINTS + """
import os, signal, sys
import minilora.offline_merge as m

base, adapter, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
count = 0

def event():
    global count
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

install(m, event, setattr)
m.merge_checkpoint(base, adapter, out, progress=False)
"""


def test_killed_merges_leave_out_whole_or_absent_and_the_next_merge_cleans_up(ckpt, monkeypatch):
    base, adapter = ckpt
    work = base.parent
    points = []
    namespace: dict = {}
    exec(_KILL_POINTS, namespace)  # noqa: S102 -- the test's own code, run here to count the points
    namespace["install"](merge_module, lambda: points.append(1), monkeypatch.setattr)
    merge_checkpoint(base, adapter, work / "reference", progress=False)
    monkeypatch.undo()
    total = len(points)
    reference = snapshot(work / "reference")
    assert total > 10 and len(reference) >= 5

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kills = [1, random.Random(0).randrange(2, total - 1), total - 1, total]  # first, any, before and after rename
    for n, kill_at in enumerate(kills):
        out = work / f"killed{n}"
        result = subprocess.run([sys.executable, "-c", _KILLED_MERGE, str(base), str(adapter), str(out), str(kill_at)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == -signal.SIGKILL, result.stderr
        assert leftovers(work)  # the kill left its partial folder or its owner file
        if out.exists():  # complete, and it loads
            assert kill_at == total
            assert snapshot(out) == reference
            transformers.LlamaForCausalLM.from_pretrained(out)
        else:
            assert kill_at < total

        merge_checkpoint(base, adapter, work / f"next{n}", progress=False)
        assert snapshot(work / f"next{n}") == reference
        assert leftovers(work) == []


def test_stale_partial_cleanup_removes_only_dead_merges_of_ours(ckpt):
    """Removed: an owner file and partial folder of a process that is gone, or whose PID now
    belongs to a later process. Kept: a partial folder without owner file, a live merge's, one
    made on another host (a shared file system), and any other name."""
    base, adapter = ckpt
    work = base.parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    me = os.getpid()
    identity = atomic.process_identity(me)

    def partial(name: str, pid: int, owner: dict | None) -> Path:
        folder = work / f".{name}.partial-{pid}-0123abcd"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
        if owner is not None:
            (work / (folder.name + ".owner")).write_text(json.dumps(owner))
        return folder

    host = atomic.socket.gethostname()
    removed = [partial("gone", dead_pid, {"host": host, "pid": dead_pid, "process": None})]
    if identity is not None:  # (Linux) our PID, recorded for an earlier process: a PID reused
        removed.append(partial("reused", me, {"host": host, "pid": me, "process": identity + "0"}))
    kept = [partial("no-owner", dead_pid, None),
            partial("alive", me, {"host": host, "pid": me, "process": identity}),
            partial("elsewhere", dead_pid, {"host": host + "-other", "pid": dead_pid, "process": None})]
    (work / f".notes.partial-{dead_pid}-xyz").write_text("not ours")
    (work / f".gone-owner-only.partial-{dead_pid}-89abcdef.owner").write_text("")  # killed while writing it

    merge_checkpoint(base, adapter, work / "out", progress=False)
    assert not any(p.exists() or Path(str(p) + ".owner").exists() for p in removed)
    assert not (work / f".gone-owner-only.partial-{dead_pid}-89abcdef.owner").exists()
    for p in kept:
        assert (p / "model.safetensors").read_bytes() == b"half written"
    assert (work / f".notes.partial-{dead_pid}-xyz").read_text() == "not ours"


# ---------------------------------------------------------------- symlinks in BASE
@pytest.mark.parametrize("where, target", [("sub/loop", ".."), ("self", "."), ("up", "../.."), ("sub/deep", "../sub")])
def test_folder_symlink_loop_is_one_short_error(ckpt, capsys, where, target):
    base, adapter = ckpt
    (base / "sub").mkdir()
    (base / "sub" / "notes.txt").write_text("x")
    os.symlink(target, base / where)
    before = snapshot(base)
    code = main(["merge", "--no-progress", str(base), str(adapter), str(base.parent / "out")])
    line = one_error_line(capsys.readouterr().err, "merge")
    assert code == 1
    assert f"the folder link {where} leads back to " in line and "(a symlink loop)" in line
    assert len(line) < 400
    assert not (base.parent / "out").exists() and leftovers(base.parent) == []
    assert snapshot(base) == before


def test_hugging_face_cache_symlinks_are_followed(ckpt):
    """A Hugging Face cache snapshot: every file a relative symlink to a blob elsewhere, in real
    folders. The merge reads through the links and OUT holds real files with the same bytes."""
    base, adapter = ckpt
    merge_checkpoint(base, adapter, base.parent / "plain", progress=False)
    (base / "original").mkdir()
    (base / "original" / "params.json").write_text('{"dim": 32}')
    blobs, snap = base.parent / "blobs", base.parent / "snapshots" / "abc123"
    blobs.mkdir()
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base)
        if p.is_dir():
            (snap / rel).mkdir(parents=True)
        else:
            blob = blobs / hashlib.sha256(p.read_bytes()).hexdigest()
            blob.write_bytes(p.read_bytes())
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    merge_checkpoint(snap, adapter, base.parent / "out", progress=False)
    out = base.parent / "out"
    assert all(not p.is_symlink() for p in out.rglob("*"))
    assert (out / "original" / "params.json").read_text() == '{"dim": 32}'
    got = snapshot(out)
    assert got.pop("original/params.json") and got == snapshot(base.parent / "plain")


# ---------------------------------------------------------------- modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_merge_output_modes_follow_the_umask(ckpt, umask):
    """Every file and folder merge writes has a new file's mode (0644 / 0755 under umask 022):
    a serving process running as another user must be able to read the merged checkpoint,
    whatever the modes in BASE (here a private tokenizer and folder)."""
    base, adapter = ckpt
    os.chmod(base / "tokenizer.json", 0o600)
    (base / "extra").mkdir(mode=0o700)
    (base / "extra" / "notes.txt").write_text("x")
    os.chmod(base / "extra" / "notes.txt", 0o640)
    (base / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(base / "run.sh", 0o755)
    old = os.umask(umask)
    try:
        merge_checkpoint(base, adapter, base.parent / "out", progress=False)
    finally:
        os.umask(old)
    out = base.parent / "out"
    modes = {str(p.relative_to(out.parent)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    want = {name: (0o777 if (out.parent / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == want
    assert len(modes) >= 8
