"""Atomic writes: a file or a directory appears complete or not at all.

Everything lmlab writes that a crash must not corrupt (checkpoints, tokenizers, token shards,
prepared corpora) goes through here: the content is written to a hidden temporary sibling,
fsynced, and renamed into place, because a rename within one filesystem is atomic. This module
is a leaf: it imports nothing of lmlab, so every stage (model/ included) may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path


def _check_replaceable(target: Path, overwrite: bool) -> None:
    if not os.path.lexists(target) or overwrite:
        return
    if target.is_dir() and not target.is_symlink():
        if not any(target.iterdir()):
            return
        raise FileExistsError(
            f"{target} exists and is not empty; refusing to replace it. Choose another path, or pass "
            "overwrite=True (--overwrite on the command line) to replace it and everything in it"
        )
    kind = "a symbolic link" if target.is_symlink() else "not a directory"
    raise FileExistsError(
        f"{target} exists and is {kind}; refusing to replace it. Choose another path, or pass "
        "overwrite=True to replace it"
    )


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, so the rename publishes data that is
    on disk (without this a power loss right after the rename can leave empty files)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes a rename durable on POSIX; Windows cannot open directories for it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with Linux renameat2(RENAME_EXCHANGE), so the target
    path never stops existing. False when this system or filesystem cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no glibc >= 2.28 (e.g. musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _replace(new: Path, target: Path) -> None:
    """Put the directory `new` at `target`, replacing whatever is there."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if _exchange(new, target):
        old = new  # after the swap the old contents live under the temporary name
    else:
        # Two renames: the target is missing for an instant. A crash exactly then leaves the old
        # checkpoint intact under the `.<name>.old-*` sibling, from where it can be renamed back.
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    _fsync_dir(target.parent)
    try:
        _remove(old)
    except OSError as e:  # the new checkpoint is in place; only cleanup failed
        warnings.warn(
            f"replaced {target}, but could not delete the old copy at {old}: {e}", stacklevel=3
        )


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to `path`; when the block succeeds, fsync what was
    written there and rename it to `path`, so readers see either the old directory or the new
    one, never a half-written one.

    An empty directory at `path` is replaced; anything else that exists there (an lmlab
    checkpoint included) is refused with FileExistsError unless overwrite=True, so a mistyped
    output path never destroys a checkpoint. Replacing is done on Linux by an atomic exchange,
    elsewhere by moving the old directory aside, renaming the new one in, then deleting the old.
    If the block raises, the temporary directory is deleted and `path` is left
    untouched. The temporary directory is a hidden sibling (`.<name>.tmp-*`) because a rename is
    only atomic within one filesystem; a process killed mid-write can leave one behind, which is
    safe to delete.
    """
    target = Path(path).absolute()
    _check_replaceable(target, overwrite)  # fail before any work is done
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _check_replaceable(target, overwrite)  # again: something may have appeared meanwhile
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", overwrite: bool = True) -> Iterator:
    """Open a temporary sibling of `path` for writing; when the block succeeds, flush, fsync and
    rename it to `path`. If the block raises, the temporary file is removed and `path` is left as
    it was. With overwrite=False an existing `path` is refused with FileExistsError."""
    target = Path(path).absolute()
    if not overwrite and os.path.lexists(target):
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
