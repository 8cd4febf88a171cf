"""Every writer survives the same kill test: ``save_adapter``, the trainer callback's save and the
offline merge, each SIGKILLed before every file-system change it makes.

A writer's file-system changes are counted with an audit hook (``sys.addaudithook``: every open
for writing, rename/replace, mkdir, remove, rmdir, chmod, copy under the destination). The N-th
kills the process, for every N. After each kill every unit the writer produces (an adapter folder,
the Trainer's weights file, a merged checkpoint) must hold exactly its old content or exactly its
new content; an adapter folder whose two files come from different saves (killed between its two
renames) counts only if ``load_adapter`` refuses it. The next write must then finish, hold the new
content, and leave no temporaries of the killed one behind.

Killing costs a process each time: the writes run in children forked from one server process that
imported torch and transformers but ran no torch op (so forking is safe), which keeps a kill about
as cheap as the write itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import minilora
from minilora import atomic
from minilora.peft_format import AdapterFileError, safetensors_bytes

pytest.importorskip("transformers")

WRITERS = ["save_adapter", "trainer_callback", "offline_merge"]
# writer -> the units it writes, relative to the destination folder ("/" at the end: a folder)
UNITS = {"save_adapter": ["adapter/"],
         "trainer_callback": ["checkpoint-1/adapter/", "checkpoint-1/model.safetensors"],
         "offline_merge": ["out/"]}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(emb=nn.Embedding(32, 16), proj=nn.Linear(16, 24), head=nn.Linear(24, 8)))


def _injected(seed: int) -> nn.Module:
    # lora_alpha differs too, so that the two saves' configs differ
    return minilora.inject(_model(seed), target_modules=["emb", "proj"], modules_to_save=["head"], r=4,
                           lora_alpha=8 + seed, init_lora_weights=False)


def _prepare_source(src: Path) -> None:
    """The offline merge's input: a base checkpoint and an adapter for it."""
    (src / "base").mkdir(parents=True)
    state = {k: v.detach().clone() for k, v in _model(1).state_dict().items()}
    (src / "base" / "model.safetensors").write_bytes(safetensors_bytes(state, {"format": "pt"}))
    (src / "base" / "config.txt").write_text("a side file, copied into OUT")
    minilora.save_adapter(_injected(1), src / "adapter")


def write(writer: str, dest: Path, src: Path, seed: int) -> None:
    """One write by ``writer`` into ``dest``: the content depends on ``seed`` only."""
    if writer == "save_adapter":
        minilora.save_adapter(_injected(seed), dest / "adapter")
    elif writer == "trainer_callback":
        from minilora.training import SaveAdapterCallback
        args = SimpleNamespace(output_dir=str(dest), should_save=True)
        SaveAdapterCallback(slim_trainer_checkpoint=True).on_save(args, SimpleNamespace(global_step=1), None,
                                                                  model=_injected(seed))
    else:
        if (dest / "out").exists():  # (a kill after the final rename left it complete)
            shutil.rmtree(dest / "out")
        if seed == 1:  # the old content of OUT is no OUT
            from minilora.offline_merge import merge_checkpoint
            merge_checkpoint(src / "base", src / "adapter", dest / "out")


# ---------------------------------------------------------------- the kill server (a subprocess)
_WRITE_EVENTS = {"os.rename": 1, "os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.chmod": 0,
                 "shutil.copyfile": 1, "shutil.rmtree": 0}  # event -> which argument is the path written


def _written(event: str, args: tuple) -> object:
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        return path if writes else None
    return args[_WRITE_EVENTS[event]] if event in _WRITE_EVENTS else None


def _child(writer: str, dest: Path, src: Path, kill_at: int) -> None:
    torch.set_num_threads(1)
    root, count = str(dest) + os.sep, 0

    def hook(event: str, args: tuple) -> None:
        nonlocal count
        path = _written(event, args)
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(root):
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), 9)

    sys.addaudithook(hook)
    write(writer, dest, src, seed=1)
    (dest.parent / "events").write_text(str(count))


def serve(writer: str, dest: str, src: str) -> None:
    """Read kill points from stdin; for each, fork a child that writes and is killed at that
    point; answer "killed" or "finished"."""
    import minilora.offline_merge  # noqa: F401 -- everything imported before the first fork
    from minilora.training import SaveAdapterCallback  # noqa: F401
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                _child(writer, Path(dest), Path(src), int(line))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("killed" if os.WIFSIGNALED(status) else f"finished {os.waitstatus_to_exitcode(status)}", flush=True)


# ---------------------------------------------------------------- the test
def _is_leftover(rel: str) -> bool:
    return any(atomic.is_temporary(part) or ".partial-" in part for part in rel.split("/"))


def snapshot(dest: Path) -> dict[str, bytes]:
    files = (p for p in dest.rglob("*") if p.is_file())
    return {rel: p.read_bytes() for p in files if not _is_leftover(rel := p.relative_to(dest).as_posix())}


def leftovers(dest: Path) -> list[str]:
    return sorted(rel for p in dest.rglob("*") if _is_leftover(rel := p.relative_to(dest).as_posix()))


def _unit(snap: dict[str, bytes], unit: str) -> dict[str, bytes]:
    return {k: v for k, v in snap.items() if (k.startswith(unit) if unit.endswith("/") else k == unit)}


def _refused(folder: Path) -> bool:
    try:
        minilora.load_adapter(_model(0), folder)
    except AdapterFileError as err:
        return "saved together with another" in str(err)
    return False


@pytest.mark.parametrize("writer", WRITERS)
def test_a_killed_writer_leaves_old_or_new_and_the_next_write_cleans_up(tmp_path, writer):
    src, dest = tmp_path / "src", tmp_path / "dest"
    _prepare_source(src)

    def reset() -> None:  # the destination holds the old content
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        write(writer, dest, src, seed=0)

    reset()
    old = snapshot(dest)
    write(writer, dest, src, seed=1)
    new = snapshot(dest)
    for unit in UNITS[writer]:
        assert _unit(old, unit) != _unit(new, unit), unit
    refused = 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-c", f"import test_writers_killed as t; t.serve({writer!r}, "
                               f"{str(dest)!r}, {str(src)!r})"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)

    def run(kill_at: int) -> str:
        server.stdin.write(f"{kill_at}\n")
        server.stdin.flush()
        return server.stdout.readline().strip()

    try:
        reset()
        assert run(0) == "finished 0"  # count the points: a write that is never killed
        assert snapshot(dest) == new and leftovers(dest) == []
        points = int((tmp_path / "events").read_text())
        assert points >= 4
        for kill_at in range(1, points + 1):
            reset()
            assert run(kill_at) == "killed", kill_at
            state = snapshot(dest)
            for unit in UNITS[writer]:
                got = _unit(state, unit)
                if got not in (_unit(old, unit), _unit(new, unit)):
                    assert unit.endswith("adapter/") and _refused(dest / unit), (kill_at, unit, sorted(got))
                    refused += 1
            write(writer, dest, src, seed=1)  # the next write finishes and removes what the kill left
            assert snapshot(dest) == new, kill_at
            assert leftovers(dest) == [], kill_at
        assert refused <= len(UNITS[writer])  # at most one kill point per adapter folder: between its renames
    finally:
        server.stdin.close()
        server.wait(timeout=60)
