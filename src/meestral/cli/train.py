"""`meestral train`: the command-line face of training.head_training (TrainConfig, train).

    meestral train --backbone smollm2 --exits 7,15,22,27 --data embedded --steps 300 --out runs/h
    torchrun --nproc_per_node 2 -m meestral.cli.train train ...   # DDP over the heads

`python -m meestral.cli.train train ...` runs the same command with the same error handling as
`meestral` (one line `meestral: error: ...`, exit status 2), for launchers such as torchrun.
"""

from __future__ import annotations

import sys

from meestral.cli.common import add_backbone_args, floats, ints


def add_train_parser(sub):
    """Register `train` on the subparsers `sub` of the meestral parser."""
    t = sub.add_parser("train", help="train exit heads on a frozen backbone")
    add_backbone_args(t)
    t.add_argument("--exits", type=ints, help="exit points, e.g. 7,15,22,27 (default: every quarter)")
    t.add_argument("--head-features", default="hidden", help="hidden | hidden+aux (Mamba mixer output joined)")
    t.add_argument("--mlp-hidden", type=int, default=0, help="hidden width of an MLP head (0: linear head)")
    t.add_argument("--data", default="auto",
                   help="embedded | FILE or FOLDER (.txt/.jsonl/.parquet) | hf:<dataset>[:<config>] | auto "
                        "(FineWeb-Edu sample-10BT when online, else embedded)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per training row")
    t.add_argument("--batch", type=int, default=4, help="global rows per step (split over torchrun processes)")
    t.add_argument("--steps", type=int, help="optimiser steps (default: 200 unless --tokens is given)")
    t.add_argument("--tokens", type=int, help="train on this many tokens instead of --steps")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate of the heads")
    t.add_argument("--optimizer", default="schedulefree", help="schedulefree | adamw (warm-up + cosine)")
    t.add_argument("--warmup", type=int, help="warm-up steps (default: 5%% of the run)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    t.add_argument("--topk", type=int, default=15, help="label 1 when the final token is in the exit's top-k (1: strict)")
    t.add_argument("--balance", action="store_true", help="weigh positives by negatives/positives (per head)")
    t.add_argument("--head-weights", type=floats, help="loss weight per exit point (default: 1 each)")
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip per head")
    t.add_argument("--log-every", type=int, default=10, help="steps per train record (JSONL, TensorBoard)")
    t.add_argument("--val-every", type=int, default=50, help="steps between validations")
    t.add_argument("--val-rows", type=int, default=16, help="held-out sequences of --seq-len tokens")
    t.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    t.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    t.add_argument("--shuffle-buffer", type=int, default=64, help="packed sequences per row in the shuffle buffer")
    t.add_argument("--out", default="runs/heads", help="output folder (heads/, checkpoint.pt, log.jsonl, curves.png)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (fresh start if none)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data order and the heads' initialisation")
    t.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen backbone over the "
                   "processes (FSDP2), for backbones larger than one GPU")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    return t


def cmd_train(args):
    from meestral.training.head_training import TrainConfig, train

    if args.steps is None and args.tokens is None:
        args.steps = 200
    cfg = TrainConfig(
        backbone=args.backbone, exits=args.exits, features=args.head_features, mlp_hidden=args.mlp_hidden,
        data=args.data, seq_len=args.seq_len, batch=args.batch, steps=args.steps, tokens=args.tokens, lr=args.lr,
        optimizer=args.optimizer, warmup=args.warmup, weight_decay=args.weight_decay, topk=args.topk,
        balance=args.balance, head_weights=args.head_weights, clip=args.clip, log_every=args.log_every,
        val_every=args.val_every, val_rows=args.val_rows, val_fraction=args.val_fraction, ckpt_every=args.ckpt_every,
        shuffle_buffer=args.shuffle_buffer, out=args.out, resume=args.resume, seed=args.seed,
        device=args.device, dtype=args.dtype, fsdp=args.fsdp, progress=not args.no_progress,
    )
    last = train(cfg)
    if last:
        from meestral.training.run_log import dumps

        print(dumps(last))  # strict JSON: an undefined metric is null
    return 0


def make_parser():
    """The `meestral` parser with `train` alone (what `python -m meestral.cli.train` runs)."""
    from meestral.cli.common import Parser

    p = Parser(prog="meestral", description="Train exit heads on a frozen backbone.")
    add_train_parser(p.add_subparsers(dest="command", required=True, parser_class=Parser))
    return p


if __name__ == "__main__":
    # `torchrun -m meestral.cli.train train ...` (torchrun needs a module to run): the same
    # parser and error handling as `meestral train`.
    from meestral.cli.common import dispatch, run

    sys.exit(run(lambda: dispatch(make_parser(), sys.argv[1:])))
