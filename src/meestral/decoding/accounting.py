"""What each emitted token cost: layers run, FLOPs, weight bytes read and wall-clock.

Costs come from the backbone's real parameter shapes (`Backbone.layer_cost`), so they hold for
any size. Conventions:
- FLOPs are 2 per multiply-add, matmuls and scans; attention adds 4 * heads * head_dim * context.
- Weight bytes are the parameters a token's path reads, at the backbone's dtype. At batch 1 decoding
  is bound by these reads, which is why they, not FLOPs, predict wall-clock on a GPU.
- Probes count: `softmax`/`margin` read the final norm and the whole LM head at every exit point
  they are asked at; a classifier reads its own weights. The final LM head read is counted once
  per token (an exit reuses its probe's logits instead of reading the head again).
- `copy` moves K/V bytes inside the cache but reads no weights; `propagate` reads the part of a
  skipped layer its state needs (K/V projections; Mamba's in_proj slice, conv and scan).

One cost path: every path that runs (or replays) the model — the decoder under each policy, the
prefill, teacher-forced scoring, sweeps through it — writes one `StepLog` per row and step: what
that step ran for the row. `token_stats` is the only function that prices a log, `account` turns a
row's logs into its per-token stats, and `summarize` is the only one that aggregates them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TokenStats:
    exit_layer: int  # block whose output produced the token (L-1: full depth)
    layers_run: int  # blocks executed in full for this token
    probes: int  # exit-head evaluations
    flops: float
    weight_bytes: float
    wall_ms: float | None  # None: no decode time (teacher-forced scoring)
    prefill: bool = False  # the first token comes from the full-depth prompt pass
    caught_up: int = 0  # catchup: backlog (token, layer) pairs run along with this token
    deep: bool = True  # this step ran every block (a deep pass)
    verified: bool = False  # verify: the emitted token is the full model's (decided by a deep pass)

    def to_dict(self):
        return asdict(self)


@dataclass
class StepLog:
    """What one step ran for one row: the record every path writes and `token_stats` prices."""

    exit_layer: int  # block whose output produced the token (L-1: full depth)
    ran: tuple  # blocks run in full for this row
    context: int  # positions the row's token sees (prefill: the prompt length)
    propagated: tuple = ()  # blocks run state-only (`propagate`)
    slots: tuple | None = None  # catch-up: positions block i ran for this row in the same call
    probes: int = 0  # exit heads evaluated
    head_read: bool = True  # False when the emitted logits are an exit probe's
    head_share: float = 1.0  # of the LM head read (speculate's trimmed draft head: its rows / all)
    deep: bool = True
    prefill: bool = False
    wall_ms: float | None = None  # None: no decode time (teacher-forced scoring)
    verified: bool = False

    @classmethod
    def prefill_pass(cls, ran, prompt_len: int, num_layers: int, wall_ms=None) -> "StepLog":
        """The full-depth prompt pass that yields the first token."""
        return cls(num_layers - 1, tuple(ran), prompt_len, prefill=True, wall_ms=wall_ms)


def token_stats(log: StepLog, cost: "CostModel") -> TokenStats:
    """Price one step log: layers, FLOPs and weight bytes (the accounting conventions above)."""
    if log.prefill:
        # FLOPs for every prompt position; weights read once.
        flops, nbytes = cost.token(log.ran, [], 0, log.context, True)
        return TokenStats(log.exit_layer, len(log.ran), 0, flops * log.context, nbytes, log.wall_ms, prefill=True,
                          verified=log.verified)
    flops, nbytes = cost.token(log.ran, log.propagated, log.probes, log.context, log.head_read, slots=log.slots,
                               head_share=log.head_share)
    caught_up = sum(log.slots) - len(log.ran) if log.slots is not None else 0
    return TokenStats(log.exit_layer, len(log.ran), log.probes, flops, nbytes, log.wall_ms, caught_up=caught_up,
                      deep=log.deep, verified=log.verified)


def account(logs, cost: "CostModel") -> list[TokenStats]:
    """One row's logs, in order, as per-token stats."""
    return [token_stats(log, cost) for log in logs]


@dataclass
class CostModel:
    """Per-token cost terms of one backbone + head configuration."""

    layer_params: list[int]
    layer_flops: list[float]
    propagate_params: list[int]
    propagate_flops: list[float]
    head_params: int  # final norm + LM head
    probe_params: int  # one probe of the configured head kind
    probe_flops: float
    bytes_per_param: int
    embed_bytes: int  # one embedding row
    attention_flops: object = field(repr=False, default=None)  # (layer, context) -> FLOPs

    @classmethod
    def for_backbone(cls, backbone, heads=None) -> "CostModel":
        costs = [backbone.layer_cost(i) for i in range(backbone.num_layers)]
        head = backbone.lm_head_module.weight.numel() + backbone.norm_module.weight.numel()
        if heads is None:
            probe, probe_flops = 0, 0.0
        elif heads.needs_logits:
            probe, probe_flops = head, 2.0 * head
        elif heads.kind == "classifier":
            probe = sum(p.numel() for p in heads.classifiers[0].parameters())
            probe_flops = 2.0 * probe
        elif heads.kind == "saturation":  # a cosine of two hidden states, no weights
            probe, probe_flops = 0, 3.0 * backbone.hidden_size
        else:  # static: no work at all
            probe, probe_flops = 0, 0.0
        bpp = backbone.lm_head_module.weight.element_size()
        return cls(
            layer_params=[c.params for c in costs],
            layer_flops=[c.flops for c in costs],
            propagate_params=[c.propagate_params for c in costs],
            propagate_flops=[c.propagate_flops for c in costs],
            head_params=head,
            probe_params=probe,
            probe_flops=probe_flops,
            bytes_per_param=bpp,
            embed_bytes=backbone.hidden_size * backbone.embedding.weight.element_size(),
            attention_flops=backbone.attention_flops,
        )

    @property
    def full_token_bytes(self) -> float:
        return self.embed_bytes + self.bytes_per_param * (sum(self.layer_params) + self.head_params)

    def token(self, layers_run, propagated, probes, context, head_read: bool, slots=None,
              head_share: float = 1.0) -> tuple[float, float]:
        """(FLOPs, weight bytes) of one token that ran `layers_run` (list of layer indices) in full,
        `propagated` (layer indices) state-only, evaluated `probes` exit heads and saw `context`
        positions; `head_read` False when the emitted logits came from an exit probe. `slots[i]`
        (catch-up) is how many positions layer i ran in the same call: its weights are read once,
        its FLOPs are paid per position. `head_share`: the part of the LM head read (a trimmed
        draft head reads its first rows only)."""
        params = sum(self.layer_params[i] for i in layers_run)
        params += sum(self.propagate_params[i] for i in propagated)
        params += probes * self.probe_params + (self.head_params * head_share if head_read else 0)
        n = slots if slots is not None else [1] * len(self.layer_flops)
        flops = sum(n[i] * (self.layer_flops[i] + self.attention_flops(i, context)) for i in layers_run)
        flops += sum(self.propagate_flops[i] for i in propagated)
        flops += probes * self.probe_flops + (2.0 * self.head_params * head_share if head_read else 0.0)
        return flops, self.embed_bytes + self.bytes_per_param * params


def summarize(stats: list[TokenStats], cost: CostModel, num_layers: int, discarded=()) -> dict:
    """Means over decoded tokens (the prefill token excluded) and ratios to full depth.

    Work spent on tokens that verification rolled back (`discarded`: the rejected drafts and the
    drafts made after them, and the deep passes that only verified a finished output's last drafts)
    is charged to the tokens that were kept: FLOPs, bytes and time are totals over all steps divided
    by tokens emitted. `rolled_back` counts the discarded drafts; under verify, `draft_acceptance` is
    the share of drafts (tokens that left early) that the full model confirmed.
    Verified tokens (`verify`) were decided by a deep pass: their decision depth is every layer
    (`mean_layers_run` = L); how deep their drafts went is `draft_mean_layers_run`. Time per token
    is over the steps that have a decode time (None when none has: teacher-forced scoring).
    """
    dec = [s for s in stats if not s.prefill]
    if not dec:
        return {"tokens": 0}
    n = len(dec)
    spent = dec + list(discarded)
    mean = lambda k: sum(getattr(s, k) for s in dec) / n  # noqa: E731
    total = lambda k: sum(getattr(s, k) for s in spent) / n  # noqa: E731
    timed = [s for s in dec if s.wall_ms is not None]
    wall = sum(s.wall_ms for s in spent if s.wall_ms is not None) / len(timed) if timed else None
    layers = mean("layers_run")
    out = {
        "tokens": n,
        "mean_exit_layer": mean("exit_layer"),
        "mean_layers_run": layers,
        "layer_fraction": layers / num_layers,
        "exit_rate": sum(s.exit_layer < num_layers - 1 for s in dec) / n,
        "mean_probes": mean("probes"),
        "deep_passes_per_token": sum(s.deep for s in spent) / n,
        "caught_up_per_token": total("caught_up"),
        "rolled_back": sum(not s.deep for s in discarded),  # a verify-only deep pass emits no token
        "flops_per_token": total("flops"),
        "weight_bytes_per_token": total("weight_bytes"),
        "weight_bytes_ratio": total("weight_bytes") / cost.full_token_bytes,
        "ms_per_token": wall,
        "tokens_per_s": None if wall is None else (1000.0 / wall if wall > 0 else float("inf")),
    }
    if all(s.verified for s in dec):
        out["draft_mean_layers_run"], out["draft_layer_fraction"] = layers, layers / num_layers
        accepted = sum(not s.deep for s in dec)  # a kept token that left early is an accepted draft
        drafts = accepted + out["rolled_back"]
        out["drafts_per_token"] = drafts / n
        out["draft_acceptance"] = accepted / drafts if drafts else None
        out["mean_layers_run"], out["layer_fraction"] = float(num_layers), 1.0
    return out
