"""The engine: runs the backbone's blocks for the decoder's policies, a segment at a time.

A *segment* is the run of blocks between two exit points (the last one ends at the last block).
The policies (policies.py, catchup.py) decide which rows run which segment, what the layers an
exited row skips receive, and read the exit decision between segments; the engine only runs
blocks. This eager engine calls the adapters block by block. A static-shape engine (CUDA graphs,
one captured graph per segment and window length) can replace it behind the same methods: every
argument is a fixed-shape tensor, and no method reads anything back to the host.
"""

from __future__ import annotations

import torch


class EagerEngine:
    def __init__(self, backbone, skip=frozenset()):
        self.bb = backbone
        self.skip = frozenset(skip)  # a pruned model: these blocks never run
        self.kept = [i for i in range(backbone.num_layers) if i not in self.skip]

    def new_state(self, batch_size: int, capacity: int):
        """The per-layer state of one generation (a fixed-shape engine reuses one per shape)."""
        return self.bb.new_state(batch_size, capacity)

    def segments(self, exit_points) -> list[list[int]]:
        """The blocks of each segment: up to and including each exit point, then to the last block."""
        bounds = list(exit_points) + [self.bb.num_layers - 1]
        out, lo = [], 0
        for hi in bounds:
            out.append([i for i in self.kept if lo <= i <= hi])
            lo = hi + 1
        return out

    def prefill(self, ids, state, step) -> torch.Tensor:
        """Every kept block over the prompt slots: the hidden states after the last block."""
        # From slot 0 the state is empty before this call: an adapter may fill it in one pass over
        # the prompt (Mamba-2: the chunked scan) instead of stepping token by token. (A prefill
        # may also continue a state from a later slot: verify's replay does.)
        step.memo["from_empty"] = step.start == 0
        h, _, _ = self.run(self.kept, self.bb.embed(ids), state, step)
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
        before this step) and are `live` [B, W]. Others keep their hidden state. Returns (window
        hidden states, aux of the last block, window before the last block)."""
        aux, prev = None, x
        for i in layers:
            need = (depth < i) & live
            prev = x
            out, aux = self.bb.forward_layer(i, x, state, step.written(need))
            x = torch.where(need[..., None], out.to(x.dtype), x)
        return x, aux, prev

    def fill_copy(self, layers, state, step) -> None:
        for i in layers:
            self.bb.fill_copy(i, state, step)

    def fill_propagate(self, layers, h, state, step) -> None:
        for i in layers:
            self.bb.fill_propagate(i, h, state, step)

    def logits(self, h) -> torch.Tensor:
        return self.bb.logits(h)
