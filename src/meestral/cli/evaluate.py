"""`meestral eval | lm-eval | sweep | oracle | calibrate | report`: thin commands over
`meestral.evaluation` and `meestral.report`."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from meestral.cli.common import add_backbone_args, add_exit_args, add_head_args, build_heads, exit_config, floats, ints, wants_heads
from meestral.cli.common import names as _names
from meestral.errors import MeestralError
from meestral.evaluation.lens import MAX_TOKENS as LENS_TOKENS
from meestral.validation import check_context, check_output


def _write_json(path, obj):
    from meestral.files import write_json

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, obj, indent=1, default=str)
    except OSError as e:
        raise MeestralError(f"cannot write {path}: {e.strerror}: choose a writable location") from None


def _lm(args, **extra):
    from meestral.backbones.loading import load_backbone
    from meestral.evaluation.lm_model import MeestralLM

    bb = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    lm = MeestralLM(backbone=bb, head="full", batch_size=args.batch_size, max_length=args.max_length, **extra)
    lm.spec = args.backbone
    lm.configure(exit_config(args, bb))
    return lm


def _heads_spec(args) -> str:
    return f"classifier:{Path(args.heads).resolve()}" if args.heads else args.head


def cmd_eval(args):
    from lm_eval.utils import make_table

    from meestral.evaluation.runner import load_tasks, run_tasks

    if args.out:
        check_output(args.out, "--out")
    names = _names(args.tasks)
    resolved, task_dict = load_tasks(names)
    lm = _lm(args)
    res = run_tasks(lm, task_dict, limit=args.limit)
    acc = lm.accounting()
    print(make_table(res))
    print(f"-- {json.dumps({k: acc.get(k) for k in ('agreement', 'exit_rate', 'mean_layers_run', 'weight_bytes_ratio', 'flops_ratio')})}",
          file=sys.stderr)
    if args.out:
        _write_json(args.out, {"config": lm.config(), "tasks": resolved, "limit": args.limit,
                               "results": res.get("results"), "accounting": acc})
    return 0


def cmd_lm_eval(args):
    """lm-eval's own CLI with our model registered and the offline tasks on its include path."""
    from meestral.evaluation.tasks import ensure_tasks

    argv = list(args.rest)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise MeestralError("nothing to pass to lm-eval: e.g. meestral lm-eval --model meestral "
                            "--model_args backbone=smollm2 --tasks meestral_arc_easy --limit 20")
    if "-h" in argv or "--help" in argv:  # lm-eval's help: no device, model, task download or hub needed
        from meestral.evaluation.lm_model import ARGS

        print("meestral lm-eval: lm-eval's own command line, with --model meestral registered (--model_args "
              f"key=value,... with keys {', '.join(ARGS)}; lists use ':') and MEEstral's offline tasks "
              "(meestral_arc_easy, ...) on its include path. lm-eval's help follows.\n")
        return _lm_eval_cli(argv)
    command = argv[0] if argv[0] in ("run", "ls", "validate") else "run"  # lm-eval inserts `run` when none is named
    model = _option(argv, "--model", "-M")
    if command == "run" and not model:  # lm-eval would fall back to `hf` and fail on a missing pretrained=
        raise MeestralError("lm-eval needs --model: add --model meestral --model_args backbone=smollm2 "
                            "(or another lm-eval model with its own --model_args)")
    model_args = {}
    if model == "meestral":  # the cheap check first: naming tasks means indexing every lm-eval task (seconds)
        model_args = _check_model_args(_option(argv, "--model_args", "-a") or "")
        if "batch_size" not in model_args and _option(argv, "--batch_size", "-b") is None:
            argv += ["--batch_size", "8"]  # lm-eval's default is 1; ours (model_args) is 8: half the CPU time
    if _option(argv, "--include_path") is None and command != "validate":
        argv += ["--include_path", str(ensure_tasks())]
    tasks = _option(argv, "--tasks", "-t")
    if tasks is not None and command == "run":
        _check_task_names(tasks, _option(argv, "--include_path"))
    _check_lm_eval_limit_and_output(argv)
    if command == "run":
        from meestral.validation import check_device

        check_device(model_args.get("device") or _option(argv, "--device") or "cuda:0")  # lm-eval's default device
    from meestral.data import hub_reachable

    if not hub_reachable():  # offline: don't let HF libraries wait on retries to the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return _lm_eval_cli(argv)


def _lm_eval_cli(argv) -> int:
    """lm-eval's own CLI on `argv`, with our model registered; its exit status."""
    import lm_eval.__main__ as lm_main

    import meestral.evaluation.lm_model  # noqa: F401  registers --model meestral

    old = sys.argv
    sys.argv = ["lm-eval"] + argv
    try:
        lm_main.cli_evaluate()
    except SystemExit as e:  # its help, and its own parser's errors
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    finally:
        sys.argv = old
    return 0


def _check_task_names(spec, include_path):
    from lm_eval.tasks import TaskManager

    names = _names(spec)
    if not names:
        raise MeestralError("--tasks is empty: name at least one task, e.g. meestral_arc_easy")
    # The include path alone first: indexing lm-eval's ~15,000 task configs costs seconds (~7 s of
    # CPU), and lm-eval indexes them again itself; only a name not found there needs them.
    known = set(TaskManager(include_path=include_path, include_defaults=False).all_tasks) if include_path else set()
    if any(n not in known and not os.path.exists(n) for n in names):
        known = set(TaskManager(include_path=include_path).all_tasks)
    bad = [n for n in names if n not in known and not os.path.exists(n)]
    if bad:
        offline = sorted(k for k in known if k.startswith("meestral_"))
        raise MeestralError(f"unknown task(s) {', '.join(bad)}: offline tasks are {', '.join(offline)}")


def _option(argv, *names):
    """The value of the last of lm-eval's options `names` in argv ('--x v' or '--x=v'), or None."""
    value = None
    for i, a in enumerate(argv):
        for n in names:
            if a == n:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            elif a.startswith(n + "="):
                value = a[len(n) + 1:]
    return value


def _check_lm_eval_limit_and_output(argv):
    limit = _option(argv, "--limit", "-L")
    if limit is not None:
        try:  # lm-eval reads a limit below 1 as a fraction of each task, else as a count (cut to a whole one)
            ok = 0 < float(limit) < 1 or math.isfinite(float(limit)) and float(limit) == int(float(limit)) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise MeestralError(f"--limit {limit!r} selects no examples: give a count >= 1 or a fraction in (0, 1)")
    out = _option(argv, "--output_path", "-o")
    if out is not None:
        check_output(out, "--output_path", folder=not out.endswith((".json", ".jsonl")))


def _check_model_args(spec) -> dict:
    """{key: value} of a meestral --model_args string, every key known."""
    from meestral.evaluation.lm_model import ARGS

    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise MeestralError(f"malformed --model_args entry {part!r}: write key=value pairs separated by commas "
                                "(lists with ':', e.g. exits=7:15:22)")
        key, value = (x.strip() for x in part.split("=", 1))
        if key not in ARGS:
            raise MeestralError(f"unknown --model_args key {key!r}: use {', '.join(ARGS)}")
        out[key] = value
    return out


def cmd_sweep(args):
    from meestral.evaluation.sweep import SweepSpec, run_sweep

    if not args.thresholds:
        raise MeestralError("the thresholds list is empty: pass e.g. --thresholds 0.5,0.7,0.9")
    # A sweep sets the threshold and policy of every point itself: these would be ignored.
    if args.threshold is not None:
        raise MeestralError("--threshold has no effect on a sweep (it runs every value of --thresholds): "
                            "list the values in --thresholds and drop --threshold")
    if args.verify:
        raise MeestralError("--verify has no effect on a sweep (it runs every policy of --policies): "
                            "add verify to --policies and drop --verify")
    check_output(args.out, "--out")
    lm = _lm(args)
    spec = SweepSpec(tasks=_names(args.tasks), thresholds=args.thresholds, policies=_names(args.policies),
                     static_layers=args.static_layers or [], layer_drops=args.layer_drop or [], limit=args.limit,
                     max_backlog=args.max_backlog, exit_output=args.exit_output)
    table = run_sweep(lm, spec, args.out, _heads_spec(args))
    print(f"{len(table.rows)} points in {args.out}", file=sys.stderr)
    return 0


def _check_tokens_fill_a_row(args):
    """--tokens is cut into rows of --seq-len: fewer than one row would be measured as a whole row."""
    if args.tokens < args.seq_len:
        raise MeestralError(f"--tokens {args.tokens} is less than one row of --seq-len {args.seq_len}: raise --tokens "
                            "or lower --seq-len")


def _heldout_sequences(bb, args):
    from meestral.data import heldout_rows

    check_context(bb, args.seq_len, f"--seq-len {args.seq_len}", "lower --seq-len",
                  rows=min(args.batch_size, args.tokens // args.seq_len))
    return heldout_rows(args.data, bb.tokenizer, args.tokens, args.seq_len)


def cmd_oracle(args):
    from meestral.backbones.loading import load_backbone
    from meestral.evaluation.lens import lens_ids, logit_lens
    from meestral.evaluation.oracle import oracle_report
    from meestral.evaluation.runner import task_token_sequences
    from meestral.evaluation.tasks import resolve_tasks

    _check_tokens_fill_a_row(args)
    check_output(args.out, "--out")
    check_output(Path(args.out).with_name("lens.json"), "the logit lens beside --out")
    bb = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    lens_ids(bb, args.lens_text)  # before the work: a text too long for the lens fails now
    heads = None
    if wants_heads(args):  # before the work: a bad folder fails now
        heads = build_heads(args, bb)
    L = bb.num_layers
    layers = args.exits or list(range(L - 1))
    out = {"num_layers": L, "sources": {}}
    rows = _heldout_sequences(bb, args)
    name = "embedded" if args.data == "embedded" else Path(args.data).name
    out["sources"][name] = oracle_report(bb, rows, layers, seq_len=args.seq_len, batch=args.batch_size)
    for task in resolve_tasks(_names(args.tasks or "")) if args.tasks else []:
        seqs = task_token_sequences(bb, [task], args.limit)
        out["sources"][task] = oracle_report(bb, seqs, layers, seq_len=args.seq_len, batch=args.batch_size)
    for src in out["sources"].values():
        src.setdefault("num_layers", L)
        if isinstance(src.get("agreement"), dict):  # the report reads a list aligned with `layers`
            ag = {str(k): v for k, v in src["agreement"].items()}
            src["agreement"] = [ag[str(l)] for l in src["layers"]]
        src.setdefault("bound_speedup", src.get("bound_speedup_layers"))
    lens = logit_lens(bb, heads, args.lens_text)
    _write_json(args.out, out)  # both files, once everything they hold is computed
    _write_json(Path(args.out).with_name("lens.json"), lens)
    for k, s in out["sources"].items():
        print(f"{k}: {s['tokens']} tokens, oracle mean layers run {s['mean_layers_run']:.1f}/{L} "
              f"(bound {s['bound_speedup']:.2f}x in layers)", file=sys.stderr)
    return 0


def cmd_calibrate(args):
    from meestral.backbones.loading import load_backbone
    from meestral.evaluation.calibration import calibrate_on_text

    _check_tokens_fill_a_row(args)
    check_output(args.out, "--out")
    bb = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    heads = build_heads(args, bb)
    out = calibrate_on_text(bb, heads, _heldout_sequences(bb, args), args.epsilon, args.delta, args.calib_fraction,
                            args.seed, args.method, args.unit, args.batch_size)
    out.update({"heads": _heads_spec(args), "backbone": args.backbone})
    _write_json(args.out, out)
    print(f"threshold {out['threshold']:.3f}: calibration agreement {out['calib_agreement']:.3f}, held-out "
          f"agreement {out['heldout_agreement']:.3f} (target >= {1 - args.epsilon:.3f} w.p. >= "
          f"{1 - args.delta:.2f}), held-out exit rate {out['heldout_exit_rate']:.1%}", file=sys.stderr)
    return 0


def cmd_report(args):
    from meestral.report.render import main_tradeoff_png, write_report

    if args.docs_png:
        check_output(args.docs_png, "--docs-png")
    html, md = write_report(args.results, args.out)
    print(f"report: {html} and {md}", file=sys.stderr)
    if args.docs_png:
        main_tradeoff_png(args.results, args.docs_png)
        print(f"main trade-off figure: {args.docs_png}", file=sys.stderr)
    return 0


def add_eval_parsers(sub):
    def common(p, decoding=True):
        """decoding: the options of a decoder (thresholds, policy, window); oracle and calibrate
        only read heads, so they do not take options they would ignore."""
        add_backbone_args(p)
        if decoding:
            add_exit_args(p)
        else:
            add_head_args(p, auto=False, exits_help="layers to measure at (default: every layer but the last); "
                          "with --head, also the exit points of its heads (default: every quarter)")
        p.add_argument("--batch-size", type=int, default=8, help="rows scored together")
        if decoding:
            p.add_argument("--max-length", type=int, default=None, help="token window (default: the model's)")

    e = sub.add_parser("eval", help="lm-eval tasks with early exits (offline suite)")
    common(e)
    e.add_argument("--tasks", required=True, help="comma-separated, e.g. arc_easy,piqa")
    e.add_argument("--limit", type=int, help="examples per task")
    e.add_argument("--out", help="write results + accounting as JSON")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("lm-eval", help="lm-eval's own CLI with --model meestral and the offline tasks", add_help=False)
    x.add_argument("rest", nargs="...", help="lm-eval's own arguments (meestral lm-eval --help lists them)")
    x.set_defaults(func=cmd_lm_eval)

    s = sub.add_parser("sweep", help="thresholds x policies x tasks with baselines; resumable")
    common(s)
    s.add_argument("--tasks", required=True, help="comma-separated, e.g. arc_easy,piqa")
    s.add_argument("--thresholds", type=floats, required=True, help="e.g. 0.5,0.7,0.9")
    s.add_argument("--policies", default="copy,catchup,verify", help="any of copy,propagate,catchup,verify,speculate")
    s.add_argument("--static-layers", type=ints, help="static exit-at-layer baselines, e.g. 7,15,22")
    s.add_argument("--layer-drop", type=ints, help="DYNAMAX layer-drop baselines: blocks dropped, e.g. 2,4,8")
    s.add_argument("--limit", type=int, help="examples per task (default: all)")
    s.add_argument("--out", default="results/sweep.jsonl", help="results file; a rerun adds only the missing points")
    s.set_defaults(func=cmd_sweep)

    o = sub.add_parser("oracle", help="per-layer agreement and the oracle exit bound; also the logit lens")
    common(o, decoding=False)
    o.add_argument("--data", default="embedded", help="held-out text: embedded, a text file or a folder")
    o.add_argument("--tokens", type=int, default=4096, help="held-out tokens measured")
    o.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    o.add_argument("--tasks", help="also on these tasks' prompts")
    o.add_argument("--limit", type=int, default=50, help="examples per task of --tasks")
    o.add_argument("--lens-text", default="To be, or not to be, that is the question: whether 'tis nobler in the mind",
                   help=f"text followed through the layers by the logit lens (lens.json beside --out), at most "
                   f"{LENS_TOKENS} tokens")
    o.add_argument("--out", default="results/oracle.json", help="where the bound goes (JSON)")
    o.set_defaults(func=cmd_oracle)

    c = sub.add_parser("calibrate", help="Learn-then-Test thresholds: agreement >= 1-eps w.p. >= 1-delta")
    common(c, decoding=False)
    c.add_argument("--epsilon", type=float, default=0.1, help="disagreement with the full model allowed")
    c.add_argument("--delta", type=float, default=0.1, help="chance that the guarantee fails")
    c.add_argument("--method", choices=["binomial", "hb"], default=None,
                   help="the p-value: binomial or hb (Hoeffding-Bentkus) (default: binomial per token, hb per sequence)")
    c.add_argument("--unit", choices=["token", "sequence"], default="token", help="what the guarantee counts")
    c.add_argument("--data", default="embedded", help="held-out text: embedded, a text file or a folder")
    c.add_argument("--tokens", type=int, default=8192, help="held-out tokens, split into calibration and test rows")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    c.add_argument("--calib-fraction", type=float, default=0.5, help="share of the rows calibrated on")
    c.add_argument("--seed", type=int, default=0, help="seed of the split")
    c.add_argument("--out", default="results/calibration.json", help="where the threshold goes (JSON)")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("report", help="plots + one self-contained HTML (and Markdown) report")
    r.add_argument("--results", default="results", help="folder holding sweep.jsonl (and oracle.json, ...)")
    r.add_argument("--out", default=None, help="default: the results folder")
    r.add_argument("--docs-png", help="also write the main trade-off figure here")
    r.set_defaults(func=cmd_report)
