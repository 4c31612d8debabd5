"""The fixed-shape engine: every segment captured once as a CUDA graph, then replayed.

Batch-1 decoding on a GPU is bound by reading weights, yet the eager engine spends most of a step
launching small kernels from Python. `GraphEngine` has the eager engine's methods and results, but
runs each call through a *captured call*: static input buffers, and a body that reads only them
and the generation's state. A call is identified by what fixes its shapes (the blocks, the batch
size, the window length, the attention key range, the variant), so one capture serves every step
and every generation of that shape:

- the body uses the backbones' fixed-shape methods (`forward_layer_fixed` and friends): slots come
  from a device tensor, attention reads the first `keys` slots of the cache (the filled part
  rounded up to a power of two), masks and rotary tables are made on the device at the call's
  start, no host read anywhere;
- the state of a generation is allocated once per (batch size, capacity) and reset in place, so
  the addresses a graph recorded stay valid;
- the first call of a shape runs eagerly (its real result, and the warm-up capture needs), then
  the body is captured with `torch.cuda.CUDAGraph`; later calls copy their inputs into the
  buffers and replay. Where capture fails the call stays eager and one line says so.

Off CUDA (or with `capture=False`) calls replay by running the body again on the static buffers:
the same data flow as a graph, which is what the CPU tests check against the eager engine. The
prompt pass (one call per generation, many tokens) stays eager.

A call's outputs are its buffers: valid until the same call runs again (the policies consume a
step's outputs within the step, and catch-up copies its window into the backlog).
"""

from __future__ import annotations

import sys

import torch

from meestral.backbones.base import Step
from meestral.decoding.engine import EagerEngine


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


# Tests set this so that calls without capture return the same output buffers at every replay,
# as graphs do: a caller that keeps a call's output past its next replay is then caught on a CPU.
ALIAS_OUTPUTS_WITHOUT_CAPTURE = False


class CapturedCall:
    """One shape of one engine call: static inputs, the body over them, the graph once captured."""

    def __init__(self, body, inputs: dict, step: Step | None):
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.step = None
        if step is not None:
            # A step whose attention sees exactly what it writes (the usual case) keeps one buffer
            # for both: a copy fewer per call. Whether it does is part of the call's key.
            write = step.write.clone()
            visible = write if step.visible is step.write else step.visible.clone()
            self.step = Step(None, step.positions.clone(), write, {}, visible)
            self.step.memo["slots"] = step.slots.clone()  # the only memo entry: a buffer, refilled per call
        self.body = lambda: body(self.inputs, self.step)
        self.graph = None
        self.outputs = None

    def load(self, inputs: dict, step: Step) -> None:
        for k, v in inputs.items():
            self.inputs[k].copy_(v)
        if step is None:
            return
        self.step.positions.copy_(step.positions)
        self.step.write.copy_(step.write)
        if self.step.visible is not self.step.write:
            self.step.visible.copy_(step.visible)
        self.step.memo["slots"].copy_(step.slots)

    def first(self, capture: bool, stream, note):
        """Run eagerly (the real result), then capture the body for the next calls."""
        if not capture:
            out = self.body()
            if ALIAS_OUTPUTS_WITHOUT_CAPTURE:
                self.outputs = tuple(None if t is None else t.clone() for t in out)
            return out
        main = torch.cuda.current_stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):  # warm up where the capture will run (cuBLAS workspaces)
            out = self.body()
        main.wait_stream(stream)
        for t in out:
            if t is not None:
                t.record_stream(main)
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                self.outputs = self.body()
            self.graph = g
        except Exception as e:  # noqa: BLE001 - any capture failure leaves this call eager
            self.graph, self.outputs = None, None
            note(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                 "this call runs eagerly")
        return out

    def replay(self):
        if self.graph is None:
            out = self.body()
            if self.outputs is None:
                return out
            for buf, t in zip(self.outputs, out):  # a graph's semantics: the same buffers every replay
                if buf is not None:
                    buf.copy_(t)
            return self.outputs
        self.graph.replay()
        return self.outputs


class GraphEngine(EagerEngine):
    """EagerEngine's interface and results, each decode call captured once per shape."""

    def __init__(self, backbone, skip=frozenset(), capture: bool | None = None, min_keys: int = 64,
                 compile: bool | None = None):
        super().__init__(backbone, skip)
        self.capture = (backbone.device.type == "cuda") if capture is None else capture
        # Inside a graph the launches are free but each kernel still costs its few microseconds
        # and its own pass over memory: compiling the per-layer functions fuses the ~50 small
        # kernels of a block into a handful (benchmarks/NOTES.md). Compiled on the first call of
        # each shape, before its capture.
        backbone.compile_fixed = self.capture if compile is None else compile
        self.min_keys = min_keys
        self.states: dict = {}  # (batch size, capacity) -> the state every such generation reuses
        self.calls: dict = {}  # shape key -> CapturedCall
        self.stream = torch.cuda.Stream(device=backbone.device) if self.capture else None
        self._noted: set = set()

    # ---- state -----------------------------------------------------------------------------
    def new_state(self, batch_size: int, capacity: int):
        cap = _pow2(capacity, self.min_keys)  # nearby lengths share a state and its graphs
        key = (batch_size, cap)
        if key not in self.states:
            self.states[key] = self.bb.new_state(batch_size, cap)
        else:
            self.bb.reset_state(self.states[key])
        return self.states[key]

    def _keys(self, state, step) -> int | None:
        cap = self.bb.state_keys(state)
        if cap is None:
            return None
        return min(cap, _pow2(step.start + step.length, self.min_keys))

    def note(self, msg: str) -> None:
        if msg not in self._noted:
            self._noted.add(msg)
            print(f"meestral: {msg}", file=sys.stderr)

    def _call(self, key, body, inputs: dict, step: Step):
        key = key + (step is not None and step.visible is step.write,)
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = CapturedCall(body, inputs, step)
            return call.first(self.capture, self.stream, self.note)
        call.load(inputs, step)
        return call.replay()

    # ---- the engine's methods --------------------------------------------------------------
    def run(self, layers, h, state, step, exit_h=None, skipped=None):
        if not layers:
            return h, None, h
        bb, keys, layers = self.bb, self._keys(state, step), tuple(layers)
        sub = exit_h is not None

        def body(x, st):
            h = x["h"]
            ctx = bb.fixed_context(layers, h, state, st, keys)
            aux, prev = None, h
            for i in layers:
                inp = torch.where(x["skipped"][:, None, None], x["exit_h"].to(h.dtype), h) if sub else h
                prev = h
                h, aux = bb.forward_layer_fixed(i, inp, state, st, keys, ctx)
            return h, aux, prev

        inputs = {"h": h}
        if sub:
            inputs.update(exit_h=exit_h, skipped=skipped)
        key = ("run", layers, id(state), tuple(h.shape), h.dtype, keys, sub and exit_h.dtype)
        return self._call(key, body, inputs, step)

    def window(self, layers, x, state, step, depth, live):
        if not layers:
            return x, None, x
        bb, keys, layers = self.bb, self._keys(state, step), tuple(layers)

        def body(inp, st):
            x, depth, live = inp["x"], inp["depth"], inp["live"]
            ctx = bb.fixed_context(layers, x, state, st, keys)
            aux, prev = None, x
            for i in layers:
                need = (depth < i) & live
                prev = x
                out, aux = bb.forward_layer_fixed(i, x, state, st.written(need), keys, ctx)
                x = torch.where(need[..., None], out.to(x.dtype), x)
            return x, aux, prev

        key = ("window", layers, id(state), tuple(x.shape), x.dtype, keys)
        return self._call(key, body, {"x": x, "depth": depth, "live": live}, step)

    def fill_copy(self, layers, state, step) -> None:
        if not layers or not self.bb.fills_on_copy:
            return
        bb, layers = self.bb, tuple(layers)

        def body(_inp, st):
            for i in layers:
                bb.fill_copy_fixed(i, state, st)
            return ()

        self._call(("copy", layers, id(state), step.batch_size), body, {}, step)

    def logits(self, h):
        """Final norm + LM head, captured too: outside a graph they are a dozen launches a token.
        Cloned: a step may hold one exit point's logits while it asks for another's, and a
        captured call's output buffer is overwritten by its next replay."""
        bb = self.bb
        out = self._call(("logits", tuple(h.shape), h.dtype), lambda x, _st: (bb.logits(x["h"]),), {"h": h}, None)[0]
        return out.clone()

    def fill_propagate(self, layers, h, state, step) -> None:
        if not layers:
            return
        bb, keys, layers = self.bb, self._keys(state, step), tuple(layers)

        def body(x, st):
            ctx = bb.fixed_context(layers, x["h"], state, st, keys)
            for i in layers:
                bb.fill_propagate_fixed(i, x["h"], state, st, keys, ctx)
            return ()

        self._call(("propagate", layers, id(state), tuple(h.shape), h.dtype, keys), body, {"h": h}, step)


def make_engine(kind: str, backbone, skip=()):
    """'eager', 'graph', or 'auto' (graph on CUDA, eager elsewhere: on a CPU the launches that the
    graphs remove are not what bounds a step); 'compiled' (the graph engine's compiled kernels
    without capture) is for kernel profiles, which CUPTI cannot take of graph replays."""
    if kind == "auto":
        kind = "graph" if backbone.device.type == "cuda" else "eager"
    if kind == "graph":
        return GraphEngine(backbone, skip)
    if kind == "compiled":  # the graph engine's compiled kernels launched one by one (profiling)
        return GraphEngine(backbone, skip, capture=False, compile=True)
    if kind == "eager":
        return EagerEngine(backbone, skip)
    raise ValueError(f"unknown engine {kind!r}: use auto, eager, graph or compiled")
