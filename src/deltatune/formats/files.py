"""Files written all at once, with the permissions a plain ``open()`` would give them.

:func:`write_folder` lets a writer fill a temporary sibling folder and then swaps it whole for the
old one (one ``renameat2(RENAME_EXCHANGE)`` on Linux), so a crash leaves the old folder or the new
one, never a mix; :func:`write_file` does the same for one file, and :func:`read_folder` reads
several files of a folder as one version of it while writers swap it. Adapters (:mod:`deltatune.formats.io`,
:mod:`deltatune.formats.peft.convert`) and everything the training harness writes go through them. Files get
``0o666 & ~umask`` and folders ``0o777 & ~umask``, not the private modes of temporary files
(safetensors >= 0.8 writes through a ``0o600`` temporary file; ``tempfile.mkdtemp`` makes ``0o700``
folders).
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and, for a folder, everything under it) the mode a plain ``open()`` or
    ``mkdir()`` would have given it: ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders.

    Writers that go through temporary files create them private (``tempfile.mkdtemp``: 0o700;
    safetensors >= 0.8: 0o600, https://github.com/safetensors/safetensors/issues/782), and a rename
    keeps that mode: other users could not read a saved adapter or a merged model.
    """
    mask = _umask()
    root = Path(path)
    for p in [root, *(root.rglob("*") if root.is_dir() and not root.is_symlink() else ())]:
        if p.is_symlink():
            continue
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_folder(
    folder: str | os.PathLike[str], write: Callable[[Path], object], *, keep_others: bool = True
) -> Path:
    """Let ``write(tmp)`` fill a temporary sibling folder, then swap it for ``folder`` whole.

    ``folder`` holds the old contents or the new ones at every moment, whatever kills the process
    (on Linux the two folders are exchanged in one ``renameat2(RENAME_EXCHANGE)``; elsewhere the old
    folder is renamed away and the new one in, which leaves a moment without ``folder``). Entries of
    an existing ``folder`` that ``write`` did not produce are carried over (hard links, else copies),
    unless ``keep_others`` is False (then the folder is replaced whole: an export, a merged model).
    Everything written gets :func:`normal_permissions`, except that a replaced file, and the folder
    itself, keep the mode they had. Files are flushed to disk before the swap.

    A process killed mid-way leaves at most a hidden ``.<name>.<pid>.*`` sibling (the new contents not
    yet swapped in, or the old ones not yet deleted), never a mixed ``folder``; the next write of
    ``folder`` deletes the siblings of processes that no longer run (:func:`remove_leftovers`).
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):  # a swap would not need it
        raise PermissionError(errno.EACCES, "the folder is read-only; nothing was written", str(folder))
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder.parent, f".{folder.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", dir=folder.parent))
    try:
        write(tmp)
        normal_permissions(tmp)
        _sync_tree(tmp)
        if not folder.exists():
            os.replace(tmp, folder)
        else:
            if keep_others:
                _carry_over(folder, tmp)
            tmp.chmod(stat.S_IMODE(folder.stat().st_mode))
            if not _exchange(tmp, folder):
                aside = tmp.with_name(tmp.name + ".old")
                os.rename(folder, aside)
                try:
                    os.rename(tmp, folder)
                except BaseException:
                    os.rename(aside, folder)
                    raise
                tmp = aside
            shutil.rmtree(tmp, ignore_errors=True)  # the old contents
        _sync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_leftovers(parent: Path, prefix: str) -> list[Path]:
    """Delete the temporary siblings ``<prefix><pid>.*`` in ``parent`` that a killed write left: those
    whose process ``pid`` no longer runs (a running writer's, or one whose pid is unknown, stay).
    Returns what was deleted."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts: it may be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``). False where the
    system or the file system cannot; an ``OSError`` for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc, or a libc before glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _carry_over(old: Path, new: Path) -> None:
    """Give ``new`` the entries of ``old`` it lacks (hard links, else copies), and each file it
    replaces the mode that file had."""
    for entry in sorted(old.iterdir()):
        target = new / entry.name
        if target.exists() or target.is_symlink():
            if target.is_file() and entry.is_file() and not entry.is_symlink():
                target.chmod(stat.S_IMODE(entry.stat().st_mode))
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _sync_tree(root: Path) -> None:
    """Flush every file under ``root`` (and the folders) to disk: a swap must not outrun its data."""
    for p in [*(root.rglob("*") if root.is_dir() else ()), root]:
        if p.is_symlink():
            continue
        if p.is_dir():
            _sync_dir(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: How many times :func:`read_folder` starts again when the folder is replaced while it reads.
READ_ATTEMPTS = 50


def read_folder(folder: str | os.PathLike[str], names: Sequence[str]) -> dict[str, bytearray | None]:
    """The contents of the files ``names`` in ``folder`` (None for one that is not there), all of one
    version of the folder, however often a writer replaces it meanwhile.

    The writers here never change a folder in place: :func:`write_folder` fills a new one and swaps
    it in whole. So every file is opened through one open handle of the folder (``dir_fd``): each
    read sees the folder as it was when it was opened, even if it is swapped out and deleted while
    it is read (an open file keeps its contents). A file missing from a folder that is no longer the
    one at ``folder`` (deleted after the swap before it was opened) means "replaced": the read starts
    again, up to :data:`READ_ATTEMPTS` times. Where the system has no ``dir_fd`` (Windows), the
    folder's identity (device, inode) is compared before and after instead.

    Raises:
        ValueError: ``folder`` is replaced on every attempt (a writer saving it in a tight loop).
        OSError: ``folder`` cannot be opened or read (does not exist, no permission, not a folder).
    """
    folder = Path(folder)
    for _ in range(READ_ATTEMPTS):
        found = _read_once(folder, names) if os.open in os.supports_dir_fd else _read_by_path(folder, names)
        if found is not None:
            return found
    raise ValueError(
        f"{folder} was replaced while being read, {READ_ATTEMPTS} times in a row (is a process saving "
        "it in a loop?); read it again when the writer has finished"
    )


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _read_once(folder: Path, names: Sequence[str]) -> dict[str, bytearray | None] | None:
    """One attempt through a folder handle; None: the folder was replaced under it."""
    dir_fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        out: dict[str, bytearray | None] = {}
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            except FileNotFoundError:
                if _replaced(folder, os.fstat(dir_fd)):
                    return None
                out[name] = None
                continue
            with os.fdopen(fd, "rb") as f:
                out[name] = _read_all(f)
        return out
    finally:
        os.close(dir_fd)


def _read_by_path(folder: Path, names: Sequence[str]) -> dict[str, bytearray | None] | None:
    """One attempt by path, checked by the folder's identity before and after; None: replaced."""
    before = folder.stat()
    out: dict[str, bytearray | None] = {}
    for name in names:
        try:
            with (folder / name).open("rb") as f:
                out[name] = _read_all(f)
        except FileNotFoundError:
            out[name] = None
    return None if _replaced(folder, before) else out


def _read_all(f: io.BufferedReader) -> bytearray:
    """A file's whole contents in one writable buffer (read into it: no second copy)."""
    buf = bytearray(os.fstat(f.fileno()).st_size)
    with memoryview(buf) as view:
        got = 0
        while got < len(buf):
            k = f.readinto(view[got:])
            if not k:
                break
            got += k
    del buf[got:]
    buf += f.read()  # (a file that grew since its size was read)
    return buf


def _replaced(folder: Path, held: os.stat_result) -> bool:
    """Whether ``folder`` now names another folder than the one ``held`` describes."""
    try:
        return _identity(folder.stat()) != _identity(held)
    except FileNotFoundError:  # (between the two renames of a swap where there is no exchange)
        return True


def write_file(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Let ``write(tmp)`` write a temporary sibling of ``path`` (same suffix, so writers that go by
    it, such as matplotlib, see the right one), flush it, then rename it over ``path``: ``path`` is
    the old file or the new one, never a part. A new file gets :func:`normal_permissions`, a replaced
    one keeps its mode. The writer of every file the harness writes (metrics.json, curves.png,
    trained.safetensors)."""
    path = Path(path).resolve()
    if path.is_dir():
        raise ValueError(f"{path} exists and is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, f".{path.stem}.")
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if path.is_file():
            tmp.chmod(stat.S_IMODE(path.stat().st_mode))
        else:
            normal_permissions(tmp)
        _sync_tree(tmp)
        os.replace(tmp, path)
        _sync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_files(
    folder: Path, files: Mapping[str, Callable[[Path], None]], *, keep_others: bool = True
) -> None:
    """Write ``files`` (name -> writer(path), e.g. :func:`json_writer`) into ``folder`` all at once
    (``keep_others``: see :func:`write_folder`)."""

    def write(tmp: Path) -> None:
        for name, writer in files.items():
            writer(tmp / name)

    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder.resolve()} exists and is not a folder")
    write_folder(folder, write, keep_others=keep_others)


def check_out(out: str | os.PathLike[str], *, overwrite: bool, what: str) -> Path:
    """The one rule of every command that writes a folder or file ``out``: a new path, or an empty
    folder, is written; an existing one only with ``overwrite`` (then it is replaced whole, never
    mixed with what was there). ``what`` names the writer in the error (``"deltatune export"``)."""
    path = Path(out)
    occupied = path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))
    if occupied and not overwrite:
        raise ValueError(
            f"{what}: {path} already exists; pass --overwrite (overwrite=True in Python) to replace it "
            "whole, or choose another --out"
        )
    return path


def json_writer(data: Mapping[str, Any]) -> Callable[[Path], None]:
    """A writer of ``data`` as sorted, indented JSON (for :func:`write_files`)."""

    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


def tensors_writer(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Callable[[Path], None]:
    """A writer of ``tensors`` as a safetensors file (for :func:`write_files`)."""

    def write(path: Path) -> None:
        save_file({k: _plain(v) for k, v in tensors.items()}, str(path), metadata=metadata)

    return write


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns a storage safetensors can read: a view into memory Python
    cannot reach (FSDP2's gathered parameters) is copied."""
    out = tensor.detach().contiguous().cpu()
    try:
        out.untyped_storage().data_ptr()
    except RuntimeError:
        out = out.clone()
    return out
