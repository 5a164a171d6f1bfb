"""Local paths and object-store URLs (gs://BUCKET/DIR, or any scheme etils.epath reads)."""

import os
import shutil


def is_remote(path: object) -> bool:
    """Whether `path` names an object store (a URL with a scheme) rather than a local file."""
    return "://" in str(path)


def copy_tree(local_root: str, remote_root: str) -> None:
    """Copies every file under local_root to the same relative path under remote_root (a URL
    or a local path), for writers that can write local files only."""
    from etils import epath

    for folder, _, names in os.walk(local_root):
        for name in names:
            local = os.path.join(folder, name)
            remote = epath.Path(remote_root) / os.path.relpath(local, local_root)
            remote.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "rb") as src, remote.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
