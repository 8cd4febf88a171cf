"""Writing files so that a reader sees the old version or the new one, never a mix.

Each file (or a new folder, :func:`new_folder`) is written to a temporary beside its final name,
fsynced, then renamed over it (atomic on one file system). What a killed writer leaves behind is
temporaries named with its process id, removed by the next writer into the same folder once that
process is gone. Modes are as a plain ``open(path, "w")`` gives them (0644 under umask 022, so a
serving process running as another user can read an adapter); an overwritten file keeps its mode.

Guarantees hold for process kills (SIGKILL, OOM); after a power cut, only where the file system
orders the fsynced data before the rename (ext4 and xfs do).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["write_file", "write_files", "stage", "remove_stale_temporaries", "fsync_folder", "is_temporary",
           "process_identity", "process_gone", "new_folder", "claim_folder", "remove_stale_folders"]

_SUFFIX = ".tmp"
# .<final name>.<pid>.<random>.tmp
_TEMPORARY = re.compile(r"\.(?P<final>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def _write_all(handle, data: bytes) -> None:
    handle.write(data)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of this module's temporaries."""
    return _TEMPORARY.fullmatch(name) is not None


def stage(folder: str, final_name: str, data: bytes | Callable[[object], None]) -> str:
    """Write a temporary file beside ``folder/final_name``, fsynced, with the final file's mode;
    return its path. ``data``: the bytes, or a function writing them to a binary file handle."""
    final = os.path.join(folder, final_name)
    tmp = os.path.join(folder, f".{final_name}.{os.getpid()}.{secrets.token_hex(4)}{_SUFFIX}")
    try:
        mode = stat.S_IMODE(os.stat(final).st_mode)
    except FileNotFoundError:
        mode = None
    # O_EXCL: never write through a file (or symlink) someone else put at this name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            if callable(data):
                data(handle)
            else:
                _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_files(files: list[tuple[str, bytes]], root: str | None = None) -> None:
    """Write files atomically each, renamed in the order given once all are staged.

    Missing folders are created. Temporaries of killed writers are removed first: in ``root`` and
    its immediate sub-folders, or else in each file's folder. An exception before the renames
    leaves every final file and folder as it was, and no temporary.
    """
    finals = [os.path.abspath(os.fspath(path)) for path, _ in files]
    for folder in [root] if root is not None else dict.fromkeys(os.path.dirname(f) for f in finals):
        remove_stale_temporaries(os.fspath(folder), subfolders=root is not None)
    created: list[str] = []
    staged: list[tuple[str, str]] = []  # (temporary, final)
    try:
        for final, (_, data) in zip(finals, files):
            missing = folder = os.path.dirname(final)
            while not os.path.isdir(missing):  # remember what to remove on failure, deepest first
                created.append(missing)
                missing = os.path.dirname(missing)
            os.makedirs(folder, exist_ok=True)
            staged.append((stage(folder, os.path.basename(final), data), final))
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for folder in dict.fromkeys(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    for folder in dict.fromkeys(os.path.dirname(final) for _, final in staged):
        fsync_folder(folder)


def write_file(path: str | os.PathLike, data: bytes | Callable[[object], None]) -> None:
    """Write one file atomically (see the module docstring)."""
    write_files([(os.fspath(path), data)])


def fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every OS/file system lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def process_identity(pid: int) -> str | None:
    """Boot id and start time of process ``pid`` (Linux; None elsewhere). A later process given
    the same PID (common in containers, where every run starts with the same few PIDs) differs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return f"{boot}:{fields[19]}"  # field 22, starttime (fields count from 3 after the command name)
    except (OSError, IndexError):
        return None


def process_gone(pid: int, identity: str | None = None) -> bool:
    """Whether process ``pid`` has certainly stopped: no such process, or (given the
    :func:`process_identity` it had) the PID now belongs to a later process. False whenever that
    cannot be told (another user's process, no /proc), so nothing of a live writer is removed."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False  # alive as another user, or cannot tell
    now = process_identity(pid)
    return bool(identity and now and identity != now)


def remove_stale_temporaries(folder: str, *, subfolders: bool = False) -> list[str]:
    """Remove temporaries in ``folder`` left by writers that no longer run; returns their paths.
    With ``subfolders``, the immediate sub-folders too, and those that held nothing else (a killed
    save of a named adapter creates ``folder/<name>/``)."""
    removed: list[str] = []
    if not os.path.isdir(folder):
        return removed
    with os.scandir(folder) as it:
        items = list(it)
    for item in items:
        match = _TEMPORARY.fullmatch(item.name)
        if match and item.is_file(follow_symlinks=False) and process_gone(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(item.path)
                removed.append(item.path)
        elif subfolders and item.is_dir(follow_symlinks=False):
            inner = remove_stale_temporaries(item.path)
            removed += inner
            if inner:
                with contextlib.suppress(OSError):
                    os.rmdir(item.path)  # only succeeds when nothing else is in it
    return removed


# ---------------------------------------------------------------- folders
# A folder is written as ".<final name>.partial-<pid>-<random>", after "<that>.owner" naming the
# writing process was created. Nothing without an owner file of ours is ever removed.
_PARTIAL = re.compile(r"\..+\.partial-(?P<pid>\d+)-[0-9a-f]{8}")
_OWNER = ".owner"


def claim_folder(final: Path) -> tuple[Path, Path]:
    """Create the temporary folder for ``final`` and its owner file (first: a kill in between
    leaves an owner file alone, which the next writer removes); returns both."""
    tmp = final.parent / f".{final.name[:200]}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    owner = tmp.with_name(tmp.name + _OWNER)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "process": process_identity(os.getpid())}
    fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(info))
    try:
        tmp.mkdir()
    except BaseException:
        owner.unlink()
        raise
    return tmp, owner


def _owner_gone(owner: str, pid: int) -> bool:
    """Whether the writer that created ``owner`` has stopped; False whenever that cannot be told."""
    try:
        with open(owner, "rb") as handle:
            info = json.loads(handle.read(4096) or b"{}")  # empty: killed between creating and writing it
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("host", socket.gethostname()) != socket.gethostname():
        return False  # another machine's, on a shared file system: its processes cannot be seen from here
    return process_gone(pid, info.get("process"))


def remove_stale_folders(parent: str | os.PathLike) -> None:
    """Remove the temporary folders (and owner files) in ``parent`` of writers that were killed:
    owner file named as ours, a regular file of this user, naming a process that is gone."""
    with os.scandir(parent) as it:
        owners = [e for e in it if e.name.endswith(_OWNER) and _PARTIAL.fullmatch(e.name[: -len(_OWNER)])]
    for entry in owners:
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
                continue
            if not _owner_gone(entry.path, int(_PARTIAL.fullmatch(entry.name[: -len(_OWNER)])["pid"])):
                continue
            folder = Path(parent) / entry.name[: -len(_OWNER)]
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder)
            os.unlink(entry.path)  # last: a removal stopped midway is redone by the next writer


@contextlib.contextmanager
def new_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; when the block ends, it is fsynced and renamed to
    ``final`` (which must not exist). An exception in the block removes it and propagates."""
    final = Path(final)
    remove_stale_folders(final.parent)
    tmp, owner = claim_folder(final)
    try:
        yield tmp
        fsync_folder(str(tmp))
        os.rename(tmp, final)  # atomic on one file system
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
    fsync_folder(str(final.parent))
