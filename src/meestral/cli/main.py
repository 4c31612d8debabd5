"""`meestral` command line. Commands stay thin: the library does the work.

  meestral generate  [PROMPT] [--file F]   early-exit generation, tokens coloured by exit layer (generate.py)
  meestral info      [--backbone B]        backbone shapes, identity and per-layer costs (generate.py)
  meestral demo                            the embedded backbones, generation and evaluation (tools.py)
  meestral bench                           CPU/GPU decode benchmark (forced exits), JSON lines (tools.py)
  meestral train     --exits ... --out DIR  train exit heads on a frozen backbone (train.py)
  meestral eval      --tasks arc_easy,...   lm-eval tasks with early exits (evaluate.py)
  meestral lm-eval   ARGS...                lm-eval's own CLI, `--model meestral` registered
  meestral sweep     --tasks ... --thresholds ...   thresholds x policies x tasks + baselines
  meestral oracle | calibrate | report      the bound, Learn-then-Test thresholds, the report
  meestral distill   sample|train           distil a Mamba-2 student from a teacher (distill.py)
  meestral adapt     train|export|compare   adapt a backbone for early exit (adapt.py)

Every user error ends with one line `meestral: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from meestral.cli.common import Parser, dispatch, run


def make_parser():
    from meestral import __version__
    from meestral.cli.adapt import add_adapt_parser
    from meestral.cli.distill import add_distill_parser
    from meestral.cli.evaluate import add_eval_parsers
    from meestral.cli.generate import add_generate_parsers
    from meestral.cli.tools import add_tool_parsers
    from meestral.cli.train import add_train_parser

    p = Parser(prog="meestral", description="Early exits for Transformer and state-space LLMs.")
    p.add_argument("--version", action="version", version=f"meestral {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    # In the order `meestral --help` lists them.
    for add in (add_generate_parsers, add_tool_parsers, add_train_parser, add_eval_parsers, add_distill_parser,
                add_adapt_parser):
        add(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":  # everything after it belongs to lm-eval's own parser
        from types import SimpleNamespace

        from meestral.cli.evaluate import cmd_lm_eval

        return run(lambda: cmd_lm_eval(SimpleNamespace(rest=argv[1:])))
    return run(lambda: dispatch(make_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
