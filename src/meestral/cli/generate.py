"""`meestral generate` and `meestral info`: early-exit generation with its accounting, and a
backbone's identity and costs."""

from __future__ import annotations

import json
import sys

from meestral.cli.common import add_backbone_args, add_engine_arg, add_exit_args, exit_config
from meestral.errors import MeestralError

PALETTE = [31, 33, 32, 36, 34, 35, 91, 93, 92, 96, 94, 95]  # ANSI foreground colours, one per exit point


def read_prompt(args) -> str:
    if args.prompt is not None and args.file:
        raise MeestralError("give the prompt either as an argument or with --file, not both")
    if args.file:
        try:
            with open(args.file, "rb") as f:
                return _utf8(f.read(), f"prompt file {args.file}")
        except OSError as e:
            raise MeestralError(f"cannot read prompt file {args.file}: {e.strerror}") from None
    if args.prompt is not None:
        return args.prompt
    stdin = sys.stdin  # None when the shell closed it (`<&-`)
    if stdin is not None and not stdin.closed and not stdin.isatty():
        return _utf8(stdin.buffer.read(), "the prompt on stdin")
    raise MeestralError("no prompt: pass it as an argument, with --file, or on stdin")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MeestralError(f"{what} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): "
                            "give a text file") from None


def colour_tokens(tokenizer, gen, num_layers, exit_points, colour=True) -> str:
    """The generated text with each token coloured by the layer it left at (plain: full depth).
    The whole text is decoded at every token and its new part printed; a character spread over
    several tokens (CJK, emoji) is printed, whole, with the token that completes it."""
    out, prev = [], ""
    ids = []
    steps = list(zip(gen.token_ids, gen.exit_layers))
    for n, (tok, layer) in enumerate(steps):
        if tok in tokenizer.eos_ids:
            break
        ids.append(tok)
        text = tokenizer.decode(ids)
        last = n + 1 == len(steps) or steps[n + 1][0] in tokenizer.eos_ids
        if text.endswith("\ufffd") and not last:
            continue  # an unfinished character: its remaining bytes come with the next tokens
        piece, prev = text[len(prev):], text
        if colour and layer < num_layers - 1:
            c = PALETTE[exit_points.index(layer) % len(PALETTE)] if layer in exit_points else 90
            piece = f"\x1b[{c}m{piece}\x1b[0m"
        out.append(piece)
    return "".join(out)


def cmd_generate(args):
    from meestral.backbones.loading import load_backbone
    from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions

    prompt = read_prompt(args)
    if not prompt.strip():
        raise MeestralError("empty prompt: give some text to continue")
    bb = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    if args.chat and not bb.tokenizer.has_chat:  # else the prompt would go in plainly, unsaid
        raise MeestralError(f"--chat: the tokenizer of {bb.name} has no chat template: drop --chat")
    cfg = exit_config(args, bb)
    heads = cfg.heads
    dec = EarlyExitDecoder(bb, config=cfg, engine=args.engine)
    opts = SamplingOptions(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                           tuple(args.stop or ()))
    gen = dec.generate([prompt], opts, chat=args.chat)[0]
    summary = dec.summary(gen)
    if args.json:
        print(json.dumps({
            "backbone": bb.identity(), "heads": None if heads is None else heads.meta(),
            **{k: v for k, v in cfg.to_dict().items() if k not in ("heads", "exits")}, "prompt": prompt,
            "text": gen.text, "token_ids": gen.token_ids, "finish_reason": gen.finish_reason,
            "tokens": [s.to_dict() for s in gen.stats], "summary": summary,
        }))
        return 0
    colour = not args.no_color and sys.stdout.isatty() or args.color
    print(colour_tokens(bb.tokenizer, gen, bb.num_layers, cfg.exit_points, colour))
    legend = " ".join(
        (f"\x1b[{PALETTE[j % len(PALETTE)]}m" if colour else "") + f"L{p}" + ("\x1b[0m" if colour else "")
        for j, p in enumerate(cfg.exit_points)
    ) or "none"
    print(f"\n-- exits at {legend}; plain = full depth ({bb.num_layers} layers)", file=sys.stderr)
    print(format_summary(summary, bb.num_layers), file=sys.stderr)
    return 0


def format_summary(s: dict, L: int) -> str:
    if not s.get("tokens"):
        return "-- no decoded tokens after the first (it comes from the full-depth prompt pass)"
    return (f"-- {s['tokens']} decoded tokens: exit rate {s['exit_rate']:.0%}, mean exit layer "
            f"{s['mean_exit_layer']:.1f}/{L - 1}, layers run {s['mean_layers_run']:.1f}/{L} "
            f"({s['layer_fraction']:.0%}{_drafts(s)}), deep passes {s['deep_passes_per_token']:.2f}/token, "
            f"rolled back {s['rolled_back']}, weight bytes {s['weight_bytes_ratio']:.2f}x full, "
            f"{s['ms_per_token']:.1f} ms/token")


def _drafts(s: dict) -> str:
    """verify: tokens are decided at full depth; say how deep the drafts went."""
    d = s.get("draft_mean_layers_run")
    return "" if d is None else f"; drafts {d:.1f}"


def cmd_info(args):
    from meestral.decoding.accounting import CostModel
    from meestral.backbones.loading import load_backbone

    bb = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    cost = CostModel.for_backbone(bb)
    print(json.dumps({
        "identity": bb.identity(),
        "family": bb.family,
        "layer_params": cost.layer_params,
        "lm_head_params": cost.head_params,
        "full_token_weight_bytes": cost.full_token_bytes,
    }, indent=2))
    return 0


def add_generate_parsers(sub):
    g = sub.add_parser("generate", help="generate with early exits")
    g.add_argument("prompt", nargs="?", help="the text to continue (default: --file, else stdin)")
    g.add_argument("--file", help="read the prompt from this file")
    add_backbone_args(g)
    add_exit_args(g)
    g.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens holding p; 1: off")
    g.add_argument("--seed", type=int, help="sampling seed (default: a fresh one each run)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object with tokens and accounting")
    g.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    g.add_argument("--color", action="store_true", help="colour even when not writing to a terminal")
    add_engine_arg(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="backbone identity and costs")
    add_backbone_args(i)
    i.set_defaults(func=cmd_info)
