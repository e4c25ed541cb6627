"""Whole-checkpoint saves: a save directory holds one complete save, the previous one or the new
one, whatever moment a crash comes.

The new files are written into a temporary sibling directory, synced, and then swapped with the
old directory in one step (Linux renameat2 with RENAME_EXCHANGE). Files in the directory that
the save does not write (a tokenizer, a README, another format's files) are carried into the new
directory as hard links. Where the exchange is not available the old directory is first renamed
aside; a crash between the two renames leaves it there, and the next save or load puts it back.
Leftovers of crashed saves are removed by the next save."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from typing import Callable, Dict

_TMP = ".reslora-tmp-"  # a save being written
_OLD = ".reslora-old-"  # the previous save, renamed aside (no exchange available)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _siblings(target: str, tag: str):
    parent, base = os.path.split(target)
    prefix = "." + base + tag
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths atomically; False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"reslora: cannot swap {b!r} with the new save {a!r}: {os.strerror(err)}")


def recover(target: str) -> None:
    """Completes what a crashed save left: puts the previous save back if the directory is
    missing, and removes temporary directories of unfinished saves."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        return
    old = _siblings(target, _OLD)
    if old and not os.path.exists(target):
        os.rename(old[-1], target)
        old = old[:-1]
    for path in _siblings(target, _TMP) + old:
        shutil.rmtree(path, ignore_errors=True)


def _carry(src: str, dst: str) -> None:
    """dst becomes src's content, by hard links where the file system has them."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        os.mkdir(dst)
        for name in os.listdir(src):
            _carry(os.path.join(src, name), os.path.join(dst, name))
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def write_checkpoint(save_directory: str, files: Dict[str, Callable[[str], None]]) -> None:
    """Writes files[name](path) for every name into save_directory as one save."""
    target = os.path.abspath(save_directory)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"reslora: save_directory must be a directory, got the file {save_directory!r}")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover(target)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(target) + _TMP, dir=parent)
    try:
        for name, write in files.items():
            path = os.path.join(tmp, name)
            write(path)
            _fsync(path)
        if os.path.isdir(target):
            for name in os.listdir(target):
                if name not in files:
                    _carry(os.path.join(target, name), os.path.join(tmp, name))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a save is not
        _fsync(tmp)
        if not os.path.exists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # the previous save, now under the temporary name
        else:
            old = os.path.join(parent, os.path.basename(tmp).replace(_TMP, _OLD, 1))
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_writer(obj) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)

    return write


def safetensors_writer(tensors, metadata) -> Callable[[str], None]:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return lambda path: save_file(tensors, path, metadata=metadata)
