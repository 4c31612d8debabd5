"""`meestral demo` and `meestral bench`: the tools (tools/) behind the command line."""

from __future__ import annotations

from meestral.cli.common import add_backbone_args, add_engine_arg, ints, names
from meestral.errors import MeestralError


def cmd_demo(args):
    from meestral.tools.demo import run_demo
    from meestral.validation import check_output

    if not args.no_report:  # before the generations, not after them
        check_output(args.report_dir, "--report-dir", folder=True)
    return run_demo(backbone=args.backbone, max_new_tokens=args.max_new_tokens, device=args.device,
                    report_dir=None if args.no_report else args.report_dir)


def cmd_bench(args):
    from meestral.tools.bench import PEERS, POLICIES, run_bench

    for option, given, known in (("--policies", args.policies, POLICIES), ("--peers", args.peers, PEERS)):
        bad = [x for x in given or () if x not in known]
        if bad:
            raise MeestralError(f"{option}: unknown {', '.join(bad)}; use some of {', '.join(known)}")
    run_bench(args.backbone, exits=args.exits, tokens=args.tokens, device=args.device, dtype=args.dtype,
              repeats=args.repeats, max_backlog=args.max_backlog, prompt_tokens=args.prompt_tokens,
              engine=args.engine, policies=tuple(args.policies or POLICIES), peers=tuple(args.peers or ("hf",)),
              profile=args.profile)
    return 0


def add_tool_parsers(sub):
    d = sub.add_parser("demo", help="the embedded backbone at several thresholds and policies")
    d.add_argument("--backbone", default="smollm2,mamba2-smol",
                   help="one backbone or several joined by commas (default: both embedded ones, side by side)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--report-dir", default="out/demo-report", help="where the evaluation report goes")
    d.add_argument("--no-report", action="store_true", help="generation table only")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="decode benchmark: full depth vs forced exits, JSON lines")
    add_backbone_args(b)
    b.add_argument("--exits", type=ints, help="two layers to force exits at (default: L/3, 2L/3)")
    b.add_argument("--tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--max-backlog", type=int, default=4)
    b.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default: one sentence)")
    b.add_argument("--policies", type=names, help="policies of the forced-exit rows (default: all four)")
    b.add_argument("--peers", type=names, help="full-depth peers: hf (default), hf-static, hf-compiled")
    b.add_argument("--profile", help="also write kernel tables (where device time goes) to this JSON file")
    add_engine_arg(b)
    b.set_defaults(func=cmd_bench)
