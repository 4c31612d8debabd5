"""Counting blocking host reads: every call that makes the host wait for a tensor's value.

On a GPU each of these is a device sync (the host stalls until the queued kernels have run):
`.item()`, `.tolist()`, `bool()` / `int()` / `float()` / `operator.index()` of a tensor (an `if
tensor:` included), `.cpu()`, `.numpy()`, `nonzero`, and indexing or assigning through a boolean
mask (its number of true entries decides the result's shape). On the CPU nothing stalls, so the
reads are counted, never timed: `HostReads` patches those entry points of `torch.Tensor` while it
is active. Reads made by libraries under us (Hugging Face blocks) count too: they would stall a
GPU just the same.
"""

import torch

_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")


def _has_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReads:
    """with HostReads() as reads: ...; reads.count is the number of blocking host reads made."""

    def __init__(self):
        self.count = 0
        self.where: dict[str, int] = {}
        self._saved = {}

    def _hit(self, what):
        self.count += 1
        self.where[what] = self.where.get(what, 0) + 1

    def __enter__(self):
        T = torch.Tensor
        for name in _METHODS + ("__getitem__", "__setitem__"):
            self._saved[name] = T.__dict__.get(name)
        for name in _METHODS:
            orig = getattr(T, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                self._hit(_name)
                return _orig(t, *a, **k)

            setattr(T, name, counted)
        get, put = T.__getitem__, T.__setitem__

        def getitem(t, index):
            if _has_mask(index):
                self._hit("mask index")
            return get(t, index)

        def setitem(t, index, value):
            if _has_mask(index):
                self._hit("mask assign")
            return put(t, index, value)

        T.__getitem__, T.__setitem__ = getitem, setitem
        self._nonzero = torch.nonzero

        def nonzero(*a, **k):
            self._hit("torch.nonzero")
            return self._nonzero(*a, **k)

        torch.nonzero = nonzero
        return self

    def __exit__(self, *exc):
        T = torch.Tensor
        for name, orig in self._saved.items():
            if orig is None:
                delattr(T, name)
            else:
                setattr(T, name, orig)
        torch.nonzero = self._nonzero
        return False
