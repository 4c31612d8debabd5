"""The engine: everything the decoder's policies ask of the backbone, a segment at a time.

A *segment* is the run of blocks between two exit points (the last one ends at the last block).
The policies (slot_policies.py, catchup.py, verify.py) decide which rows run which segment, what
the layers an exited row skips receive, and read the exit decision between segments; they never
call the backbone themselves. The engine makes the steps, embeds, runs blocks and the LM head, and
snapshots, restores or truncates states. This eager engine calls the adapters block by block; the
fixed-shape engine (graph_engine.py: CUDA graphs, one captured call per segment and window length)
replaces it behind the same methods: every argument is a fixed-shape tensor, and no method reads
anything back to the host.
"""

from __future__ import annotations

import torch

from meestral.backbones.base import Step


class EagerEngine:
    capture = False  # whether calls are captured as CUDA graphs (the graph engine on CUDA)
    chunk_steps = False  # whether full-depth greedy steps run in chunks (full_chunk.py): where capturing
    # whether steps with data-dependent exits run in chunks, their exit decisions taken on the device
    # (`when`; slot_policies.py): where captured graphs can branch
    decides_on_device = False
    first_calls = 0  # the graph engine counts its first calls of a shape (compile, capture); none here
    failed_captures = 0  # and the captures that failed (those calls run eagerly); none here

    def __init__(self, backbone, skip=frozenset()):
        self.bb = backbone
        self.skip = frozenset(skip)  # a pruned model: these blocks never run
        self.kept = [i for i in range(backbone.num_layers) if i not in self.skip]

    # ---- what the policies need to know of the backbone ---------------------------------------
    @property
    def num_layers(self) -> int:
        return self.bb.num_layers

    @property
    def hidden_size(self) -> int:
        return self.bb.hidden_size

    @property
    def device(self) -> torch.device:
        return self.bb.device

    @property
    def can_truncate(self) -> bool:
        """States can forget slots exactly (K/V); otherwise (recurrent) rollbacks need snapshots."""
        return self.bb.can_truncate

    def segments(self, exit_points) -> list[list[int]]:
        """The blocks of each segment: up to and including each exit point, then to the last block."""
        bounds = list(exit_points) + [self.bb.num_layers - 1]
        out, lo = [], 0
        for hi in bounds:
            out.append([i for i in self.kept if lo <= i <= hi])
            lo = hi + 1
        return out

    # ---- steps and state -------------------------------------------------------------------
    def new_state(self, batch_size: int, capacity: int):
        """The per-layer state of one generation (a fixed-shape engine reuses one per shape)."""
        return self.bb.new_state(batch_size, capacity)

    def make_step(self, start: int, length: int, pad: torch.Tensor, write: torch.Tensor | None = None,
                  at: torch.Tensor | None = None) -> Step:
        """Slots [start, start+length) for rows left-padded by `pad` [B]; `write` [B, length]
        (default: the slots past each row's padding) says which (row, slot) pairs the call writes.
        `at` [1]: the first slot as a device tensor, for work captured once and replayed at other
        slots (`sequence`): the slots and positions are then computed from it on the device."""
        slots = None if at is None else at + torch.arange(length, device=at.device)
        return self.bb.make_step(start, length, pad, write, slots)

    def sequence(self, key, fn, inputs: dict, start: int, length: int):
        """fn(inputs): a run of engine calls with no host read in it (speculate's cycle). The
        eager engine just runs it; the graph engine captures it whole (graph_engine.py). `start`
        and `length` bound the slots it touches."""
        return fn(inputs)

    def note(self, msg: str) -> None:
        """A one-line message about how calls run (the graph engine's captures); none here."""

    def when(self, pred: torch.Tensor, fn) -> None:
        """fn() where the 0-dim bool `pred` is true. Inside a captured sequence the graph engine
        makes this a branch of the graph, decided on the device at each replay; here the host
        reads pred. fn must leave what follows it in buffers made before the branch (a branch
        that does not run leaves its own tensors unwritten)."""
        if bool(pred):
            fn()

    def snapshot(self, state):
        return self.bb.snapshot(state)

    def update_snapshot(self, snap, state, rows: torch.Tensor | None = None) -> None:
        self.bb.update_snapshot(snap, state, rows)

    def restore(self, state, snap, rows: torch.Tensor | None = None) -> None:
        self.bb.restore(state, snap, rows)

    def truncate(self, state, keep: torch.Tensor, rows: torch.Tensor) -> None:
        self.bb.truncate(state, keep, rows)

    def new_history(self, state, batch_size: int, positions: int):
        """Per-slot history for `state` (Backbone.new_history; None for positional K/V states)."""
        return self.bb.new_history(batch_size, positions)

    def restore_history(self, state, history, index: torch.Tensor) -> None:
        self.bb.restore_history(state, history, index)

    def state_capacity(self, capacity: int) -> int:
        """The slots a state made for `capacity` holds (a fixed-shape engine rounds up, so that
        nearby lengths share a state and its graphs): what per-slot buffers kept with the state
        must hold too, so that every generation on that state finds them at the same shape."""
        return capacity

    def scratch(self, state, name: str, shape, dtype, fill) -> torch.Tensor:
        """A generation's own device buffer, filled with `fill` (catch-up's backlog). A fixed-shape
        engine keeps one per (state, name), so that captured work finds it at the same address."""
        return torch.full(tuple(shape), fill, dtype=dtype, device=self.device)

    # ---- running blocks ----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bb.embed(ids)

    def prefill(self, ids, state, pad, start: int = 0) -> torch.Tensor:
        """Every kept block over tokens ids [B, T] placed at slots start.. (rows left-padded by
        `pad`): the hidden states after the last block. From slot 0 the state is empty before
        this call, so an adapter may fill it in one pass over the prompt (Mamba-2: the chunked
        scan) instead of stepping token by token; a later `start` continues a state."""
        step = self.make_step(start, ids.shape[1], pad)
        step.shared.from_empty = start == 0
        h, _, _ = self.run(self.kept, self.embed(ids), state, step)
        return h

    def run(self, layers, h, state, step, exit_h=None, skipped=None):
        """Blocks `layers` on h [B, T, d]; rows in `skipped` [B] are fed `exit_h` at every block
        instead (the `propagate` policy, and the last block under `through_last_layer`). Returns
        (output, aux of the last block, input of the last block)."""
        aux, prev = None, h
        for i in layers:
            x = h if exit_h is None else torch.where(skipped[:, None, None], exit_h.to(h.dtype), h)
            prev = h
            h, aux = self.bb.forward_layer(i, x, state, step)
        return h, aux, prev

    def window(self, layers, x, state, step, depth, live):
        """Catch-up: blocks `layers` over a window of slots x [B, W, d]; block i runs the (row,
        slot) pairs that lack it (depth [B, W] < i, the deepest block each slot has been through
        before this step) and are `live` [B, W]. Others keep their hidden state. depth None: every
        live pair lacks every block of `layers` (catch-up's cycle, whose slots stand at one depth),
        and the pairs not live come out with any hidden state (the caller keeps none of them).
        Returns (window hidden states, aux of the last block, window before the last block)."""
        return window_layers(lambda i, x, st: self.bb.forward_layer(i, x, state, st), layers, x, step, depth, live)

    def fill_copy(self, layers, state, step) -> None:
        for i in layers:
            self.bb.fill_copy(i, state, step)

    def fill_propagate(self, layers, h, state, step) -> None:
        for i in layers:
            self.bb.fill_propagate(i, h, state, step)

    def logits(self, h) -> torch.Tensor:
        return self.bb.logits(h)

    def draft_logits(self, h, rows: int) -> torch.Tensor:
        return self.bb.draft_logits(h, rows)


def window_layers(forward, layers, x, step, depth, live):
    """The loop of `EagerEngine.window` (the graph engine's too), with forward(i, x, step) ->
    (block i's output, aux). Every kernel here runs once per block of a catch-up window, between
    the block's big kernels, so the masks are made once per window: which pairs need each block in
    one comparison for all of them, and none at all where depth is None (every live pair needs every
    block: no mask to make, no hidden state to keep, a block's output is the window's)."""
    aux, prev = None, x
    if depth is None:
        st = step.written(live.contiguous())  # a row mask expanded over the window (stride 0): the kernels index it densely
        for i in layers:
            prev = x
            out, aux = forward(i, x, st)
            x = out.to(x.dtype)
        return x, aux, prev
    layers = list(layers)
    if layers and layers == list(range(layers[0], layers[0] + len(layers))):
        at = torch.arange(layers[0], layers[0] + len(layers), device=depth.device)
        needs = (depth[None] < at[:, None, None]) & live[None]  # [blocks, B, W]
    else:
        needs = [(depth < i) & live for i in layers]
    for k, i in enumerate(layers):
        need = needs[k]
        prev = x
        out, aux = forward(i, x, step.written(need))
        x = torch.where(need[..., None], out.to(x.dtype), x)
    return x, aux, prev
