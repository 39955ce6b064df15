"""Keep `torch._dynamo` unimported in a rank that compiles nothing (`train.compile` off).

Importing dynamo costs each rank 1.5-2.5 s of CPU at start-up (`python benchmarks/startup.py`), and
a rank that never compiles imports it only to mark functions "never compile this":
- torch's optimizers wrap `add_param_group`, `zero_grad` and `state_dict` in
  `torch._disable_dynamo`, which imports dynamo at the first call to resolve the marker;
- DeepSpeed marks its ZeRO-3 hooks and collectives with `torch.compiler.disable`, which imports
  dynamo when it decorates, and more functions with `torch._disable_dynamo`.

While dynamo is not imported nothing can be compiling, so such a function may simply run. After
`defer()` each of these markers calls the function directly until dynamo is imported (by anyone,
for any reason); from then on it resolves to dynamo's real disabled function, as torch would have
at the first call, and caches that. So a later `torch.compile` still never traces into them.
"""

from __future__ import annotations

import functools
import gc
import sys
import types

import torch
import torch._compile
import torch.compiler

_ATTR = "__dynamo_disable"  # where torch's `_disable_dynamo` wrapper caches its resolved function
_installed = False


class _Deferred:
    """Seeded into `fn.__dynamo_disable`: torch's wrapper calls it instead of importing dynamo."""

    __slots__ = ("fn", "recursive")

    def __init__(self, fn, recursive: bool):
        self.fn, self.recursive = fn, recursive

    def __call__(self, *args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return self.fn(*args, **kwargs)
        import torch._dynamo

        real = torch._dynamo.disable(self.fn, self.recursive, wrapping=False)
        setattr(self.fn, _ATTR, real)  # what torch's wrapper would have cached
        return real(*args, **kwargs)


def _seed(fn, recursive: bool) -> None:
    if getattr(fn, _ATTR, None) is None:
        try:
            setattr(fn, _ATTR, _Deferred(fn, recursive))
        except (AttributeError, TypeError):  # a builtin or a slotted callable: torch's way
            pass


def defer() -> int:
    """Install the deferral for this process (idempotent); the number of existing markers seeded.
    A no-op once dynamo is imported, or on a torch whose `_disable_dynamo` looks different."""
    global _installed
    if "torch._dynamo" in sys.modules or _installed:
        return 0
    real_lazy = torch._compile._disable_dynamo
    code = real_lazy(lambda: None).__code__
    if code.co_freevars != ("fn", "recursive"):
        return 0

    seeded = 0  # the markers made when torch (and anything else) was imported
    for obj in gc.get_objects():
        if type(obj) is types.FunctionType and obj.__code__ is code:
            fn, recursive = (cell.cell_contents for cell in obj.__closure__)
            _seed(fn, recursive)
            seeded += 1

    def lazy_disable(fn=None, recursive=True):
        if fn is None:
            return functools.partial(lazy_disable, recursive=recursive)
        wrapped = real_lazy(fn, recursive)
        if "torch._dynamo" not in sys.modules:
            _seed(fn, recursive)
        return wrapped

    real_disable = torch.compiler.disable

    @functools.wraps(real_disable)
    def disable(fn=None, recursive=True, *, reason=None):
        if "torch._dynamo" in sys.modules:
            return real_disable(fn, recursive, reason=reason)
        return lazy_disable(fn, recursive)

    torch._compile._disable_dynamo = lazy_disable
    torch._disable_dynamo = lazy_disable
    torch.compiler.disable = disable
    _installed = True
    return seeded
