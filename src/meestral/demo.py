"""`make demo` / `meestral demo`: the embedded backbone generating with early exits.

Runs the same chat prompts at full depth and under several confidence measures, thresholds and
state policies, then prints the accounting side by side, with each configuration's agreement with
the full model's tokens. Everything is offline.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from meestral.accounting import summarize
from meestral.backbones.loading import load_backbone
from meestral.decoding import EarlyExitDecoder, SamplingOptions
from meestral.heads import ExitHeads

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write one sentence about the sea.",
]


def agreement(tokens, reference) -> float:
    """Fraction of positions where the tokens equal the full model's (after the first divergence
    the contexts differ, so this is a generous measure; the prefix length is stricter)."""
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])) / max(n, 1)


def common_prefix(tokens, reference) -> int:
    k = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        k += 1
    return k


def demo_heads(spec, bb, exits, steps=40):
    """Classifier heads trained briefly (strict top-1 labels, balanced) on the embedded corpus,
    cached per backbone fingerprint so a second `make demo` reuses them."""
    from meestral.assets import cache_dir
    from meestral.heads import ExitHeads
    from meestral.training import TrainConfig, train

    out = cache_dir() / f"demo-heads-{bb.fingerprint()}-{'-'.join(map(str, exits))}-{steps}"
    if not (out / "heads" / "heads.json").exists():
        print(f"training demo exit heads ({steps} steps of 4 x 128 tokens, cached in {out}) ...", file=sys.stderr)
        train(TrainConfig(backbone=spec, exits=list(exits), data="embedded", seq_len=128, batch=4, steps=steps,
                          topk=1, balance=True, val_every=steps, val_rows=8, ckpt_every=10 * steps,
                          out=str(out), seed=0, device=str(bb.device)))
    return ExitHeads.load(out / "heads", bb)


def run_demo(backbone="smollm2", max_new_tokens=40, device="cpu", out=None) -> int:
    out = out or sys.stdout
    print(f"loading backbone {backbone!r} ...", file=sys.stderr)
    bb = load_backbone(backbone, device=device)
    L = bb.num_layers
    exits = sorted({L // 4, L // 2, 3 * L // 4, L - 3} - {L - 1})
    trained = demo_heads(backbone, bb, exits)
    configs = [("full depth", None, 1.0, "copy")]
    for kind, th in (("classifier", 0.7), ("softmax", 0.9), ("saturation", 0.95)):
        heads = trained if kind == "classifier" else ExitHeads(kind, exits, bb)
        for policy in ("copy", "propagate", "catchup", "verify"):
            configs.append((f"{kind} > {th}", heads, th, policy))
    opts = SamplingOptions(max_new_tokens=max_new_tokens)
    results = []
    bar = tqdm(total=len(configs) * len(PROMPTS), desc="demo", unit="run", file=sys.stderr)
    reference = None
    for name, heads, th, policy in configs:
        dec = EarlyExitDecoder(bb, heads, th, "catchup" if policy == "verify" else policy, verify=policy == "verify")
        gens = []
        for p in PROMPTS:
            gens.append(dec.generate([p], opts, chat=True)[0])
            bar.update(1)
        if reference is None:
            reference = gens
        stats = [s for g in gens for s in g.stats]
        s = summarize(stats, dec.cost, L, [d for g in gens for d in g.discarded])
        agree = sum(agreement(g.token_ids, r.token_ids) for g, r in zip(gens, reference)) / len(gens)
        prefix = sum(common_prefix(g.token_ids, r.token_ids) for g, r in zip(gens, reference)) / len(gens)
        results.append((name, policy if heads else "-", s, agree, prefix, gens[0].text))
    bar.close()

    print(f"\nMEEstral demo: {bb.name} ({L} layers, exit points {exits}), greedy, {max_new_tokens} new tokens, "
          f"{len(PROMPTS)} chat prompts", file=out)
    print("layers run = blocks the token itself went through; deep = deep passes per token; weight bytes include "
          "probe reads (a softmax probe reads the whole LM head) and, under verify, work on rolled-back tokens.",
          file=out)
    hdr = (f"{'confidence':<18} {'policy':<10} {'exit%':>6} {'layers':>7} {'deep':>5} {'wbytes':>7} {'ms/tok':>7} "
           f"{'agree':>6} {'prefix':>7}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for name, policy, s, agree, prefix, _ in results:
        print(f"{name:<18} {policy:<10} {s['exit_rate']:>6.0%} {s['mean_layers_run']:>7.1f} "
              f"{s['deep_passes_per_token']:>5.2f} {s['weight_bytes_ratio']:>6.2f}x {s['ms_per_token']:>7.1f} "
              f"{agree:>6.0%} {prefix:>7.1f}", file=out)
    print("\nagree = tokens equal to the full model's at the same position; prefix = mean tokens before the "
          "first difference.\ncopy/propagate approximate the skipped layers' state; catchup keeps it exact; verify "
          "also checks every early token, so its output is the full model's.\nFirst prompt's answer per "
          "configuration:", file=out)
    for name, policy, _, _, _, text in results:
        print(f"  [{name}, {policy}] {text.strip()[:110]!r}", file=out)
    return 0
