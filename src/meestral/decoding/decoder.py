"""The early-exit decoder: one object, one loop, the state policy as a strategy object.

`EarlyExitDecoder` owns a checked `ExitConfig` (config.py), an engine (engine.py, graph_engine.py:
everything asked of the backbone, a segment between two exit points at a time) and the policy the
configuration names (slot_policies.py: `copy`, `propagate`; catchup.py: `catchup`; verify.py:
`verify`). A generation is:

1. the prompt pass at full depth (`prefill`): it yields the first token at no extra cost;
2. one `policy.step` per further token: each active row feeds its newest token, leaves at the
   first exit point whose confidence passes its threshold (exit_rule.py), and gets an `Outcome`
   (emit a token, or under verify roll back to a rejected draft) with the `StepLog` of what ran;
3. the logs priced by accounting.token_stats, row by row, as the tokens come.

`copy`: skipped Transformer layers copy the previous slot's K/V; Mamba layers keep their state.
`propagate`: the exit hidden state is fed to each skipped layer only to make its state.
`catchup`: exact; exited tokens wait and the next deep token carries them. `verify`: catch-up
plus checking every early token against the full model (lossless). At batch 1 that is plain
early exit; in a batch, rows advance together (copy/propagate) or each at its own slot
(catchup/verify), and per-token accounting counts each row's own path.

Inspection: `generate(..., inspect=fn)` calls fn with a `StepView` after the prefill and after
every step (the live state, the step's logs and logits, the backlog): what tests and tools read
instead of the decoder's internals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from meestral.decoding.accounting import CostModel, StepLog, TokenStats, summarize, token_stats
from meestral.decoding.catchup import CatchupPolicy
from meestral.decoding.config import ExitConfig
from meestral.decoding.graph_engine import make_engine
from meestral.decoding.policy import Batch
from meestral.decoding.sampling import SamplingOptions, sample
from meestral.decoding.slot_policies import CopyPolicy, PropagatePolicy
from meestral.decoding.speculate import SpeculatePolicy
from meestral.decoding.verify import VerifyPolicy
from meestral.errors import MeestralError
from meestral.validation import check_context

POLICY_CLASSES = {p.name: p for p in (CopyPolicy, PropagatePolicy, CatchupPolicy, VerifyPolicy, SpeculatePolicy)}


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stats: list[TokenStats] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "eos" | "stop" | "length"
    discarded: list[TokenStats] = field(default_factory=list)  # work for tokens rolled back (verify)

    @property
    def exit_layers(self) -> list[int]:
        return [s.exit_layer for s in self.stats]


@dataclass
class StepView:
    """What the decoder shows an `inspect` callback after the prefill (step 0) and every step.
    `state` and `backlog` are live: copy what you need to keep."""

    step: int
    state: object  # the backbone's per-layer state
    logits: torch.Tensor  # [B, V] the step's next-token logits (prefill: the prompt's)
    logs: list  # per row: the StepLog of what ran (None: the row did not take part)
    backlog: object = None  # catchup/verify: catchup.Backlog (tokens, depth, cur per row)


class EarlyExitDecoder:
    """Generate with early exits under `config` (default: no exit heads, the full model)."""

    def __init__(self, backbone, config: ExitConfig | None = None, *, engine: str = "auto"):
        self.bb = backbone  # the tokenizer and the cost model's shapes; the engine runs it
        self.config = (config or ExitConfig()).checked(backbone)
        # "auto": CUDA graphs on a GPU (graph_engine.py), the eager engine elsewhere; same results.
        self.engine = make_engine(engine, backbone, self.config.skip_layers)
        self.policy = POLICY_CLASSES[self.config.policy](self.config, self.engine)
        self.cost = CostModel.for_backbone(backbone, self.config.heads)

    # ---- prompts ---------------------------------------------------------------------------
    def encode(self, prompts, chat: bool = False) -> list[list[int]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise MeestralError("no prompt given: pass a prompt as an argument, --file or stdin")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p.strip():
                    raise MeestralError("empty prompt: give some text to continue")
                ids = self.bb.tokenizer.apply_chat(p) if chat else self.bb.tokenizer.encode(p)
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise MeestralError("empty prompt: give some text to continue")
            out.append(ids)
        return out

    # ---- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, rows: list[list[int]], extra: int):
        """The prompt pass at full depth over left-padded rows, with room for `extra` more slots:
        (Batch, next-token logits [B, V], per-row StepLog of the pass without its time, dtype of
        its hidden states)."""
        # A policy that writes ahead of what it keeps (speculate's drafts) needs room for it.
        batch = Batch(self.engine, rows, extra + getattr(self.policy, "extra_slots", 0))
        h = self.engine.prefill(batch.ids, batch.state, batch.pad)
        L = self.bb.num_layers
        logs = [StepLog.prefill_pass(self.engine.kept, len(r), L) for r in rows]
        return batch, self.engine.logits(h[:, -1]), logs, h.dtype

    @torch.no_grad()
    def generate(self, prompts, opts: SamplingOptions | None = None, chat: bool = False, progress=None,
                 inspect=None) -> list[Generation]:
        opts = opts or SamplingOptions()
        opts.check()
        rows = self.encode(prompts, chat)
        P = max(len(r) for r in rows)
        check_context(self.bb, P + opts.max_new_tokens, f"a prompt of {P:,} tokens + {opts.max_new_tokens:,} new tokens",
                      "shorten the prompt or ask for fewer new tokens (--max-new-tokens)", rows=len(rows))
        gen = opts.generator(self.bb.device)
        results = [Generation(prompt_ids=r) for r in rows]
        t0 = time.perf_counter()
        batch, logits, logs, hidden_dtype = self.prefill(rows, opts.max_new_tokens)
        first = sample(logits, opts, gen)
        toks = first.tolist()  # the prefill's one read: the first tokens (this also waits for the device)
        wall = (time.perf_counter() - t0) * 1000
        for b, r in enumerate(results):
            logs[b].wall_ms = wall
            r.stats.append(token_stats(logs[b], self.cost))
            r.token_ids.append(toks[b])
        self.policy.start(batch, first, hidden_dtype)
        self._view(inspect, 0, batch, logits, logs)
        for b, r in enumerate(results):
            self._check_end(batch, b, r, opts)
        n = 0
        while any(batch.active):
            t0 = time.perf_counter()
            outcomes, logits = self.policy.step(batch, opts, gen)  # ends with a read: its device work is done
            wall = (time.perf_counter() - t0) * 1000
            n += 1
            for b, o in enumerate(outcomes):
                if o is None:
                    continue
                # speculate: a step may emit several tokens; its time is shared among its outcomes.
                several = o if isinstance(o, list) else [o]
                for one in several:
                    one.log.wall_ms = wall / len(several)
                    if batch.active[b] or one.kind == "spent":
                        self._apply(batch, b, results[b], one, opts)
                    else:  # the row ended on an earlier token of this step: the rest is spent work
                        results[b].discarded.append(token_stats(one.log, self.cost))
            self._view(inspect, n, batch, logits,
                       [None if o is None else (o[-1] if isinstance(o, list) else o).log for o in outcomes])
            if progress is not None:
                progress.update(1)
        for r in results:
            self._finish_text(r, opts)
        return results

    def _apply(self, batch, b, r: Generation, o, opts):
        st = token_stats(o.log, self.cost)
        if o.kind == "spent":  # work that emits nothing (speculate's rejected drafts)
            r.discarded.append(st)
            return
        if o.kind == "done":
            r.discarded.append(st)
            batch.retire(b)
            return
        if o.kind == "rollback":
            r.discarded.extend(r.stats[o.keep:])  # stats[k] belongs to token_ids[k]
            del r.stats[o.keep:], r.token_ids[o.keep:]
            r.finish_reason = "length"  # provisional: the ending the drafts reached is gone
        r.token_ids.append(o.token)
        r.stats.append(st)
        self._check_end(batch, b, r, opts)

    def _check_end(self, batch, b, r, opts):
        reason = self.finish_reason(r, opts)
        if reason is not None:
            r.finish_reason = reason
            if self.policy.finish(batch, b):
                batch.retire(b)

    @staticmethod
    def _view(inspect, n, batch, logits, logs):
        if inspect is not None:
            inspect(StepView(n, batch.state, logits, logs, batch.backlog))

    def finish_reason(self, r: Generation, opts: SamplingOptions) -> str | None:
        """Why row r must stop now ("eos", "stop", "length"), or None to go on."""
        if r.token_ids and r.token_ids[-1] in self.bb.tokenizer.eos_ids:
            return "eos"
        if opts.stop:
            text = self.bb.tokenizer.decode(r.token_ids)
            if any(s and s in text for s in opts.stop):
                return "stop"
        if len(r.token_ids) >= opts.max_new_tokens:
            return "length"
        return None

    def _finish_text(self, r: Generation, opts: SamplingOptions):
        tok = self.bb.tokenizer
        if r.finish_reason == "stop":
            text = tok.decode(r.token_ids)
            r.text = text[: min(text.find(s) for s in opts.stop if s and s in text)]
        else:
            r.text = tok.decode([t for t in r.token_ids if t not in tok.eos_ids])

    def summary(self, result: Generation) -> dict:
        return summarize(result.stats, self.cost, self.bb.num_layers, result.discarded)

