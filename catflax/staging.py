"""Writing a folder or file in full before it replaces an earlier one: the new one is written
beside the target (a hidden `.NAME.export-*` folder or file in the same directory) and renamed
into place only once complete, so a failed or interrupted write leaves the earlier one as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator


def _new_mode(path: str, default: int) -> int:
    """The permission bits of `path` if it exists, else `default` less the umask (what a plain
    makedirs or open would give; mkdtemp and mkstemp make 0o700 and 0o600)."""
    if os.path.exists(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return default & ~umask


@contextlib.contextmanager
def staged_dir(out: str) -> Iterator[str]:
    """A fresh folder beside `out` to write into. On success it takes `out`'s place (an earlier
    `out` is moved aside first and deleted after); on an error it is deleted and `out` stays as
    it was."""
    target = os.path.realpath(out)  # a link to a folder: the folder is replaced
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
    try:
        yield staging
        os.chmod(staging, _new_mode(target, 0o777))
        if not os.path.isdir(target):
            os.rename(staging, target)
            return
        old = staging + ".old"
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str) -> Iterator[str]:
    """A temporary file name beside `path` to write into; on success that file replaces `path`
    (os.replace), on an error it is deleted and `path` stays as it was."""
    target = os.path.realpath(path)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.export-", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _new_mode(target, 0o666))
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, tmp + ".tmp"):  # io.write_safetensors writes NAME.tmp, renames it
            if os.path.exists(leftover):
                os.remove(leftover)
