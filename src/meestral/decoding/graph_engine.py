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
- every graph draws its temporaries from ONE memory pool: graphs run one after another on one
  stream, so their temporaries may share memory. Outputs must not: a later capture could place
  them where an earlier graph keeps temporaries, and replaying that graph would overwrite them.
  So output buffers are allocated before capture, outside the pool, and the graph copies into them;
- the captured calls and the states are bounded caches (least recently used go first; a state
  takes its calls with it): a long-running server meeting many shapes does not grow without end.
- a capture must not meet Python's garbage collector: an engine dropped earlier (engines, their
  calls and bodies form reference cycles) holds CUDA graphs, and a collection that frees one while
  another is being captured destroys a graph and frees pool memory inside the capture, which
  invalidates it ("operation not permitted when stream is capturing", then "operation failed due
  to a previous error during capture"). So the collector is off during a capture (dead graphs go
  at a later collection, between captures). A capture that fails all the same runs its call
  eagerly and leaves its pool marked as recording, so later captures take a fresh pool. In a
  fresh process, eager random draws still work after a failed capture (H100, torch 2.11,
  2026-12-06); once, in a test worker that had captured other graphs first, every later eager
  draw failed instead ("Offset increment outside graph capture encountered unexpectedly", H200,
  2026-12-06): the engine cannot undo that, so captures must not fail.

Off CUDA (or with `capture=False`) calls replay by running the body again on the static buffers
and copying into the same output buffers: the same data flow as a graph, which is what the CPU
tests check against the eager engine. The prompt pass (one call per generation, many tokens) stays
eager.

A call's outputs are its buffers: valid until the same call runs again (the policies consume a
step's outputs within the step, and catch-up copies its window into the backlog).
"""

from __future__ import annotations

import gc
import sys
from collections import OrderedDict

import torch

from meestral.backbones.base import Step, StepShared, compiled, plain
from meestral.decoding.engine import EagerEngine, window_layers


# Steps with data-dependent exits (softmax / learned heads under copy) in chunks whose
# exit decisions are CUDA graph branches (conditional nodes, CUDA 12.4+, torch's
# CUDAGraph.begin_capture_to_if_node): off until tested and timed on a GPU.
DEVICE_EXITS = False


def branches_in_graphs() -> bool:
    """Whether this torch can capture a branch into a CUDA graph (conditional IF nodes)."""
    return hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node") and \
        hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph")


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


class CapturedCall:
    """One shape of one engine call: static inputs, the body over them, its output buffers, and
    the graph once captured."""

    def __init__(self, body, inputs: dict, step: Step | None):
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.step = None
        if step is not None:
            # A step whose attention sees exactly what it writes (the usual case) keeps one buffer
            # for both: a copy fewer per call. Whether it does is part of the call's key.
            write = step.write.clone()
            visible = write if step.visible is step.write else step.visible.clone()
            # A per-slot history (self-speculation on a recurrent backbone) is a fixed buffer of
            # the generation's state, like the state itself: the graph writes into it in place.
            self.step = Step(None, step.positions.clone(), write,
                             StepShared(slots=step.slots.clone(), history=step.shared.history), visible)
        ins, st = self.inputs, self.step  # not `self`: a bound closure would be one more reference cycle
        self.body = lambda: body(ins, st)
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
        self.step.shared.slots.copy_(step.slots)

    def _into_outputs(self, out):
        for buf, t in zip(self.outputs, out):
            if buf is not None:
                buf.copy_(t)
        return self.outputs

    def first(self, capture: bool, stream, pool, note):
        """Run eagerly (the real result), then capture the body for the next calls (`graph` stays
        None where the capture fails)."""
        if not capture:
            out = self.body()
            self.outputs = tuple(None if t is None else torch.empty_like(t) for t in out)
            return self._into_outputs(out)
        main = torch.cuda.current_stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):  # warm up where the capture will run (cuBLAS workspaces)
            out = self.body()
        main.wait_stream(stream)
        for t in out:
            if t is not None:
                t.record_stream(main)
        # Outside the capture: these must never be memory the shared pool hands to another graph.
        self.outputs = tuple(None if t is None else torch.empty_like(t) for t in out)
        g = torch.cuda.CUDAGraph()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(g, pool=pool, stream=stream):
                self._into_outputs(self.body())
            self.graph = g
        except Exception as e:  # noqa: BLE001 - any capture failure leaves this call eager
            note(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                 "this call runs eagerly")
        finally:
            if was_enabled:
                gc.enable()
        return self._into_outputs(out)

    def replay(self):
        if self.graph is None:  # a graph's semantics: the same buffers every replay
            return self._into_outputs(self.body())
        self.graph.replay()
        return self.outputs


class GraphEngine(EagerEngine):
    """EagerEngine's interface and results, each decode call captured once per shape."""

    def __init__(self, backbone, skip=frozenset(), capture: bool | None = None, min_keys: int = 64,
                 compile: bool | None = None, max_calls: int = 256, max_states: int = 4):
        super().__init__(backbone, skip)
        self.capture = (backbone.device.type == "cuda") if capture is None else capture
        self.chunk_steps = self.capture  # a captured chunk replaces n launches and n reads by one
        self.decides_on_device = self.capture and DEVICE_EXITS and branches_in_graphs()
        # Inside a graph the launches are free but each kernel still costs its few microseconds
        # and its own pass over memory: compiling the per-layer functions fuses the ~50 small
        # kernels of a block into a handful (benchmarks/NOTES.md). Compiled on the first call of
        # each shape, before its capture; the backbone is only told how to run them (`kernel`).
        self.kernel = compiled if (self.capture if compile is None else compile) else plain
        self.min_keys = min_keys
        self.max_calls, self.max_states = max_calls, max_states
        self.states: OrderedDict = OrderedDict()  # (batch size, capacity) -> the state such generations reuse
        self.calls: OrderedDict = OrderedDict()  # shape key -> CapturedCall
        self.histories: dict = {}  # ("history" | "scratch", id(state), ...) -> that state's history / buffer
        self.stream = torch.cuda.Stream(device=backbone.device) if self.capture else None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.first_calls = 0  # calls run for the first time (eager run, compile, capture): a step that made one is not timed
        self.failed_captures = 0
        self._noted: set = set()
        self._inline_keys = None  # set while a sequence records: its calls run inline (`sequence`)

    # ---- state -----------------------------------------------------------------------------
    def state_capacity(self, capacity: int) -> int:
        return _pow2(capacity, self.min_keys)  # nearby lengths share a state and its graphs

    def new_state(self, batch_size: int, capacity: int):
        cap = self.state_capacity(capacity)
        key = (batch_size, cap)
        if key in self.states:
            self.states.move_to_end(key)
            self.bb.reset_state(self.states[key])
            return self.states[key]
        if len(self.states) >= self.max_states:  # the least recently used goes, with its calls
            _, old = self.states.popitem(last=False)
            for k in [k for k in self.calls if id(old) in k]:
                del self.calls[k]
            for k in [k for k in self.histories if k[1] == id(old)]:
                del self.histories[k]
        self.states[key] = self.bb.new_state(batch_size, cap)
        return self.states[key]

    def new_history(self, state, batch_size: int, positions: int):
        """One history per (state, positions), kept with the state: graphs record its addresses."""
        key = ("history", id(state), positions)
        if key not in self.histories:
            self.histories[key] = self.bb.new_history(batch_size, positions)
        return self.histories[key]

    def scratch(self, state, name, shape, dtype, fill):
        """One buffer per (state, name, shape, dtype), kept with the state like its histories,
        refilled for each generation."""
        key = ("scratch", id(state), name, tuple(shape), dtype)
        buf = self.histories.get(key)
        if buf is None:
            buf = self.histories[key] = torch.full(tuple(shape), fill, dtype=dtype, device=self.device)
        else:
            buf.fill_(fill)
        return buf

    def restore_history(self, state, history, index):
        if history is None:
            return
        bb = self.bb

        def body(x, _st):
            bb.restore_history(state, history, x["index"])
            return ()

        self._call(("restore", id(state), id(history)), body, {"index": index}, None)

    def _keys(self, state, step) -> int | None:
        cap = self.bb.state_keys(state)
        if cap is None:
            return None
        if self._inline_keys is not None:  # inside a captured sequence: one key range for all its calls
            return min(cap, self._inline_keys)
        return min(cap, _pow2(step.start + step.length, self.min_keys))

    def sequence(self, key, fn, inputs: dict, start: int, length: int):
        """fn(inputs), a run of engine calls without host reads, captured as ONE graph per `key`
        and attention key range: the engine's methods run their bodies inline while it records
        (one launch replays the whole run: for speculate, k drafts and the deep pass). Every
        tensor fn reads that changes between replays must come through `inputs`; slots come from
        a device tensor (`make_step(..., at=)`), never from `start`, which only picks the key
        range (the filled part rounded up to a power of two, as for single calls)."""
        keys = _pow2(start + length, self.min_keys)

        def body(x, _st):
            outer = self._inline_keys
            self._inline_keys = keys
            try:
                return fn(x)
            finally:
                self._inline_keys = outer

        return self._call(("sequence", keys) + tuple(key), body, inputs, None)

    def when(self, pred, fn) -> None:
        """EagerEngine.when; while a sequence is being captured, an IF node of the graph (CUDA
        12.4's conditional nodes): the device decides at each replay, no host read.

        Before its capture a sequence runs once eagerly, and a branch first met inside the capture
        would compile its functions and tune its kernels there (not allowed while capturing). So
        in that run (and whenever a sequence's body runs uncaptured) fn runs whatever pred says.
        This relies on what `when`'s callers promise: where pred is false, fn changes nothing
        that is read afterwards (slot_policies.forward_device: its segments run masked to the rows
        still running, none when pred is false)."""
        if self._inline_keys is None:
            return super().when(pred, fn)
        if not (self.capture and torch.cuda.is_current_stream_capturing()):
            return fn()
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        graph.begin_capture_to_if_node(pred.reshape(()).to(torch.bool))
        try:
            fn()
        finally:
            graph.end_capture_to_conditional_node()

    def note(self, msg: str) -> None:
        if msg not in self._noted:
            self._noted.add(msg)
            print(f"meestral: {msg}", file=sys.stderr)

    def _call(self, key, body, inputs: dict, step: Step):
        if self._inline_keys is not None:  # recorded as part of a sequence's graph: run the body as is
            return body(inputs, step)
        key = key + (step is not None and step.visible is step.write,
                     None if step is None or step.shared.history is None else id(step.shared.history))
        call = self.calls.get(key)
        if call is None:
            if len(self.calls) >= self.max_calls:
                self.calls.popitem(last=False)
            call = self.calls[key] = CapturedCall(body, inputs, step)
            self.first_calls += 1
            out = call.first(self.capture, self.stream, self.pool, self.note)
            if self.capture and call.graph is None:  # its pool is left recording: later captures take a new one
                self.failed_captures += 1
                self.pool = torch.cuda.graph_pool_handle()
            return out
        self.calls.move_to_end(key)
        call.load(inputs, step)
        return call.replay()

    # ---- the engine's methods --------------------------------------------------------------
    def run(self, layers, h, state, step, exit_h=None, skipped=None):
        if not layers:
            return h, None, h
        bb, keys, layers, kernel = self.bb, self._keys(state, step), tuple(layers), self.kernel
        sub = exit_h is not None

        def body(x, st):
            h = x["h"]
            ctx = bb.fixed_context(layers, h, state, st, keys)
            aux, prev = None, h
            for i in layers:
                inp = torch.where(x["skipped"][:, None, None], x["exit_h"].to(h.dtype), h) if sub else h
                prev = h
                h, aux = bb.forward_layer_fixed(i, inp, state, st, keys, ctx, kernel)
            return h, aux, prev

        inputs = {"h": h}
        if sub:
            inputs.update(exit_h=exit_h, skipped=skipped)
        key = ("run", layers, id(state), tuple(h.shape), h.dtype, keys, sub and exit_h.dtype)
        return self._call(key, body, inputs, step)

    def window(self, layers, x, state, step, depth, live):
        if not layers:
            return x, None, x
        bb, keys, layers, kernel = self.bb, self._keys(state, step), tuple(layers), self.kernel

        def body(inp, st):
            x = inp["x"]
            ctx = bb.fixed_context(layers, x, state, st, keys)
            return window_layers(lambda i, x, st: bb.forward_layer_fixed(i, x, state, st, keys, ctx, kernel),
                                 layers, x, st, inp.get("depth"), inp["live"])

        key = ("window", layers, id(state), tuple(x.shape), x.dtype, keys, depth is None)
        inputs = {"x": x, "live": live} if depth is None else {"x": x, "depth": depth, "live": live}
        return self._call(key, body, inputs, step)

    def fill_copy(self, layers, state, step) -> None:
        if not layers or not self.bb.fills_on_copy:
            return
        bb, layers, kernel = self.bb, tuple(layers), self.kernel

        def body(_inp, st):
            bb.fill_copy_layers_fixed(layers, state, st, kernel)
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
        bb, keys, layers, kernel = self.bb, self._keys(state, step), tuple(layers), self.kernel

        def body(x, st):
            ctx = bb.fixed_context(layers, x["h"], state, st, keys)
            for i in layers:
                bb.fill_propagate_fixed(i, x["h"], state, st, keys, ctx, kernel)
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
