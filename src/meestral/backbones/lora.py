"""Low-rank adapters (LoRA) on a backbone's block linears: how an adapted backbone ships.

    lora = LoRA(bb, rank=8, alpha=16)     # B = 0: the backbone computes exactly what it did
    ...train lora.parameters()...
    lora.save("adapter.safetensors")      # a few MiB: the A/B pairs + the base backbone's identity
    apply_adapter(bb2, "adapter.safetensors")  # checks bb2 is that base, merges W += s·B·A

Each target linear `W` (d_out x d_in) gets y = W x + s · B (A x) with A [r, d_in], B [d_out, r],
s = alpha / r. The delta is added by a forward hook on HF's own module, so no module is replaced
or forked, and `disabled()` turns every hook off: the same weights then give the original model
(adaptation's distillation teacher, without a second copy). Which linears get adapters is the
backbone adapter's `lora_targets` (transformer.py, ssm.py): the only place the architectures differ.

Merging is for loading: afterwards the weights are plain weights, so every path that reads
`.weight` directly (ssm.py's state-only `propagate` step) sees the adapted model too. Unmerged,
only module calls see the delta; that is all a training pass makes.

The file is safetensors: tensors `blocks.<i>.<target>.lora_A|lora_B`, metadata `meestral_lora`
(JSON: rank, alpha, targets, the base backbone's identity incl. its weights fingerprint, and
whatever the caller adds, e.g. the training config and step).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from meestral.errors import MeestralError

META_KEY = "meestral_lora"
MAX_FILE_BYTES = 16 * 2**20  # what one shipped adapter may weigh (the bar)


class LoRA(nn.Module):
    """Adapters on every `backbone.lora_targets` linear of every block, attached on creation."""

    def __init__(self, backbone, rank: int = 8, alpha: float | None = None, seed: int = 0, targets=None):
        super().__init__()
        if rank < 1:
            raise MeestralError(f"LoRA rank is {rank}: it must be a whole number >= 1")
        self.backbone = [backbone]  # a list: not a submodule (its weights are not ours to save)
        self.base_identity = backbone.identity()  # before any merge changes the weights
        self.rank, self.alpha = int(rank), float(alpha if alpha is not None else 2 * rank)
        self.scale = self.alpha / self.rank
        self.targets = tuple(targets or backbone.lora_targets)
        if not self.targets:
            raise MeestralError(f"backbone {backbone.name!r} ({backbone.arch}) names no LoRA targets")
        self.sites: list[tuple[int, str]] = [(i, t) for i in range(backbone.num_layers) for t in self.targets]
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        gen = torch.Generator().manual_seed(seed)
        for i, t in self.sites:
            lin = self._module(i, t)
            d_out, d_in = lin.weight.shape
            # A as nn.Linear's default init (uniform, fan-in scaled); B zero, so the delta starts at 0.
            bound = 1.0 / math.sqrt(d_in)
            a = (torch.rand(self.rank, d_in, generator=gen) * 2 - 1) * bound
            self.A.append(nn.Parameter(a.to(backbone.device)))
            self.B.append(nn.Parameter(torch.zeros(d_out, self.rank, device=backbone.device)))
        self._hooks: list = []
        self.enabled = True
        self.merged = False
        self.attach()

    def _module(self, i: int, target: str) -> nn.Linear:
        try:
            m = self.backbone[0].blocks[i].get_submodule(target)
        except AttributeError:
            raise MeestralError(f"block {i} of {self.backbone[0].name!r} has no module {target!r} "
                                "(the adapter was made for another architecture)") from None
        if not isinstance(m, nn.Linear):
            raise MeestralError(f"{target} in block {i} is a {type(m).__name__}, not a linear layer")
        return m

    # ---- the delta ----------------------------------------------------------------------------
    def _hook(self, k: int):
        def add_delta(_m, args, out):
            if not self.enabled:
                return None
            a, b = self.A[k], self.B[k]
            x = args[0]
            delta = nn.functional.linear(nn.functional.linear(x.to(a.dtype), a), b)
            return out + (self.scale * delta).to(out.dtype)
        return add_delta

    def attach(self) -> None:
        if self.merged:
            raise MeestralError("these adapters are merged into the weights already")
        if not self._hooks:
            self._hooks = [self._module(i, t).register_forward_hook(self._hook(k))
                           for k, (i, t) in enumerate(self.sites)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @contextlib.contextmanager
    def disabled(self):
        """The original model for the duration (the hooks stay registered, they add nothing)."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    @torch.no_grad()
    def merge(self) -> None:
        """W += s·B·A in every target, then drop the hooks: an ordinary backbone again."""
        if self.merged:
            return
        self.detach()
        for k, (i, t) in enumerate(self.sites):
            lin = self._module(i, t)
            delta = self.scale * (self.B[k].double() @ self.A[k].double())
            lin.weight.copy_((lin.weight.double() + delta.to(lin.weight.device)).to(lin.weight.dtype))
        self.merged = True
        bb = self.backbone[0]
        # The fingerprint samples a few weights only (Mamba-2's sample misses every target): mix
        # the adapter in, so heads or adapters made for the base refuse the adapted backbone.
        bb._fingerprint = hashlib.sha256((self.base_identity["fingerprint"] + self.digest()).encode()).hexdigest()[:16]

    # ---- files --------------------------------------------------------------------------------
    def tensors(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for k, (i, t) in enumerate(self.sites):
            out[f"blocks.{i}.{t}.lora_A"] = self.A[k].detach().to("cpu", dtype).contiguous()
            out[f"blocks.{i}.{t}.lora_B"] = self.B[k].detach().to("cpu", dtype).contiguous()
        return out

    def digest(self) -> str:
        return tensors_digest(self.tensors())

    def meta(self, **extra) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "backbone": self.base_identity, **extra}

    def save(self, path, dtype=torch.float32, **extra) -> dict:
        """Write the adapter file atomically; refuse one over MAX_FILE_BYTES (it would not ship)."""
        from safetensors.torch import save

        from meestral.files import atomic_write

        tensors = self.tensors(dtype)
        meta = self.meta(dtype=str(dtype).removeprefix("torch."), **extra)
        data = save(tensors, metadata={META_KEY: json.dumps(meta)})
        if len(data) > MAX_FILE_BYTES:
            raise MeestralError(f"the adapter would take {len(data) / 2**20:.1f} MiB, over the "
                                f"{MAX_FILE_BYTES // 2**20} MiB an adapter may ship with: lower --rank or export in bfloat16")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda t: t.write_bytes(data))
        return {"path": str(path), "bytes": len(data), "params": sum(t.numel() for t in tensors.values())}

    def check_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        """An adapter file's tensors are exactly the ones its metadata (this LoRA) implies."""
        if set(tensors) != {f"blocks.{i}.{t}.lora_{m}" for i, t in self.sites for m in "AB"}:
            raise MeestralError(f"{path} holds other tensors than its metadata describes: export it again")

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, (i, t) in enumerate(self.sites):
                self.A[k].copy_(tensors[f"blocks.{i}.{t}.lora_A"])
                self.B[k].copy_(tensors[f"blocks.{i}.{t}.lora_B"])

    def start_from(self, meta: dict, tensors: dict[str, torch.Tensor], path="the adapter") -> None:
        """Continue from an adapter file of rank r0 <= this rank (read_adapter's pair; its base
        checked by the caller): its A fills the first r0 rows, its B the first r0 columns rescaled
        by s0 / s, the rest keeps a fresh A and B = 0. The delta s·B·A then equals the file's, so
        step 0 of a continued run is the adapted model it starts from, and the extra rank gives
        the run room the file did not have."""
        r0, a0 = int(meta["rank"]), float(meta["alpha"])
        if tuple(meta["targets"]) != self.targets:
            raise MeestralError(f"{path} adapts {', '.join(meta['targets'])}, this run {', '.join(self.targets)}: "
                                "start from an adapter made for the same targets")
        if r0 > self.rank:
            raise MeestralError(f"{path} has rank {r0}, over this run's --rank {self.rank}: give --rank {r0} or more")
        self.check_tensors(tensors, path)
        ratio = (a0 / r0) / self.scale
        with torch.no_grad():
            for k, (i, t) in enumerate(self.sites):
                a, b = tensors[f"blocks.{i}.{t}.lora_A"], tensors[f"blocks.{i}.{t}.lora_B"]
                self.A[k][:r0].copy_(a.to(self.A[k].dtype))
                self.B[k].zero_()
                self.B[k][:, :r0].copy_(b.to(torch.float64) * ratio)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """16 hex digits naming a set of adapter tensors by content (names and float32 values)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter file, or one clear line saying why it cannot be read."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MeestralError(f"adapter file {path} does not exist: give the .safetensors that `meestral adapt` exported")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        int(meta["rank"]), float(meta["alpha"]), list(meta["targets"]), dict(meta["backbone"])
    except KeyError:
        raise MeestralError(f"{path} is not a MEEstral adapter (no {META_KEY} metadata): export one with `meestral adapt`") from None
    except Exception as e:
        raise MeestralError(f"{path} is not a readable adapter file ({type(e).__name__}): export it again") from None
    return meta, tensors


def check_base(meta: dict, backbone, path) -> None:
    """The adapter was trained on this very backbone (architecture, shapes and weights)."""
    ident, mine = meta["backbone"], backbone.identity()
    for key in ("arch", "num_layers", "hidden_size", "vocab_size", "fingerprint"):
        if ident.get(key) != mine[key]:
            raise MeestralError(
                f"adapter {path} was trained on backbone {ident.get('name')!r} ({key}={ident.get(key)}), not on "
                f"{mine['name']!r} ({key}={mine[key]}): load the backbone it was made for")


def load_adapter(backbone, path) -> LoRA:
    """The adapter in `path`, attached (unmerged) to `backbone` after checking it is its base."""
    meta, tensors = read_adapter(path)
    check_base(meta, backbone, path)
    lora = LoRA(backbone, rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=meta["targets"])
    lora.check_tensors(tensors, path)
    lora.load_tensors(tensors)
    return lora


def apply_adapter(backbone, path, name: str | None = None):
    """Merge the adapter file into `backbone` (in place) and return it, renamed `name` if given."""
    lora = load_adapter(backbone, path)
    lora.merge()
    if name:
        backbone.name = name
    return backbone
