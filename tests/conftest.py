"""Test setup: every test sees 8 fake CPU devices (set before jax is imported)."""

import os
import shutil
import tempfile

import pytest
from fsspec.implementations.local import LocalFileSystem

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, made by the first pytest process and
# inherited by the xdist workers and the `catflax.main` subprocesses the run tests start (they
# compile the same tiny models again and again); removed when that process ends (~80 MB).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="catflax-jax-cache-")
    os.environ["CATFLAX_TEST_CACHE_OWNER"] = str(os.getpid())
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    # A size limit turns on the cache's file lock: tests run in parallel (pytest -n 2) and the
    # processes they start read and write the cache at once.
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)

import jax

import catflax  # noqa: F401  (applies catflax's XLA:CPU flag defaults before jax starts)

jax.config.update("jax_default_matmul_precision", "highest")


# The longest files first (minutes each: the demo, the process-level runs, the benches), so that
# pytest -n 2 starts them at once and the short tests fill in around them, instead of one worker
# finishing a long run alone at the end. Otherwise the collection order.
_LONG_FIRST = ("test_demo.py", "test_train_multiprocess.py", "test_train_run.py", "test_bench.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return _LONG_FIRST.index(name) if name in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


def pytest_unconfigure(config):
    if os.environ.get("CATFLAX_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# gs:// stood in for by a local folder: registered with fsspec under the gs/gcs protocols (what
# etils.epath uses for gs:// without TensorFlow; gcsfs in production).


class FakeGCS(LocalFileSystem):
    """gs://BUCKET/PATH -> ROOT/BUCKET/PATH on the local disk."""

    root = "/nonexistent"
    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix) :]).rstrip("/")
        return super()._strip_protocol(path)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setattr(FakeGCS, "root", str(tmp_path / "gcs"))
    for name in FakeGCS.protocol:
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    return tmp_path / "gcs"
