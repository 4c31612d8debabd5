"""The early-exit decoder: one loop for every architecture and policy.

Each step feeds one token per row through the blocks in order. After an exit point the row's exit
head gives a confidence; above the threshold the row *exits*: its token will come from the exit
hidden state (or, with `through_last_layer`, from also running the last block, as DYNAMAX does).
The layers it skips still owe the token a state entry, and the *state policy* decides what:

- `copy`: Transformer layers copy the previous slot's K/V; Mamba layers keep their state (the
  token is invisible to them). No weights read.
- `propagate`: the exit hidden state is fed to each skipped layer only to make its state.

Rows advance together. While any row is still running a layer, the layer runs for the batch and
exited rows are masked out of its state write (copy) or fed their exit state (propagate, which is
exactly what propagate means); once every row has exited the loop switches to the state-only
fills. At batch 1 that is plain early exit. Per-token accounting counts each row's own path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from meestral.accounting import CostModel, TokenStats, summarize
from meestral.errors import MeestralError
from meestral.heads import ExitHeads, check_thresholds
from meestral.validation import RULES, check_context

POLICIES = ("copy", "propagate", "catchup")
EXIT_OUTPUTS = ("hidden", "through_last_layer")


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self):
        for name in ("max_new_tokens", "temperature", "top_k", "top_p"):  # the CLI's rules (validation.py)
            RULES[name].check(getattr(self, name), name)


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


def probabilities(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """The distribution tokens are drawn from: temperature, then top-k, then top-p. Greedy
    (temperature 0) is the one-hot of the argmax, so verification treats both alike."""
    if opts.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / opts.temperature
    if opts.top_k:
        kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= opts.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample(logits: torch.Tensor, opts: SamplingOptions, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V]."""
    if opts.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probabilities(logits, opts), 1, generator=gen).squeeze(-1)


class EarlyExitDecoder:
    """Generate with early exits. `heads=None` (or thresholds of 1) runs the full model."""

    def __init__(self, backbone, heads: ExitHeads | None = None, thresholds=1.0, policy: str = "copy",
                 exit_output: str = "hidden", verify: bool = False, max_backlog: int = 8, skip_layers=()):
        if policy not in POLICIES:
            raise MeestralError(f"unknown state policy {policy!r}: use one of {', '.join(POLICIES)}")
        if exit_output not in EXIT_OUTPUTS:
            raise MeestralError(f"unknown exit output {exit_output!r}: use one of {', '.join(EXIT_OUTPUTS)}")
        if verify and policy != "catchup":
            raise MeestralError("--verify needs exact deep states: use it with --policy catchup")
        if policy == "catchup" and exit_output != "hidden":
            raise MeestralError("catchup keeps every layer exact, so the last block cannot run on an exit state: "
                                "use --exit-output hidden with --policy catchup")
        if max_backlog < 1:
            raise MeestralError(f"max_backlog {max_backlog} must be at least 1")
        if heads is not None and heads.identity["fingerprint"] != backbone.fingerprint():
            raise MeestralError("these exit heads were made for another backbone: load the matching backbone")
        skip = sorted({int(i) for i in skip_layers})
        if skip and (heads is not None or policy == "catchup"):
            raise MeestralError("skip_layers makes a pruned baseline model: use it without exit heads and catchup")
        if any(not 0 <= i < backbone.num_layers - 1 for i in skip):
            raise MeestralError(f"layers to skip {skip} must lie in [0, {backbone.num_layers - 2}] (the last block stays)")
        self.bb = backbone
        self.heads = heads
        # A pruned model (the layer-drop baseline): these blocks never run, prompt included, so
        # their states are never read and need no filling.
        self.skip = frozenset(skip)
        self.thresholds = check_thresholds(thresholds, len(heads.exit_points)) if heads is not None else []
        self.policy = policy
        self.exit_output = exit_output
        self.verify = verify
        self.max_backlog = int(max_backlog)
        self.cost = CostModel.for_backbone(backbone, heads)

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
    def generate(self, prompts, opts: SamplingOptions | None = None, chat: bool = False, progress=None):
        opts = opts or SamplingOptions()
        opts.check()
        bb, dev = self.bb, self.bb.device
        rows = self.encode(prompts, chat)
        B, P = len(rows), max(len(r) for r in rows)
        check_context(bb, P + opts.max_new_tokens, f"a prompt of {P:,} tokens + {opts.max_new_tokens:,} new tokens",
                      "shorten the prompt or ask for fewer new tokens (--max-new-tokens)")
        pad = torch.tensor([P - len(r) for r in rows], device=dev)
        ids = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, r in enumerate(rows):
            ids[b, P - len(r):] = torch.tensor(r, device=dev)
        gen = None
        if opts.seed is not None:
            gen = torch.Generator(device=dev).manual_seed(opts.seed)
        results = [Generation(prompt_ids=r) for r in rows]
        state = bb.new_state(B, P + opts.max_new_tokens)
        self.last_state = state  # kept for inspection (tests compare it with the full model's)

        # Prefill at full depth: the first new token is the full model's, at no extra cost.
        t0 = self._clock()
        step = bb.make_step(0, P, pad)
        h = bb.embed(ids)
        for i in range(bb.num_layers):
            if i not in self.skip:
                h, _ = bb.forward_layer(i, h, state, step)
        tok = sample(bb.logits(h[:, -1]), opts, gen)
        wall = (self._clock() - t0) * 1000
        L = bb.num_layers
        for b in range(B):
            n = len(rows[b])
            kept = [i for i in range(L) if i not in self.skip]
            flops, nbytes = self.cost.token(kept, [], 0, n, True)
            results[b].stats.append(TokenStats(L - 1, len(kept), 0, flops * n, nbytes, wall, prefill=True))
        active = self._emit(results, tok, torch.ones(B, dtype=torch.bool, device=dev), opts)
        if self.policy == "catchup":
            from meestral.catchup import generate_catchup

            generate_catchup(self, results, state, ids, pad, h.dtype, tok, active, opts, gen, progress)
        else:
            for t in range(1, opts.max_new_tokens):
                if not active.any():
                    break
                t0 = self._clock()
                logits, info = self._step(tok, P + t - 1, pad, active, state)
                tok = sample(logits, opts, gen)
                wall = (self._clock() - t0) * 1000
                self._record(results, info, active, P + t - pad, wall)
                active = self._emit(results, tok, active, opts)
                if progress is not None:
                    progress.update(1)
        for r in results:
            self._finish_text(r, opts)
        return results

    def _clock(self):
        if self.bb.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

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

    def _emit(self, results, tok, active, opts) -> torch.Tensor:
        """Append each active row's token; rows end on EOS, a stop string, or max_new_tokens."""
        toks = tok.tolist()
        new_active = active.clone()
        for b, r in enumerate(results):
            if not active[b]:
                continue
            r.token_ids.append(toks[b])
            reason = self.finish_reason(r, opts)
            if reason is not None:
                r.finish_reason = reason
                new_active[b] = False
        return new_active

    def _step(self, tok, slot, pad, active, state):
        """One decoding step for every active row: returns next-token logits and what each row ran."""
        bb, heads, L = self.bb, self.heads, self.bb.num_layers
        B = tok.shape[0]
        step = bb.make_step(slot, 1, pad, write=active[:, None])
        h = bb.embed(tok[:, None])
        prev = h
        exit_h = h
        exited = ~active
        exit_at = torch.full((B,), L - 1, device=h.device)
        ran = torch.zeros(B, L, dtype=torch.bool, device=h.device)
        propagated = torch.zeros(B, L, dtype=torch.bool, device=h.device)
        probes = torch.zeros(B, dtype=torch.long, device=h.device)
        probe_logits = None
        points = {l: j for j, l in enumerate(heads.exit_points)} if heads is not None else {}
        through = self.exit_output == "through_last_layer"
        # Host-side flags, refreshed only where rows can change (after an exit decision): asking
        # the device `running.any()` in every layer would stall the GPU once per layer.
        any_running, any_skipped = bool(active.any()), False
        for i in range(L):
            if i in self.skip:
                continue
            running = active & ~exited
            skipped = active & exited
            last_through = through and i == L - 1
            if not any_running and not last_through:
                # Every row has left: only the skipped layer's state is owed.
                if self.policy == "propagate":
                    bb.fill_propagate(i, exit_h, state, step.rows(active))
                    propagated[:, i] = active
                else:
                    bb.fill_copy(i, state, step.rows(active))
                continue
            feed_exit = self.policy == "propagate" or last_through
            if feed_exit:
                # Exited rows give the block their exit state: that *is* `propagate`'s state step,
                # and `through_last_layer`'s last-block run.
                x = torch.where(skipped[:, None, None], exit_h.to(h.dtype), h)
                out, aux = bb.forward_layer(i, x, state, step.rows(active))
            else:
                out, aux = bb.forward_layer(i, h, state, step.rows(running))
                if any_skipped:
                    bb.fill_copy(i, state, step.rows(skipped))
            if last_through:
                h = out
                ran[:, i] = active
            else:
                h = torch.where(running[:, None, None], out, h.to(out.dtype))
                ran[:, i] = running
                propagated[:, i] = skipped if self.policy == "propagate" else False
            if i in points and any_running:
                j = points[i]
                lg = bb.logits(h[:, -1]) if heads.needs_logits else None
                conf = heads.confidence(j, h[:, -1], None if aux is None else aux[:, -1], prev[:, -1], lg)
                probes += running.long()
                newly = running & (conf > self.thresholds[j])
                if newly.any():
                    exit_h = torch.where(newly[:, None, None], h, exit_h.to(h.dtype))
                    exit_at = torch.where(newly, torch.full_like(exit_at, i), exit_at)
                    exited = exited | newly
                    if lg is not None:
                        probe_logits = lg if probe_logits is None else torch.where(newly[:, None], lg, probe_logits)
                    any_running = bool((active & ~exited).any())
                    any_skipped = True
            prev = h
        left = active & (exit_at < L - 1)
        if through:
            logits = bb.logits(h[:, -1])
            head_read = torch.ones_like(active)
        else:
            final = torch.where(left[:, None, None], exit_h.to(h.dtype), h)
            logits = bb.logits(final[:, -1])
            head_read = torch.ones_like(active)
            if probe_logits is not None:
                logits = torch.where(left[:, None], probe_logits, logits)
                head_read = ~left  # the exit probe already read the LM head
        return logits, dict(exit_at=exit_at, ran=ran, propagated=propagated, probes=probes, head_read=head_read)

    def _record(self, results, info, active, context, wall):
        cols = {k: v.tolist() for k, v in info.items()}
        ctx = context.tolist()
        for b, r in enumerate(results):
            if not active[b]:
                continue
            layers = [i for i, x in enumerate(cols["ran"][b]) if x]
            prop = [i for i, x in enumerate(cols["propagated"][b]) if x]
            flops, nbytes = self.cost.token(layers, prop, cols["probes"][b], ctx[b], cols["head_read"][b])
            exit_at = cols["exit_at"][b]
            r.stats.append(TokenStats(exit_at, len(layers), cols["probes"][b], flops, nbytes, wall,
                                      deep=exit_at == self.bb.num_layers - 1))

    def summary(self, result: Generation) -> dict:
        return summarize(result.stats, self.cost, self.bb.num_layers, result.discarded)


def generate(backbone, prompt, heads=None, thresholds=1.0, policy="copy", exit_output="hidden", chat=False,
             verify=False, max_backlog=8, **sampling) -> Generation:
    """One prompt in, one Generation out: the Python API in the CLI's terms."""
    dec = EarlyExitDecoder(backbone, heads, thresholds, policy, exit_output, verify, max_backlog)
    return dec.generate([prompt], SamplingOptions(**sampling), chat=chat)[0]
