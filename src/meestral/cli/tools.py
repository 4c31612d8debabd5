"""`meestral demo` and `meestral bench`: the tools (tools/) behind the command line."""

from __future__ import annotations

from meestral.cli.common import add_backbone_args, add_engine_arg, floats, ints, names
from meestral.errors import MeestralError

DEMO_REPORT_DIR = "out/demo-report"


def cmd_demo(args):
    from meestral.tools.demo import run_demo
    from meestral.validation import check_output

    specs = names(args.backbone)
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:  # the second would overwrite the first's report folder
        raise MeestralError(f"--backbone lists {', '.join(twice)} twice: give each backbone once")
    if args.no_report and args.report_dir is not None:
        raise MeestralError("--report-dir has no effect with --no-report (no report is written): drop one of them")
    if args.report_dir is None:
        args.report_dir = DEMO_REPORT_DIR
    if not args.no_report:  # before the generations, not after them
        check_output(args.report_dir, "--report-dir", folder=True)
    return run_demo(backbone=args.backbone, max_new_tokens=args.max_new_tokens, device=args.device,
                    report_dir=None if args.no_report else args.report_dir)


def cmd_bench(args):
    from meestral.tools.bench import ALL_POLICIES, PEERS, POLICIES, SWITCHES, run_bench
    from meestral.validation import check_output

    if args.profile:  # before the run, not after it
        check_output(args.profile, "--profile")

    switches = () if args.switches == ["none"] else tuple(args.switches or SWITCHES)
    for option, given, known in (("--policies", args.policies, ALL_POLICIES), ("--peers", args.peers, PEERS),
                                 ("--switches", switches, SWITCHES)):
        bad = [x for x in given or () if x not in known]
        if bad:
            raise MeestralError(f"{option}: unknown {', '.join(bad)}; use some of {', '.join(known)}")
    run_bench(args.backbone, exits=args.exits, tokens=args.tokens, device=args.device, dtype=args.dtype,
              repeats=args.repeats, max_backlog=args.max_backlog, prompt_tokens=args.prompt_tokens,
              engine=args.engine, policies=tuple(args.policies or POLICIES), peers=tuple(args.peers or ("hf",)),
              profile=args.profile, draft_tokens=_draft_tokens(args.draft_tokens), inject=args.inject or (),
              draft_vocab=tuple(args.draft_vocabs or (0,)), prompts=args.prompts, chat=args.chat,
              one_step=not args.no_one_step, switches=switches)
    return 0


def _draft_tokens(text: str) -> list:
    """--draft-tokens of bench: numbers in [1, 16] and/or auto, e.g. 2,4,auto."""
    from meestral.decoding.config import MAX_DRAFT_TOKENS

    out = []
    for x in names(text):
        if x == "auto":
            out.append(x)
            continue
        try:
            k = int(x)
        except ValueError:
            k = 0
        if not 1 <= k <= MAX_DRAFT_TOKENS:
            raise MeestralError(f"--draft-tokens holds {x!r}: give numbers in [1, {MAX_DRAFT_TOKENS}] or auto, e.g. 2,4,auto")
        out.append(k)
    if not out:
        raise MeestralError("--draft-tokens is empty: give e.g. 2,4,auto")
    return out


def _draft_vocabs(text: str) -> list[int]:
    """bench --draft-vocab: whole numbers >= 0 (0: the whole LM head), e.g. 0,8192."""
    vals = ints(text)
    if not vals or any(v < 0 for v in vals):
        raise MeestralError(f"--draft-vocab {text}: give whole numbers >= 0 (0: the whole vocabulary), e.g. 0,8192")
    return vals


def add_tool_parsers(sub):
    d = sub.add_parser("demo", help="the embedded backbone at several thresholds and policies")
    d.add_argument("--backbone", default="smollm2,mamba2-smol",
                   help="one backbone or several joined by commas (default: both embedded ones, side by side)")
    d.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    d.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt")
    # No default here: --report-dir beside --no-report is refused, which needs to see it given.
    d.add_argument("--report-dir", help=f"where the evaluation report goes (default: {DEMO_REPORT_DIR})")
    d.add_argument("--no-report", action="store_true", help="generation table only")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="decode benchmark: full depth vs forced exits, JSON lines")
    add_backbone_args(b)
    b.add_argument("--exits", type=ints, help="layers to force exits at, one row each, e.g. 4,8 (default: L/3 and 2L/3)")
    b.add_argument("--tokens", type=int, default=32, help="tokens decoded per run")
    b.add_argument("--repeats", type=int, default=3, help="runs per case (the median is reported)")
    b.add_argument("--max-backlog", type=int, default=4, help="catchup/verify rows: exited tokens that may wait "
                   "before a deep pass is forced")
    b.add_argument("--prompt-tokens", type=int, help="prompt length in tokens (default: one sentence)")
    b.add_argument("--prompts", type=int, default=1, help="how many of the benchmark's six prompts (prose, explanation, "
                   "story, list, code, summary) each case decodes per run; rows then give each prompt's ratio to full depth")
    b.add_argument("--chat", action="store_true", help="put each prompt in the tokenizer's chat template (instruct models)")
    b.add_argument("--policies", type=names, help="policies of the forced-exit rows: copy, propagate, catchup, verify "
                   "(default: these four), speculate")
    b.add_argument("--peers", type=names, help="peers: hf (default), hf-static, hf-compiled (full depth), hf-assisted "
                   "(HF's self-speculation, assistant_early_exit, from each exit point), mamba-ssm (its generate(cg=True), Mamba "
                   "models; wheels: benchmarks/build_mamba_ssm.sh)")
    b.add_argument("--profile", help="also write kernel tables (where device time goes) to this JSON file")
    b.add_argument("--draft-tokens", default="4",
                   help="speculate rows (with speculate in --policies): drafts per cycle, e.g. 2,4,auto (default 4)")
    b.add_argument("--inject", type=floats,
                   help="speculate rows: injected draft acceptance, e.g. 0.5,0.6,0.7,0.8,0.9 (benchmark only: random "
                   "weights never agree with themselves; default: the drafts' own acceptance)")
    b.add_argument("--draft-vocab", dest="draft_vocabs", type=_draft_vocabs, help="speculate rows: trimmed draft heads, rows of the LM head, "
                   "e.g. 0,8192 (0: the whole head; default 0)")
    b.add_argument("--switches", type=names, help="GPU rows that time a kernel switch against its default in the same "
                   "run: some of eager (the eager engine's full depth), cublas, fusion, gemv-runs, window-gemv, window-attention, "
                   "launches, ssm-step, ssm-state, attention, fold, device-exits (default: all), or none: a shorter run")
    b.add_argument("--no-one-step", action="store_true", help="skip the one-step-at-a-time twins of the rows whose "
                   "steps run several to a device run (what chunks gain): a shorter run")
    add_engine_arg(b)
    b.set_defaults(func=cmd_bench)
