"""The Backbone interface: a frozen HF causal LM driven one block at a time.

Everything above this layer (heads, decoder, training, evaluation) talks to a `Backbone` and never
branches on the architecture. The two adapters (`transformer.py`, `ssm.py`) mirror each other
method for method.

Positions and slots
-------------------
Decoding works on a batch of rows that advance together one *slot* per step (left padding aligns
the prompts). `Step` names the slots a call covers: `start .. start+length`, the per-row
rotary positions (slot minus the row's left padding) and a per-row/per-token `write` mask saying
which (row, slot) pairs really belong to this call. A masked pair leaves the layer's state as it
was: that is how padding, rows that already exited and (later) per-row backlogs are expressed
without changing tensor shapes, which keeps a static-shape / CUDA-graph path open.

State
-----
`new_state` returns per-layer state buffers of fixed shape (K/V slots for attention, conv + SSM
tensors for Mamba). They are updated in place by `forward_layer`; `snapshot`/`restore` copy the
layers and rows asked for, so speculative work can be undone exactly.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from meestral.backbones.gemv import module_linear  # one decoded row: a Triton GEMV on CUDA


@dataclass
class StepShared:
    """What every layer of one step shares, computed once by the adapter and shared with the
    `rows()` / `written()` variants of the same step: recomputing masks and rotary tables per
    layer was a visible share of GPU decode time."""

    slots: torch.Tensor | None = None  # [T] the slot indices on the device (the fixed path's)
    from_empty: bool = False  # the state is empty before this step (a prompt pass from slot 0):
    #                           an adapter may fill it in one pass (Mamba-2: the chunked scan)
    rope: dict = field(default_factory=dict)  # Transformer: dtype -> the rotary (cos, sin)
    mask: torch.Tensor | None = None  # Transformer: every layer's attention mask, when small enough
    mask_parts: tuple | None = None  # Transformer: (valid, causal, own) to build one layer's mask
    # Self-speculation on a recurrent backbone: every layer's state after each slot this step
    # writes is also kept in `history` (Backbone.new_history), so that a rejected draft can be
    # undone by restoring the state after the last accepted slot. None: not kept.
    history: object = None


@dataclass
class Step:
    """The slots one call covers, for every row of the batch."""

    start: int  # first slot
    positions: torch.Tensor  # [B, T] rotary position of each (row, slot)
    write: torch.Tensor  # [B, T] bool: this (row, slot) is part of the call
    shared: StepShared = field(default_factory=StepShared, repr=False, compare=False)
    # [B, T] bool: the (row, slot) pairs of this step that attention may see in *every* layer
    # (default: `write`). Variants that write fewer pairs in some layers keep the step's own, so
    # one mask serves all layers: a pair a layer does not write there either already holds that
    # layer's state (catch-up) or belongs to a row whose output the caller discards.
    visible: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.visible is None:
            self.visible = self.write

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    def rows(self, mask: torch.Tensor) -> "Step":
        """The same slots, written only for rows where `mask` [B] is true."""
        return self.written(self.write & mask[:, None])

    def written(self, write: torch.Tensor) -> "Step":
        """The same slots, writing the (row, slot) pairs of `write` [B, T]."""
        return Step(self.start, self.positions, write, self.shared, self.visible)

    @property
    def slots(self) -> torch.Tensor:
        """[T] long on the device: the slot indices this step covers. The fixed-shape layer path
        (`forward_layer_fixed`) indexes with it instead of the host's `start`, so that a captured
        CUDA graph stays valid at every slot."""
        if self.shared.slots is None:
            self.shared.slots = torch.arange(self.length, device=self.positions.device) + self.start
        return self.shared.slots


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor | None) -> None:
    """dst[rows] = src[rows] for a 1-D tensor of row indices (None: every row). By index, not by a
    boolean mask: a mask would need its true count on the host (a device sync) to index."""
    if rows is None:
        dst.copy_(src)
    else:
        dst.index_copy_(0, rows, src.index_select(0, rows))


def rms_norm(x, w, eps):
    """HF's RMSNorm (Llama/Mistral and Mamba alike), op for op: float32 variance, the scale
    applied in the input dtype. For the fixed path's pure functions, which take weights, not modules."""
    dt = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dt)


_COMPILED: dict = {}


def plain(fn):
    """The fixed path's kernels as written (eager); `compiled` is the other choice an engine makes."""
    return fn


def compiled(fn):
    """torch.compile(fn), made once per function and shared by every backbone and layer.

    The recompile limit is raised because a decode meets a few shapes per function (window
    lengths 1..max_backlog+1, a few attention key ranges, batch sizes): past the default limit
    dynamo would silently fall back to eager code."""
    if fn not in _COMPILED:
        import torch._dynamo

        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        if hasattr(cfg, "accumulated_cache_size_limit"):
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 512)
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


@dataclass
class LayerCost:
    """Static cost of one block for one token (context-dependent attention work excluded)."""

    params: int  # weights read when the block runs
    flops: float  # 2 * multiply-adds in the block's matmuls and scans
    propagate_params: int  # weights read by the `propagate` policy's state-only step
    propagate_flops: float


class Backbone(ABC):
    """A frozen causal LM, runnable block by block. Subclasses: TransformerBackbone, SSMBackbone."""

    arch: str  # "mistral" | "llama" | "mamba" | "mamba2"
    family: str  # "transformer" | "ssm"

    def __init__(self, model, tokenizer, name: str):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self._fingerprint: str | None = None

    # ---- shapes ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head_module.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lm_head_module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_module.weight.dtype

    # ---- the modules each adapter exposes --------------------------------------------------
    @property
    @abstractmethod
    def blocks(self) -> list: ...

    @property
    @abstractmethod
    def embedding(self) -> torch.nn.Embedding: ...

    @property
    @abstractmethod
    def norm_module(self) -> torch.nn.Module: ...

    @property
    def lm_head_module(self) -> torch.nn.Linear:
        return self.model.lm_head

    @property
    @abstractmethod
    def trunk(self) -> torch.nn.Module:
        """The HF model under the LM head (blocks + final norm): what a training pass runs."""

    # The linear layers inside one block that adaptation (meestral.backbones.lora) puts adapters on, as
    # paths relative to the block. Each adapter file names its own; nothing else differs.
    lora_targets: tuple[str, ...] = ()

    # ---- compute ---------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm_module(h.to(self.dtype) if h.dtype != self.norm_module.weight.dtype else h)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return module_linear(self.lm_head_module, h.to(self.lm_head_module.weight.dtype))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on any layer's hidden state (the 'logit lens')."""
        return self.lm_head(self.final_norm(h))

    def draft_logits(self, h: torch.Tensor, rows: int) -> torch.Tensor:
        """The logit lens over the LM head's first `rows` rows only (speculate's trimmed draft
        head): a view of the weight, read in part; equal to `logits(h)[..., :rows]`."""
        head = self.lm_head_module
        w = head.weight
        bias = None if head.bias is None else head.bias[:rows]
        return torch.nn.functional.linear(self.final_norm(h).to(w.dtype), w[:rows], bias)

    @abstractmethod
    def new_state(self, batch_size: int, capacity: int):
        """Empty per-layer state for `batch_size` rows and up to `capacity` slots."""

    @abstractmethod
    def forward_layer(self, i: int, h: torch.Tensor, state, step: Step):
        """Run block i on h [B, T, d]; update its state for the written (row, slot) pairs.

        Returns (h_out, aux): aux is an extra feature for exit heads (Mamba: the mixer output),
        or None.
        """

    # ---- the fixed-shape path (graph_engine.py) ---------------------------------------------
    # The same computations as forward_layer / fill_copy / fill_propagate, written so that every
    # shape and every index is fixed for a given (batch, window length, `keys`): slots come from
    # `step.slots` (a device tensor), never from `step.start`, and attention reads the first
    # `keys` slots of the cache. A CUDA graph captured once then serves every step. The recurrent
    # adapters' ordinary methods already are fixed-shape: these defaults call them. `kernel` is
    # how the caller wants the pure per-layer functions run: `plain`, or `compiled` (the graph
    # engine on CUDA: one torch.compile serves every layer of a shape, since the weights are
    # arguments, and inductor fuses the elementwise work between the matmuls).
    def fixed_context(self, layers, h: torch.Tensor, state, step: Step, keys: int | None):
        """What the layers of one fixed-shape call share, computed once at its start (None: nothing)."""
        return None

    def forward_layer_fixed(self, i: int, h: torch.Tensor, state, step: Step, keys: int | None, ctx=None,
                            kernel=plain):
        return self.forward_layer(i, h, state, step)

    def fill_copy_fixed(self, i: int, state, step: Step, kernel=plain) -> None:
        self.fill_copy(i, state, step)

    def fill_copy_layers_fixed(self, layers, state, step: Step, kernel=plain) -> None:
        """`fill_copy_fixed` of each of `layers`; an adapter may fill them all in one call."""
        for i in layers:
            self.fill_copy_fixed(i, state, step, kernel)

    def fill_propagate_fixed(self, i: int, h: torch.Tensor, state, step: Step, keys: int | None, ctx=None,
                             kernel=plain) -> None:
        self.fill_propagate(i, h, state, step)

    def state_keys(self, state) -> int | None:
        """Slots a fixed-shape attention call could read (None: the state has no slots)."""
        return None

    def reset_state(self, state) -> None:
        """Make a state from new_state empty again, in place (a graph holds its addresses)."""
        for i in range(self.num_layers):
            for t in self.layer_tensors(state, i):
                t.zero_()

    @abstractmethod
    def fill_copy(self, i: int, state, step: Step) -> None:
        """`copy` policy for a skipped layer i (one slot): Transformer copies the previous slot's
        K/V into this slot; Mamba leaves the state untouched (the token is invisible to it)."""

    @abstractmethod
    def fill_propagate(self, i: int, h: torch.Tensor, state, step: Step) -> None:
        """`propagate` policy: feed the exit hidden state h [B, T, d] to layer i only to produce
        its state (Transformer: K/V projections; Mamba: one state step, no output)."""

    @abstractmethod
    def layer_tensors(self, state, i: int) -> list[torch.Tensor]:
        """The tensors holding layer i's state, batch first (views into `state`)."""

    # Whether `fill_copy` changes the state (K/V slots are copied; a recurrent state is left as it is).
    fills_on_copy: bool = True

    # Whether `truncate` can cut a layer's state back to a slot exactly (K/V slots can be
    # dropped; a recurrent state cannot: it is restored from a snapshot and replayed instead).
    can_truncate: bool = False

    def truncate(self, state, keep: torch.Tensor, rows: torch.Tensor) -> None:
        """Forget slots >= keep[b] in every layer, for rows b where `rows` [B] bool is true."""
        raise NotImplementedError(f"{self.arch} states cannot be truncated: restore a snapshot")

    def snapshot(self, state, layers=None):
        """A copy of the given layers' state (all when None) that `restore` puts back exactly."""
        layers = range(self.num_layers) if layers is None else layers
        return {i: [t.clone() for t in self.layer_tensors(state, i)] for i in layers}

    def restore(self, state, snap, rows: torch.Tensor | None = None) -> None:
        """Put a snapshot back into the state; with `rows` (row indices), only for those rows."""
        for i, saved in snap.items():
            for live, old in zip(self.layer_tensors(state, i), saved):
                _copy_rows(live, old, rows)

    def update_snapshot(self, snap, state, rows: torch.Tensor | None = None) -> None:
        """Overwrite a snapshot with the live state (only `rows`, row indices, when given), without
        reallocating."""
        for i, saved in snap.items():
            for live, old in zip(self.layer_tensors(state, i), saved):
                _copy_rows(old, live, rows)

    # ---- per-slot history (self-speculation: decoding/speculate.py) ---------------------------
    def new_history(self, batch_size: int, positions: int):
        """Room for every layer's state after each of `positions` consecutive slots (slot modulo
        `positions`), filled by steps whose `shared.history` is it; None where the state already
        is positional (K/V slots: a later slot's write never changes an earlier one's)."""
        return None

    def restore_history(self, state, history, index: torch.Tensor) -> None:
        """Every layer's state back to what it was after the slot kept at `index` (a [1] long
        tensor on the device: slot modulo the history's positions), for every row."""

    @staticmethod
    def snapshot_nbytes(snap) -> int:
        return sum(t.numel() * t.element_size() for ts in snap.values() for t in ts)

    @abstractmethod
    def layer_cost(self, i: int) -> LayerCost: ...

    @abstractmethod
    def attention_flops(self, i: int, context: int) -> float:
        """Context-dependent FLOPs of block i for one token that sees `context` positions."""

    def aux_dim(self) -> int:
        """Width of forward_layer's aux feature (0 when none)."""
        return 0

    # ---- identity --------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of a deterministic sample of the weights.

        Values are rounded to bf16 first so the same checkpoint loaded in fp32 or bf16, on CPU
        or GPU, gives the same fingerprint; a different checkpoint of the same shape does not.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            samples = [self.embedding.weight[:64], self.norm_module.weight]
            samples += [next(iter(self.blocks[i].parameters())) for i in (0, self.num_layers - 1)]
            for t in samples:
                t = t.detach().reshape(-1)[:65536].to("cpu", torch.bfloat16).view(torch.int16)
                h.update(t.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def identity(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint(),
        }

    # ---- reference path and whole-sequence features -----------------------------------------
    @torch.no_grad()
    def full_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """The HF model's own full forward (the exactness reference)."""
        return self.model(input_ids=ids).logits

    def block_outputs(self, hidden_states, layers) -> dict:
        """{layer: block `layer`'s raw output} from HF's `output_hidden_states` tuple.

        The one place that knows the tuple's layout, which HF changes between releases. Seen:
        Mistral/Llama put the embeddings first (emb, block 0 .. block L-2, normed final); Mamba
        and Mamba-2 up to transformers 5.24 have no embeddings entry (block 0 .. block L-1, normed
        final); Mamba-2 from 5.25 on follows Mistral's layout. Both have L+1 entries, so the
        layout is read off the model once (`_hidden_offset`), not off the length or the version.
        Block L-1's raw output is not in every layout: layers must be < L-1.
        """
        n, L = len(hidden_states), self.num_layers
        if n != L + 1:
            raise RuntimeError(f"HF returned {n} hidden states for {L} blocks, expected {L + 1}")
        first = self._hidden_offset()
        out = {}
        for l in layers:
            if not 0 <= l < L - 1:
                raise ValueError(f"block_outputs: layers must lie in [0, {L - 2}], got {l}")
            out[l] = hidden_states[l + first]
        return out

    def _hidden_offset(self) -> int:
        """1 when entry 0 of HF's hidden states is the embeddings, else 0: one 2-token forward,
        remembered per backbone."""
        if getattr(self, "_hidden_offset_seen", None) is None:
            ids = torch.tensor([[1, 2]], device=self.device)
            with torch.no_grad():
                first = self.model(input_ids=ids, output_hidden_states=True).hidden_states[0]
                self._hidden_offset_seen = int(torch.equal(first, self.embed(ids).to(first.dtype)))
        return self._hidden_offset_seen

    def _aux_module(self, layer: int):
        """Module whose forward output is block `layer`'s aux feature (None: no aux)."""
        return None

    @torch.no_grad()
    def collect(self, ids: torch.Tensor, layers, attention_mask=None, aux: bool = False, logits_at=None):
        """One HF full forward over whole sequences (training, evaluation): returns
        ({layer: hidden [B,T,d]}, {layer: aux [B,T,d]} or {}, final logits [B,T,V]).

        Uses HF's own fast paths (SDPA with a causal mask, Mamba's chunked scan), so it is what
        training and teacher-forced scoring should call; `forward_layer` is for decoding.
        Layers must be < L-1: HF normalises the last entry of its hidden states. `logits_at` (a 1-D
        tensor of positions) limits the final logits to those positions: the LM head over every
        position is most of the cost of scoring a few continuation tokens with a large vocabulary.
        """
        layers = list(layers)
        if any(not 0 <= l < self.num_layers - 1 for l in layers):
            raise ValueError(f"collect: layers must lie in [0, {self.num_layers - 2}], got {layers}")
        return self._collect(ids, layers, attention_mask, aux, logits_at)

    def _collect(self, ids, layers, attention_mask, aux, logits_at):
        """`collect` through HF's own forward (an adapter may substitute an equal, faster pass)."""
        auxes, hooks = {}, []
        if aux:
            for l in layers:
                def keep(_m, _inp, out, l=l):
                    auxes[l] = out[0] if isinstance(out, tuple) else out
                hooks.append(self._aux_module(l).register_forward_hook(keep))
        try:
            extra = {} if logits_at is None else {"logits_to_keep": logits_at}
            out = self.model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        finally:
            for h in hooks:
                h.remove()
        return self.block_outputs(out.hidden_states, layers), auxes, out.logits

    def train_forward(self, ids: torch.Tensor, layers=(), skip: torch.Tensor | None = None):
        """A whole-sequence pass with autograd on (adaptation trains through it): ({layer: block
        output [B,T,d]} for `layers`, final-normed hidden [B,T,d]).

        `skip` [L, B] bool drops block i for the rows where it is true (its output is its input):
        layer dropout. Unlike `collect`, layers may include L-1 and no logits are made: the caller
        applies the LM head a few rows at a time (the vocabulary dominates memory).
        """
        want, outs, hooks = set(layers), {}, []
        for i, block in enumerate(self.blocks):
            if i not in want and skip is None:
                continue

            def after(_m, args, kwargs, out, i=i):
                h = out[0] if isinstance(out, tuple) else out
                if skip is not None:
                    x = args[0] if args else kwargs["hidden_states"]
                    h = torch.where(skip[i].to(h.device)[:, None, None], x.to(h.dtype), h)
                if i in want:
                    outs[i] = h
                return (h, *out[1:]) if isinstance(out, tuple) else h

            hooks.append(block.register_forward_hook(after, with_kwargs=True))
        try:
            final = self.trunk(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        return {l: outs[l] for l in layers}, final

    def make_step(self, start: int, length: int, pad: torch.Tensor, write: torch.Tensor | None = None,
                  slots: torch.Tensor | None = None) -> Step:
        """Step over slots [start, start+length) for rows whose prompts were left-padded by `pad` [B];
        `slots` [length]: the same slots already on the device (work captured once and replayed at
        other slots computes them from a device tensor)."""
        if slots is None:
            slots = torch.arange(start, start + length, device=pad.device)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        if write is None:
            write = slots[None, :] >= pad[:, None]
        return Step(start, positions, write, StepShared(slots=slots))  # the fixed path's slots: made once
