"""What every `meestral` command shares: the parser class, list arguments, the backbone and exit
options, and the error handling of an entry point.

The command modules (generate.py, tools.py, train.py, adapt.py, distill.py, evaluate.py) all
build on this module and never on each other, so they import in one direction only.
"""

from __future__ import annotations

import argparse
import re
import sys

from meestral.errors import MeestralError


class DefaultsHelp(argparse.HelpFormatter):
    """--help shows every option's default: appended as '(default: X)' unless the help text
    already names it, or there is none (no value, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in`: 0 and 0.0 equal False, and their defaults are worth showing
        none = action.default is None or action.default is False or action.default in ({}, [], ())  # no value
        if none or action.default == argparse.SUPPRESS or "default" in text:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", DefaultsHelp)
        super().__init__(*a, **kw)
        # "-1,3" and "-0.5:0.5" are values (lists with a negative number), not options
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,:eE+-]*$")

    def error(self, message):  # one line, not a usage dump
        raise MeestralError(f"{message} (see `{self.prog} --help`)")


# The list types raise argparse's own error, so that the message names the option ("argument --exits: ...").
def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def exit_points_arg(text: str):
    """--exits: layer numbers, or 'auto' (speculate: the exit point a short calibration picks)."""
    if text.strip().lower() == "auto":
        return "auto"
    return ints(text)


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_backbone_args(p):
    p.add_argument("--backbone", default="smollm2", help="smollm2 | mamba2-smol | random:<shape> | folder | hub id")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    p.add_argument("--ssm-state", choices=("model", "float32"), default="model",
                   help="Mamba-2 recurrent state: model (default; in the model's dtype, rounded after every "
                   "token, as HF and mamba-ssm keep it) | float32 (the more accurate, ~2%% slower in bf16)")


def add_engine_arg(p):
    p.add_argument("--engine", choices=("auto", "eager", "graph"), default="auto",
                   help="auto (default): CUDA graphs on a GPU, eager elsewhere; the results are the same")


def add_head_args(p, auto: bool = True, exits_help: str | None = None):
    """--heads, --head, --exits: which exit heads (`build_heads(args, bb)`); `auto`: --exits auto too."""
    p.add_argument("--heads", help="folder of trained exit heads (heads.json + heads.safetensors)")
    # No default here: validation.check_args fills in softmax, after it has seen whether --head
    # was given beside --heads (which it refuses).
    p.add_argument("--head", help="training-free kind when --heads is not given: "
                   "softmax (default) | margin | saturation | static | full (no exit heads: the full model)")
    p.add_argument("--exits", type=exit_points_arg if auto else ints,
                   help=exits_help or "exit points, e.g. 8,16,24 (default: every quarter)" + (
                       "; with --policy speculate, 'auto' picks the draft exit point from a short calibration "
                       "on held-out text" if auto else ""))


def add_exit_args(p):
    """The options that make an `ExitConfig` (see `exit_config(args, bb)`)."""
    add_head_args(p)
    p.add_argument("--threshold", type=floats,
                   help="exit when confidence > threshold; one value or one per exit point (default 0.9; "
                   "speculate: 0, a draft below it ends the cycle)")
    p.add_argument("--policy", default="copy",
                   help="state of skipped layers: copy (default) | propagate | catchup | verify (catchup, "
                   "lossless) | speculate (drafts from an exit point checked in one deep pass, lossless)")
    p.add_argument("--draft-tokens", default="auto",
                   help="speculate: drafts per cycle, a number up to 16, or auto (default: a controller picks "
                   "up to 6 and the exit point from measured acceptance and step times, and falls back to "
                   "full depth where drafting does not pay)")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="speculate: drafts read only the LM head's first N rows (BPE ids run from the most "
                   "frequent tokens; the deep pass checks with the whole head, so the output is unchanged); "
                   "0 (default): the whole vocabulary")
    p.add_argument("--verify", action="store_true", help="same as --policy verify (with --policy catchup)")
    p.add_argument("--max-backlog", type=int, default=8,
                   help="catchup/verify: exited tokens that may wait before a deep pass is forced")
    p.add_argument("--exit-output", default="hidden", help="hidden | through_last_layer")


def wants_heads(args) -> bool:
    """Whether the options ask for exit heads at all (`--head full|none`: the full model)."""
    return bool(args.heads) or args.head not in ("full", "none")


def build_heads(args, bb):
    """The exit heads that --heads / --head / --exits describe (None: --head full)."""
    from meestral.decoding.config import ExitConfig

    return ExitConfig.from_options(bb, heads=args.heads, head=args.head, exits=args.exits).heads


def exit_config(args, bb):
    """The checked `ExitConfig` the exit options describe."""
    from meestral.decoding.config import ExitConfig

    return ExitConfig.from_options(bb, heads=args.heads, head=args.head, exits=args.exits,
                                   threshold=_threshold(args), policy=args.policy, verify=args.verify,
                                   max_backlog=args.max_backlog, exit_output=args.exit_output,
                                   draft_tokens=args.draft_tokens, draft_vocab=args.draft_vocab)


def _threshold(args):
    """--threshold, or its default: 0.9, and 0 (always draft) under speculate."""
    if args.threshold is not None:
        return args.threshold
    return None if args.policy == "speculate" else [0.9]


def run(command) -> int:
    """Run `command()` (a whole command line's work) as an entry point: every user error ends with
    one line `meestral: error: ...` on stderr and exit status 2."""
    try:
        return command()
    except MeestralError as e:
        _end_progress_bars()
        print(f"meestral: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `meestral generate --json | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C: every file is whole (atomic writes), say where things stand
        _end_progress_bars()
        print(f"meestral: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder... met while working: one line, not a traceback
        from meestral.files import describe_os_error

        _end_progress_bars()
        print(f"meestral: error: {describe_os_error(e)}", file=sys.stderr)
        return 2


def _end_progress_bars():
    """Close the progress bars a failure left open now, so that they do not redraw themselves
    after the error line (when they are garbage-collected) and the error stays the last line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def dispatch(parser, argv) -> int:
    from meestral.validation import check_args

    args, extra = parser.parse_known_args(argv)
    if extra:  # name the command that does not take them (argparse names only `meestral`)
        prog = " ".join(x for x in ("meestral", getattr(args, "command", None), getattr(args, "distill_command", None),
                                         getattr(args, "adapt_command", None)) if x)
        raise MeestralError(f"{prog} does not take {' '.join(extra)}: drop it (see `{prog} --help` for what it takes)")
    check_args(args)
    if getattr(args, "ssm_state", None):  # a module switch: set before any state is made
        from meestral.backbones import ssm

        ssm.STATE_IN_MODEL_DTYPE = args.ssm_state == "model"
    return args.func(args)
