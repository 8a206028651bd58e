"""Count the points where a training step would block the host on a GPU, on a CPU run.

On CUDA ``torch.cuda.set_sync_debug_mode`` reports synchronisations; on a CPU run nothing
synchronises, so this counter infers them from *where data lives*. It tracks which
tensors are host tensors (made from Python/NumPy data or by a factory without a
``device=``, or read back with ``.cpu()``/``.numpy()``), everything else being on the
training device, and counts, per step:

* ``d2h``: a device tensor read by the host — ``.cpu()``, ``.numpy()``, ``.tolist()``,
  ``.item()``, ``bool()/int()/float()`` of a tensor, ``x in tensor``, and any
  ``aten._local_scalar_dense`` below the Python API (e.g. inside a library);
* ``h2d_blocking``: a host tensor copied to the device with ``.to(device)``/``.cuda()``
  without ``non_blocking=True`` (CUDA synchronises the stream after such a copy);
* ``implicit_h2d``: a host tensor of ≥ 1 dimension used directly in an op with device
  tensors (e.g. indexing a device tensor with host indices: a hidden blocking copy);
* ``data_dependent``: ops whose output size depends on device values — ``aten.nonzero``,
  ``masked_select``, ``unique``, boolean-mask indexing (the host must learn the size).

``h2d_async`` (a ``non_blocking=True`` copy) is recorded but is not a synchronisation.
Each event keeps the innermost frame of the project (or of the library that made it) so
a failing count says where the new synchronisation is.

Limits (documented in docs/performance.md): ``.to(torch.device("cpu"))`` on a device
tensor reads as a no-op (the project writes ``.cpu()``); syncs inside C++ kernels that do
not pass through the dispatcher (none known in CPU/CUDA training) are not seen.
"""

from __future__ import annotations

import os
import traceback
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_KINDS = ("d2h", "h2d_blocking", "implicit_h2d", "data_dependent")

_FACTORIES = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.arange, torch.empty, torch.zeros, torch.ones,
              torch.full, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye, torch.randperm}
_D2H_METHODS = {"cpu", "numpy", "tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__contains__"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "argwhere", "nonzero_static"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


#: The checkout this file lies in (``tests/..``): sites are named relative to it, wherever it is cloned.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep


def _relative(path: str) -> str:
    """``instalign/losses/matcher.py`` for a file of this checkout, ``pkg/x.py`` for an installed one."""
    path = os.path.abspath(path)
    return path[len(_REPO):] if path.startswith(_REPO) else path.rsplit("/site-packages/", 1)[-1]


def _where() -> str:
    """The innermost frame outside torch and this file: the line that asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if "host_sync_counter" in f or "/torch/" in f:
            continue
        return f"{_relative(f)}:{frame.lineno}"
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and not self.counter.is_host(args[0]) and not self.counter.in_api:
            self.counter.record("d2h", f"aten.{name}")
        elif name in _DATA_DEPENDENT and not all(self.counter.is_host(t) for t in _tensors(args)):
            self.counter.record("data_dependent", f"aten.{name}")
        elif name in ("index", "index_put", "index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) and not self.counter.is_host(t)
                   for t in indices):
                self.counter.record("data_dependent", f"aten.{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


class HostSyncCounter(TorchFunctionMode):
    """Context manager; ``events`` lists ``(kind, what, where)``; ``syncs`` counts the sync kinds."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self._host: dict[int, weakref.ref] = {}  # id → weakref (tensors compare by value, not identity)
        self._mark(list(host_tensors), host=True)
        self.events: list[tuple[str, str, str]] = []
        self.in_api = False
        self._dispatch = _Dispatch(self)

    # --- bookkeeping ----------------------------------------------------------------------
    def is_host(self, t) -> bool:
        ref = self._host.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def _mark(self, out, host: bool) -> None:
        for t in _tensors(out):
            if host:
                self._host[id(t)] = weakref.ref(t)
            else:
                self._host.pop(id(t), None)

    def record(self, kind: str, what: str) -> None:
        self.events.append((kind, what, _where()))

    @property
    def syncs(self) -> int:
        return sum(1 for kind, _, _ in self.events if kind in SYNC_KINDS)

    def summary(self) -> Counter:
        return Counter((kind, where) for kind, _, where in self.events)

    def __enter__(self):
        super().__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        return super().__exit__(*exc)

    # --- the Python API -------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        args_t = list(_tensors(args)) + list(_tensors(kwargs))
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None

        if func in _FACTORIES and not (src is not None and not self.is_host(src)):
            out = func(*args, **kwargs)
            self._mark(out, host=kwargs.get("device") is None)
            return out
        if src is not None and name in ("to", "cuda") and (name == "cuda" or _device_arg(args[1:], kwargs)):
            out = func(*args, **kwargs)
            if self.is_host(src):
                self.record("h2d_async" if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True)
                            else "h2d_blocking", f"Tensor.{name}")
                if out is src:  # a CPU no-op: keep the host tensor's own mark apart from the "device" copy
                    out = src.clone()
            self._mark(out, host=False)
            return out
        if src is not None and name in _D2H_METHODS:
            if not self.is_host(src):
                self.record("d2h", f"Tensor.{name}")
            self.in_api = True
            try:
                out = func(*args, **kwargs)
            finally:
                self.in_api = False
            if out is src:  # a CPU no-op: the "host copy" must not mark the device tensor itself
                out = src.clone()
            self._mark(out, host=True)
            return out

        out = func(*args, **kwargs)
        host = [self.is_host(t) for t in args_t]
        if args_t and all(host):
            self._mark(out, host=True)
        elif any(h and t.dim() > 0 for h, t in zip(host, args_t)):
            self.record("implicit_h2d", name)
        return out


def _device_arg(args, kwargs) -> bool:
    """Whether a ``Tensor.to`` call names a device (not only a dtype)."""
    if "device" in kwargs:
        return True
    return bool(args) and isinstance(args[0], (torch.device, str))


__all__ = ["HostSyncCounter", "SYNC_KINDS"]
