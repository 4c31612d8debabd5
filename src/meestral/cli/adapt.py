"""`meestral adapt train|export|compare`: the command-line face of meestral.training.adapt.

    meestral adapt train   --backbone smollm2 --out runs/ee --steps 2000 [--samples DIR] [--resume]
    meestral adapt export  --out runs/ee [--file F]          (from the last checkpoint)
    meestral adapt compare --backbone smollm2 --adapter runs/ee/adapter.safetensors --out results/ee

`train` writes OUT/adapter.safetensors when its last step is done; with --seconds it stops early
with a checkpoint and the same command with --resume continues. recipes/adapt/ runs it on a GPU.
"""

from __future__ import annotations


from meestral.cli.common import floats, ints


def add_adapt_parser(sub):
    a = sub.add_parser("adapt", help="adapt a backbone for early exit (LoRA + early-exit loss + distillation)")
    asub = a.add_subparsers(dest="adapt_command", required=True, parser_class=type(a))

    t = asub.add_parser("train", help="train LoRA adapters with the early-exit loss; export at the end")
    t.add_argument("--backbone", default="smollm2", help="smollm2 | mamba2-smol | random:<shape> | folder")
    t.add_argument("--out", default="runs/adapt", help="folder: checkpoint.pt, log.jsonl, curves.png, adapter")
    t.add_argument("--exits", type=ints, help="exit points trained (default: every layer but the last)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank")
    t.add_argument("--alpha", type=float, help="LoRA scale numerator (default: 2 x rank)")
    t.add_argument("--samples", help="folder of teacher shards from `meestral distill sample`")
    t.add_argument("--corpus", default="embedded", help="text source mixed in; its held-out split is measured on")
    t.add_argument("--corpus-share", type=float, help="share of corpus rows when --samples is given (default 0.5)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    t.add_argument("--batch", type=int, default=8, help="rows per step")
    t.add_argument("--steps", type=int, default=200, help="optimiser steps")
    t.add_argument("--seconds", type=float, help="stop this call after so long (checkpointed; --resume continues)")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapters")
    t.add_argument("--optimizer", choices=["adamw", "schedulefree"], default="adamw", help="adamw | schedulefree")
    t.add_argument("--warmup", type=int, help="steps (default: 5%% of the run)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    t.add_argument("--final-weight", type=float, default=1.0, help="weight of the full-depth distillation term")
    t.add_argument("--exit-weights", type=floats, help="one weight per exit point (default: all 1)")
    t.add_argument("--ce-weight", type=float, default=0.0, help="cross-entropy on the tokens, added to each KL")
    t.add_argument("--ce-target", choices=["data", "teacher"], default="data",
                   help="labels of --ce-weight's cross-entropy: the next tokens, or the original model's top-1")
    t.add_argument("--curriculum", choices=["all", "rotate", "gradual"], default="rotate",
                   help="which exit points train at each step: all | rotate | gradual")
    t.add_argument("--rotation", type=int, default=4, help="rotate: every Nth exit point trains at each step")
    t.add_argument("--curriculum-share", type=float, default=0.5, help="gradual: the shallowest exit joins here")
    t.add_argument("--layer-dropout", type=float, default=0.0, help="skip rate at the last layer (linear in depth)")
    t.add_argument("--val-every", type=int, default=50, help="steps between validations")
    t.add_argument("--val-tokens", type=int, default=4096, help="held-out tokens measured at each validation")
    t.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints")
    t.add_argument("--log-every", type=int, default=10, help="steps per log record")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--seed", type=int, default=0, help="seed of the adapters and the data order")
    t.add_argument("--init-adapter", help="continue from this adapter (a file, or smollm2-ee / mamba2-smol-ee for the "
                   "shipped one) instead of B = 0; its rank may be lower than --rank")
    t.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    t.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 | float16")
    t.add_argument("--export-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="of the adapter file (bfloat16: half the size)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = asub.add_parser("export", help="the adapter file from a run's last checkpoint")
    e.add_argument("--out", required=True, help="the train run's --out folder")
    e.add_argument("--file", help="where to write it (default: OUT/adapter.safetensors)")
    e.add_argument("--export-dtype", choices=["float32", "bfloat16"], help="default: the run's")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    e.set_defaults(func=cmd_export)

    c = asub.add_parser("compare", help="original vs adapted: per-layer agreement, oracle bound, perplexity")
    c.add_argument("--backbone", default="smollm2", help="the backbone the adapter was trained on")
    c.add_argument("--adapter", required=True, help="adapter file (adapt train/export)")
    c.add_argument("--corpus", default="embedded", help="held-out split of this source is measured on")
    c.add_argument("--tokens", type=int, default=4096, help="held-out tokens measured")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    c.add_argument("--batch-size", type=int, default=8, help="rows scored together")
    c.add_argument("--out", default="results/adapt", help="folder: compare.json, agreement.png")
    c.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    c.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 | float16")
    c.set_defaults(func=cmd_compare)
    return a


def corpus_share(args, samples_option: str) -> dict:
    """--corpus-share as a config field: only where teacher samples are given (it splits each batch
    between them and the corpus); left out, the config's default."""
    from meestral.errors import MeestralError

    if args.corpus_share is None:
        return {}
    if not getattr(args, samples_option.lstrip("-").replace("-", "_")):
        raise MeestralError(f"--corpus-share splits a batch between the corpus and {samples_option}, which is not "
                            f"given: add {samples_option}, or drop --corpus-share")
    return {"corpus_share": args.corpus_share}


def init_adapter_file(spec: str | None) -> str | None:
    """--init-adapter: a path, or the name of an early-exit-adapted embedded backbone (its file)."""
    from meestral.backbones.loading import EE_ADAPTED, adapter_path

    return str(adapter_path(spec)) if spec in EE_ADAPTED else spec


def cmd_train(args):
    from meestral.training.adapt import AdaptConfig, adapt
    from meestral.training.run_log import dumps

    cfg = AdaptConfig(**corpus_share(args, "--samples"),
        backbone=args.backbone, out=args.out, exits=args.exits, rank=args.rank, alpha=args.alpha, samples=args.samples,
        corpus=args.corpus, seq_len=args.seq_len, batch=args.batch, steps=args.steps,
        seconds=args.seconds, lr=args.lr, optimizer=args.optimizer, warmup=args.warmup, weight_decay=args.weight_decay,
        clip=args.clip, final_weight=args.final_weight, exit_weights=args.exit_weights, ce_weight=args.ce_weight,
        ce_target=args.ce_target,
        curriculum=args.curriculum, rotation=args.rotation, curriculum_share=args.curriculum_share,
        layer_dropout=args.layer_dropout, val_every=args.val_every, val_tokens=args.val_tokens,
        ckpt_every=args.ckpt_every, log_every=args.log_every, resume=args.resume, seed=args.seed,
        init_adapter=init_adapter_file(args.init_adapter), device=args.device,
        dtype=args.dtype, export_dtype=args.export_dtype, progress=not args.no_progress)
    print(dumps(adapt(cfg)))
    return 0


def cmd_export(args):
    from meestral.training.adapt import export

    from meestral.training.run_log import dumps

    print(dumps(export(args.out, args.file, dtype=args.export_dtype, device=args.device)))
    return 0


def cmd_compare(args):
    from meestral.training.adapt_compare import compare

    res = compare(args.backbone, args.adapter, args.out, corpus=args.corpus, tokens=args.tokens,
                  seq_len=args.seq_len, batch=args.batch_size, device=args.device, dtype=args.dtype)
    for k in ("original", "adapted"):
        m = res[k]
        print(f"{k}: oracle {m['mean_layers_run']:.2f}/{res['num_layers']} layers (bound "
              f"{m['bound_speedup_layers']:.2f}x), held-out perplexity {m['heldout_ppl']:.2f}")
    d = res["drift"]
    print(f"drift of the full model: KL(original || adapted) {d['kl_per_token']:.4f} nats a token, "
          f"same top-1 on {d['top1_agreement']:.1%} of {d['tokens']} tokens")
    # where the layers go: tokens by the final layer's own top-1 probability
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print("final top-1 probability | share of tokens | layers run | need every layer   (original -> adapted)")
    for a, b in zip(res["original"]["by_confidence"], res["adapted"]["by_confidence"]):
        if a["tokens"] or b["tokens"]:
            print(f"{a['final_prob'][0]:.1f}-{a['final_prob'][1]:.1f} | {a['share']:.1%} -> {b['share']:.1%} | "
                  f"{f(a['mean_layers_run'], '.2f')} -> {f(b['mean_layers_run'], '.2f')} | "
                  f"{f(a['full_depth_share'], '.1%')} -> {f(b['full_depth_share'], '.1%')}")
    return 0
