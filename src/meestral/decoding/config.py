"""One exit configuration, as plain data: which heads, which thresholds, what the skipped layers
get, how long a backlog may grow, where the emitted token comes from, which blocks are pruned.

The decoder, the lm-eval model, sweeps, the benchmark, the demo and the CLI all take an
`ExitConfig` (keyword-only: it is the one carrier of these fields); `checked(backbone)` is the one
place its combinations are validated, and `from_options` the one place user-facing options (CLI
flags, lm-eval model_args: names, strings, the `verify` alias) become one.

State policies (what the layers an exited token skips receive; README, "Generate"): `copy`,
`propagate`, `catchup`, and `verify`, which is catch-up plus checking every early token against
the full model (lossless). `speculate` (speculate.py) is lossless too: it drafts up to
`draft_tokens` tokens from an exit point and checks them in one deep pass; its threshold ends a
cycle's drafting where the exit head is not confident (default 0: always draft), and with
`adaptive` a controller picks the number of drafts and the exit point as it measures them;
`draft_vocab` trims the drafts' LM head to its first N rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meestral.errors import MeestralError

STATE_POLICIES = ("copy", "propagate", "catchup", "verify")  # one slot per exited token
POLICIES = STATE_POLICIES + ("speculate",)
EXACT_POLICIES = ("catchup", "verify", "speculate")  # every layer's state stays the full model's
LOSSLESS_POLICIES = ("verify", "speculate")  # the output is the full model's
MAX_DRAFT_TOKENS = 16  # the fixed-shape path unrolls a cycle's window (ssm.FUSED_MAX_TOKENS)
EXIT_OUTPUTS = ("hidden", "through_last_layer")


def default_exit_points(num_layers: int) -> list[int]:
    """Every quarter of the depth (the last block is never an exit point)."""
    L = num_layers
    return sorted({L // 4, L // 2, 3 * L // 4} - {L - 1})


def option_list(value, cast, what):
    """A list option: '7:15:22' (lm-eval model_args), one number, or a list; None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        items = [x for x in str(value).replace(";", ":").split(":") if x.strip()]
    try:
        return [cast(x) for x in items]
    except (TypeError, ValueError):
        example = "0.9 or 0.9:0.8:0.7" if cast is float else "7:15:22"  # a threshold's example is a threshold
        raise MeestralError(f"{what}={value!r} is not a ':'-separated list of numbers (e.g. {what}={example})") from None


def layer_drop_skip(num_layers: int, n: int) -> tuple[int, ...]:
    """DYNAMAX's layer-drop baseline: the `n` blocks before the last are removed."""
    if not 0 <= n <= num_layers - 2:
        raise MeestralError(f"layer_drop={n} out of range: drop between 0 and {num_layers - 2} of the {num_layers} blocks")
    return tuple(range(num_layers - 1 - n, num_layers - 1))


_AUTO_EXITS: dict = {}  # backbone fingerprint -> calibrated exit point (one calibration per process)


def auto_exit_point(backbone, policy: str, draft_vocab: int = 0) -> int:
    """`exits=auto`: the draft exit point of `speculate`, from evaluation.draft_exit's calibration
    on held-out embedded text (said on stderr once per backbone)."""
    import sys

    if policy != "speculate":
        raise MeestralError(f"exits=auto picks the draft exit point of --policy speculate, not of {policy}: "
                            "give exit points (e.g. --exits 8,16), or use --policy speculate")
    key = backbone.fingerprint(), draft_vocab
    if key not in _AUTO_EXITS:
        from meestral.evaluation.draft_exit import calibrated_exit

        _AUTO_EXITS[key] = calibrated_exit(backbone, draft_vocab=draft_vocab,
                                           log=lambda m: print(f"meestral: {m}", file=sys.stderr))
    return _AUTO_EXITS[key]


@dataclass(frozen=True, kw_only=True)
class ExitConfig:
    heads: object = None  # ExitHeads, or None: the full (or pruned) model
    thresholds: object = 1.0  # one for all exit points or one per exit point; `checked` makes a tuple
    policy: str = "copy"
    max_backlog: int = 8  # catchup/verify: exited tokens that may wait before a deep pass is forced
    exit_output: str = "hidden"
    skip_layers: tuple = ()  # a pruned model (the layer-drop baseline): these blocks never run
    draft_tokens: int = 4  # speculate: the most drafts a cycle makes
    adaptive: bool = True  # speculate: the controller picks k <= draft_tokens and the exit point
    draft_vocab: int = 0  # speculate: drafts read the LM head's first N rows only (0: all; speculate.py)

    @classmethod
    def from_options(cls, backbone, *, heads=None, head="softmax", exits=None, threshold=None, policy="copy",
                     verify=False, max_backlog=8, exit_output="hidden", layer_drop=0,
                     draft_tokens="auto", draft_vocab=0) -> "ExitConfig":
        """The checked configuration that user-facing options describe (CLI flags, lm-eval
        model_args). `heads`: built ExitHeads or a folder of trained ones; otherwise `head` names a
        training-free kind at `exits` (default: every quarter), or `full`/`none` for no exits.
        Lists may be strings ('7:15:22'); `verify=True` is an alias of policy='verify';
        `layer_drop=N` is DYNAMAX's pruned baseline (the N blocks before the last removed).
        `threshold` None: 1.0 (never exit), or 0.0 under speculate (always draft). `draft_tokens`
        (speculate): a number for a fixed k, or 'auto' for the controller (up to 6 drafts).
        `exits='auto'` (speculate): the exit point a short calibration on held-out text picks.
        `draft_vocab=N` (speculate): drafts read the LM head's first N rows only."""
        from meestral.decoding.heads import ExitHeads

        L = backbone.num_layers
        layer_drop = int(layer_drop or 0)
        skip = layer_drop_skip(L, layer_drop)  # also the range check
        if layer_drop:
            return cls(skip_layers=skip).checked(backbone)
        if isinstance(verify, str):
            verify = verify.strip().lower() in ("1", "true", "yes")
        if verify:
            if policy not in ("catchup", "verify"):
                raise MeestralError("--verify needs exact deep states: use it with --policy catchup (or --policy verify)")
            policy = "verify"
        if isinstance(heads, ExitHeads):
            pass
        elif heads:
            heads = ExitHeads.load(heads, backbone)
        elif head in (None, "none", "full"):
            heads = None
        elif head == "classifier":
            raise MeestralError("a classifier head must be trained first: pass --heads DIR (from `meestral train`)")
        else:
            if isinstance(exits, str) and exits.strip().lower() == "auto":
                exits = [auto_exit_point(backbone, policy, int(draft_vocab or 0))]
            heads = ExitHeads(head, option_list(exits, int, "exits") or default_exit_points(L), backbone)
        if threshold is None:
            threshold = 0.0 if policy == "speculate" else 1.0
        th = option_list(threshold, float, "threshold")
        if not th:
            raise MeestralError("the threshold is empty: give one value in [0, 1] or one per exit point")
        # `checked` turns max_backlog (a string in model_args) into a whole number, or says why not.
        adaptive = str(draft_tokens).strip().lower() == "auto"
        if adaptive:
            draft_tokens = 6
        else:
            try:
                draft_tokens = int(draft_tokens)
            except (TypeError, ValueError):
                raise MeestralError(f"draft_tokens={draft_tokens!r} must be a whole number or 'auto'") from None
        try:
            draft_vocab = int(draft_vocab or 0)
        except (TypeError, ValueError):
            raise MeestralError(f"draft_vocab={draft_vocab!r} must be a whole number (0: the whole vocabulary)") from None
        return cls(heads=heads, thresholds=th if heads is not None else 1.0, policy=policy, max_backlog=max_backlog,
                   exit_output=exit_output, draft_tokens=draft_tokens, adaptive=adaptive,
                   draft_vocab=draft_vocab).checked(backbone)

    @property
    def verify(self) -> bool:
        return self.policy == "verify"

    @property
    def exact(self) -> bool:
        """Every layer's state equals the full model's (catchup, verify, or no exits at all)."""
        return self.policy in EXACT_POLICIES or (self.heads is None and not self.skip_layers)

    @property
    def probe_logits(self) -> bool:
        """The exit heads read the LM head (softmax, margin): an exited token's logits are its probe's."""
        return self.heads is not None and self.heads.needs_logits

    @property
    def exit_points(self) -> list[int]:
        return [] if self.heads is None else list(self.heads.exit_points)

    def checked(self, backbone) -> "ExitConfig":
        """This configuration validated against `backbone`, thresholds as a tuple (one per exit point)."""
        from meestral.decoding.heads import check_thresholds

        if self.policy not in POLICIES:
            raise MeestralError(f"unknown state policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        if self.exit_output not in EXIT_OUTPUTS:
            raise MeestralError(f"unknown exit output {self.exit_output!r}: use one of {', '.join(EXIT_OUTPUTS)}")
        if self.policy in EXACT_POLICIES and self.exit_output != "hidden":
            raise MeestralError("catchup keeps every layer exact, so the last block cannot run on an exit state: "
                                "use --exit-output hidden with --policy catchup")
        try:
            backlog = int(self.max_backlog)
        except (TypeError, ValueError):
            raise MeestralError(f"max_backlog {self.max_backlog!r} must be a whole number") from None
        if backlog < 1:
            raise MeestralError(f"max_backlog {self.max_backlog} must be at least 1")
        heads = self.heads
        if heads is not None and heads.identity["fingerprint"] != backbone.fingerprint():
            raise MeestralError("these exit heads were made for another backbone: load the matching backbone")
        skip = tuple(sorted({int(i) for i in self.skip_layers}))
        if skip and (heads is not None or self.policy in EXACT_POLICIES):
            raise MeestralError("skip_layers makes a pruned baseline model: use it without exit heads and catchup")
        if any(not 0 <= i < backbone.num_layers - 1 for i in skip):
            raise MeestralError(f"layers to skip {list(skip)} must lie in [0, {backbone.num_layers - 2}] "
                                "(the last block stays)")
        if self.policy == "speculate":
            if heads is None:
                raise MeestralError("speculate drafts from an exit point: give one with --exits E "
                                    "(and a head kind, e.g. --head softmax)")
            if not 1 <= int(self.draft_tokens) <= MAX_DRAFT_TOKENS:
                raise MeestralError(f"draft_tokens {self.draft_tokens} out of range: give 1 to {MAX_DRAFT_TOKENS} "
                                    "drafts a cycle (or auto)")
            if len(heads.exit_points) > 1 and not self.adaptive:
                raise MeestralError(f"a fixed number of drafts drafts from one exit point, got {list(heads.exit_points)}: "
                                    "give one with --exits E, or --draft-tokens auto to let the controller choose")
        th = tuple(check_thresholds(self.thresholds, len(heads.exit_points))) if heads is not None else ()
        vocab = int(self.draft_vocab or 0)
        if vocab:
            if self.policy != "speculate":
                raise MeestralError(f"draft_vocab trims speculate's draft head, not {self.policy}'s: use it with "
                                    "--policy speculate")
            if not 1 <= vocab <= backbone.vocab_size:
                raise MeestralError(f"draft_vocab {vocab} out of range: give 1 to {backbone.vocab_size} (the "
                                    "vocabulary), or 0 for all of it")
            if heads.needs_logits and any(t > 0 for t in th):
                raise MeestralError(f"a {heads.kind} confidence reads the whole LM head, which draft_vocab avoids: "
                                    "use threshold 0 (always draft), or a head that reads no logits (static, "
                                    "saturation, classifier)")
            if vocab == backbone.vocab_size:
                vocab = 0  # the whole vocabulary: nothing to trim
        return replace(self, thresholds=th, max_backlog=backlog, skip_layers=skip, draft_tokens=int(self.draft_tokens),
                       adaptive=bool(self.adaptive), draft_vocab=vocab)

    def to_dict(self) -> dict:
        """The configuration as JSON-able data (results files, `meestral generate --json`)."""
        h = self.heads
        return {"heads": None if h is None else h.kind, "exits": self.exit_points,
                "thresholds": list(self.thresholds) if h is not None else [], "policy": self.policy,
                "verify": self.verify, "max_backlog": self.max_backlog, "exit_output": self.exit_output,
                "skip_layers": list(self.skip_layers),
                **({"draft_tokens": "auto" if self.adaptive else self.draft_tokens, "draft_vocab": self.draft_vocab}
                   if self.policy == "speculate" else {})}
