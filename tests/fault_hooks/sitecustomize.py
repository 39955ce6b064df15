"""Test-only fault injection, for tests that start real processes (`pretrain` and the Ray workers it
starts): a directory holding this file first on PYTHONPATH makes every Python process import it at
start-up. With `PRETRAIN_TEST_FAIL_WRITES=<glob>` set, a `torch.save` to a path matching the glob
(DeepSpeed writes every checkpoint file with it) writes the first half of the file and then fails
with EIO, as a failing disk does. In-process tests call `fail_saves` directly. Nothing in the
project imports this module."""

from __future__ import annotations

import errno
import fnmatch
import importlib.abc
import importlib.util
import io
import os
import sys

ENV = "PRETRAIN_TEST_FAIL_WRITES"


def _failing(save, pattern: str):
    def patched(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and fnmatch.fnmatch(os.fspath(f), pattern):
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(f))
        return save(obj, f, *args, **kwargs)

    return patched


def fail_saves(pattern: str):
    """Make `torch.save` to files matching `pattern` fail with EIO; returns the undo."""
    import torch

    real = torch.save
    torch.save = _failing(real, pattern)
    return lambda: setattr(torch, "save", real)


class _PatchTorchOnImport(importlib.abc.MetaPathFinder):
    """Patches torch.save right after `import torch`, in whichever process imports it."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.save = _failing(module.save, self.pattern)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get(ENV):
    sys.meta_path.insert(0, _PatchTorchOnImport(os.environ[ENV]))
