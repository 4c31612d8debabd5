"""`meestral distill sample|train|export`: the command-line face of meestral.training.distill and
(`sample`) meestral.training.teacher_text.

    meestral distill sample --teacher smollm2 --out /tmp/d/data --seconds 900 --device cuda
    meestral distill train  --teacher smollm2 --data /tmp/d/data --out /tmp/d/run --seconds 840
    meestral distill train  --init mamba2-smol --data /tmp/d/data --out /tmp/d/run2 --seconds 600

recipes/mamba2-smol/ runs both at once on one GPU to build the embedded `mamba2-smol`.
"""

from __future__ import annotations

import json


def _shape(text: str) -> dict:
    """'hidden_size=384,num_hidden_layers=24' -> dict of ints."""
    from meestral.errors import MeestralError

    from meestral.training.distill import check_shape

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise MeestralError(f"--shape wants key=integer pairs like hidden_size=384, got {part!r}") from None
    check_shape(out)
    return out


DEVICE_HELP = "cuda | cuda:N | cpu (default: cuda when a GPU is visible, else cpu)"


def add_distill_parser(sub):
    d = sub.add_parser("distill", help="distil a Mamba-2 student from a teacher (how mamba2-smol is made)")
    dsub = d.add_subparsers(dest="distill_command", required=True, parser_class=type(d))

    s = dsub.add_parser("sample", help="write shards of text the teacher samples from varied prompts")
    s.add_argument("--teacher", default="smollm2", help="smollm2 | HF folder")
    s.add_argument("--out", required=True, help="folder for shard-*.pt")
    s.add_argument("--batch", type=int, default=512, help="prompts per generate call (one shard)")
    s.add_argument("--max-new-tokens", type=int, default=384, help="tokens sampled per prompt")
    s.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    s.add_argument("--shards", type=int, help="stop after this many shards")
    s.add_argument("--seconds", type=float, help="stop after this long (also: a file OUT/STOP)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--device", help=DEVICE_HELP)
    s.set_defaults(func=cmd_sample)

    t = dsub.add_parser("train", help="train the student on teacher shards + the embedded corpus")
    t.add_argument("--teacher", default="smollm2", help="smollm2 | HF folder: the model distilled from")
    t.add_argument("--data", help="folder of teacher shards (read as they appear)")
    t.add_argument("--corpus", default="embedded", help="text source mixed in ('none' for none)")
    t.add_argument("--corpus-share", type=float, help="share of corpus rows when --data is given (default 0.05)")
    t.add_argument("--out", default="runs/distill", help="folder: checkpoint.pt, log.jsonl, the student")
    t.add_argument("--shape", type=_shape, default={}, help="student shape overrides, e.g. hidden_size=384")
    t.add_argument("--init", help="continue from these weights instead of a random student: mamba2-smol | "
                                  "GGUF file (distill export's) | HF folder (the shape is theirs)")
    t.add_argument("--steps", type=int, help="optimiser steps (or --seconds)")
    t.add_argument("--seconds", type=float, help="train this long: the step count is fixed after 20 steps")
    t.add_argument("--batch", type=int, default=64, help="rows per step")
    t.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    t.add_argument("--lr", type=float, help="peak learning rate (default 3e-3; with --init 1.5e-3); the decay ends at lr/10")
    t.add_argument("--warmup", type=int, help="warm-up steps (default 200; with --init 50)")
    t.add_argument("--ce-weight", type=float, default=0.2, help="cross-entropy on the tokens, added to the KL")
    t.add_argument("--kd-topk", type=int, default=0,
                   help="KL over the teacher's k most likely tokens and the rest as one outcome (0: whole vocabulary)")
    t.add_argument("--teacher-cache-gb", type=float, default=0.0,
                   help="with --kd-topk: GiB of device memory keeping the teacher's top-k of rows seen (0: off)")
    t.add_argument("--eval-every", type=int, default=250, help="steps between held-out measurements")
    t.add_argument("--ckpt-every", type=int, default=200, help="steps between checkpoints")
    t.add_argument("--compile", action="store_true", help="torch.compile the student and the KD loss")
    t.add_argument("--no-resume", action="store_true", help="start over instead of continuing the run in --out")
    t.add_argument("--seed", type=int, default=0, help="seed of the student and the data order")
    t.add_argument("--device", help=DEVICE_HELP)
    t.set_defaults(func=cmd_train)

    e = dsub.add_parser("export", help="HF folder + Q8_0 GGUF from a train run's last checkpoint")
    e.add_argument("--teacher", default="smollm2", help="the teacher the run was distilled from (its tokenizer)")
    e.add_argument("--out", required=True, help="the train run's --out folder")
    e.add_argument("--shape", type=_shape, default={}, help="only for a run without config.json (which names the shape)")
    e.add_argument("--device", help=DEVICE_HELP)
    e.set_defaults(func=cmd_export)
    return d


def cmd_sample(args):
    from meestral.training.distill import auto_device
    from meestral.training.teacher_text import sample_teacher

    n = sample_teacher(args.teacher, args.out, batch=args.batch, max_new_tokens=args.max_new_tokens,
                       top_k=args.top_k, temperature=args.temperature,
                       shards=args.shards, seconds=args.seconds, seed=args.seed, device=auto_device(args.device))
    print(json.dumps({"shards": n}))
    return 0


def cmd_train(args):
    from meestral.errors import MeestralError
    from meestral.training.distill import DistillConfig, distill
    from meestral.training.run_log import dumps

    if args.steps is None and args.seconds is None:
        args.steps = 1000
    share = {}
    if args.corpus_share is not None:
        if not args.data or args.corpus == "none":
            raise MeestralError("--corpus-share splits a batch between --corpus and --data, and " + (
                "--data is not given: add --data" if not args.data else "--corpus is none: give a corpus") +
                ", or drop --corpus-share")
        share = {"corpus_share": args.corpus_share}
    cfg = DistillConfig(teacher=args.teacher, data=args.data, corpus=None if args.corpus == "none" else args.corpus,
                        **share, out=args.out, shape=args.shape, init=args.init,
                        steps=args.steps, seconds=args.seconds, batch=args.batch, seq_len=args.seq_len,
                        lr=args.lr, warmup=args.warmup,
                        ce_weight=args.ce_weight, kd_topk=args.kd_topk,
                        teacher_cache_gb=args.teacher_cache_gb, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                        compile=args.compile, resume=not args.no_resume, seed=args.seed, device=args.device)
    print(dumps(distill(cfg)))
    return 0


def cmd_export(args):
    from meestral.training.distill import DistillConfig, export
    from meestral.training.run_log import dumps

    print(dumps(export(DistillConfig(teacher=args.teacher, out=args.out, shape=args.shape, device=args.device))))
    return 0
