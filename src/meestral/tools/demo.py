"""`make demo` / `meestral demo`: the embedded backbones generating with early exits.

For each backbone (by default both embedded ones: SmolLM2-135M and the Mamba-2 `mamba2-smol`),
runs the same chat prompts at full depth and under several confidence measures, thresholds and
state policies, prints the accounting side by side with each configuration's agreement with the
full model's tokens, and writes its evaluation report; with two backbones or more, a comparison
page sets them side by side (report/compare.py). Everything is offline.
"""

from __future__ import annotations

import sys

from pathlib import Path

from tqdm import tqdm

from meestral.decoding.accounting import summarize
from meestral.backbones.loading import load_backbone
from meestral.decoding.decoder import EarlyExitDecoder
from meestral.decoding.config import STATE_POLICIES, ExitConfig
from meestral.decoding.heads import ExitHeads
from meestral.decoding.sampling import SamplingOptions
from meestral.report.text import shorten

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
    from meestral.backbones.assets import cache_dir
    from meestral.decoding.heads import ExitHeads
    from meestral.training.head_training import TrainConfig, train

    out = cache_dir() / f"demo-heads-{bb.fingerprint()}-{'-'.join(map(str, exits))}-{steps}"
    if not (out / "heads" / "heads.json").exists():
        print(f"training demo exit heads ({steps} steps of 4 x 128 tokens, cached in {out}) ...", file=sys.stderr)
        train(TrainConfig(backbone=spec, exits=list(exits), data="embedded", seq_len=128, batch=4, steps=steps,
                          topk=1, balance=True, val_every=steps, val_rows=8, ckpt_every=10 * steps,
                          out=str(out), seed=0, device=str(bb.device)))
    return ExitHeads.load(out / "heads", bb)


def evaluation_report(spec, bb, heads, out_dir, tasks=("arc_easy", "piqa"), limit=16, thresholds=(0.4, 0.8),
                      oracle_tokens=512, log=None) -> Path:
    """The evaluation pipeline on a small slice, ending in the report: a sweep (full model, three
    policies x thresholds, a static exit and a layer-drop baseline) on lm-eval tasks of the offline
    suite, the oracle bound and logit lens, a Learn-then-Test calibration, the heads' training
    curves. Everything lands in `out_dir`; a second run reuses finished sweep points."""
    import shutil

    from meestral.data import heldout_rows
    from meestral.evaluation.calibration import calibrate_on_text
    from meestral.evaluation.lens import logit_lens
    from meestral.evaluation.lm_model import MeestralLM
    from meestral.evaluation.oracle import oracle_report
    from meestral.evaluation.runner import task_token_sequences
    from meestral.evaluation.tasks import resolve_tasks
    from meestral.evaluation.sweep import SweepSpec, run_sweep
    from meestral.files import write_json
    from meestral.report.render import write_report

    log = log or sys.stderr
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L = bb.num_layers
    lm = MeestralLM(backbone=bb, head="full", batch_size=16)
    lm.spec = spec
    lm.configure(ExitConfig(heads=heads))
    run_sweep(lm, SweepSpec(list(tasks), list(thresholds), ["copy", "catchup", "verify"],
                            static_layers=[heads.exit_points[-1]], layer_drops=[max(1, L // 8)], limit=limit),
              out_dir / "sweep.jsonl", f"classifier:{heads.source or 'demo'}", log=log)
    print("oracle bound and logit lens ...", file=log)
    rows = heldout_rows("embedded", bb.tokenizer, oracle_tokens, 128)
    oracle = {"num_layers": L, "sources": {"embedded": oracle_report(bb, rows, list(range(L - 1)), seq_len=128)}}
    for task in resolve_tasks(list(tasks)):  # the bound on the very prompts the sweep scored
        seqs = task_token_sequences(bb, [task], limit)
        oracle["sources"][task] = oracle_report(bb, seqs, list(range(L - 1)), seq_len=256)
    write_json(out_dir / "oracle.json", oracle)
    write_json(out_dir / "lens.json", logit_lens(bb, heads, "To be, or not to be, that is the question: whether 'tis "
                                                        "nobler in the mind to suffer"))
    print("calibration (Learn-then-Test, epsilon 0.2, delta 0.1) ...", file=log)
    rows = heldout_rows("embedded", bb.tokenizer, 4 * oracle_tokens, 128)
    write_json(out_dir / "calibration.json", calibrate_on_text(bb, heads, rows, 0.2, 0.1))
    train_log = Path(heads.source).parent / "log.jsonl" if getattr(heads, "source", None) else None
    if train_log is not None and train_log.exists():
        (out_dir / "train").mkdir(exist_ok=True)
        shutil.copyfile(train_log, out_dir / "train" / "log.jsonl")
    html, _ = write_report(out_dir, title=f"MEEstral demo report: {bb.name}")
    return html


def answer_line(name, policy, text, width=110) -> str:
    """One configuration's answer as people read it: invisible characters drawn (⏎, ⍽), at most
    `width` characters and "…" where cut (not a Python repr)."""
    shown = shorten(text, width) or shorten(text, width, strip=False)  # white space alone: drawn (␣, ⏎)
    return f"  [{name}, {policy}] {shown or '(no text)'}"


DEFAULT_BACKBONES = ("smollm2", "mamba2-smol")


def run_demo(backbone=DEFAULT_BACKBONES, max_new_tokens=40, device="cpu", out=None, report_dir=None) -> int:
    """One backbone spec or several (a list, or names joined by commas); with several and a
    report folder, each report goes to `<report_dir>/<name>/` and the comparison to `report_dir`."""
    specs = [s.strip() for s in backbone.split(",") if s.strip()] if isinstance(backbone, str) else list(backbone)
    if len(specs) == 1:
        return demo_one(specs[0], max_new_tokens, device, out, report_dir)
    reports = {}
    for spec in specs:
        sub = None if report_dir is None else Path(report_dir) / spec.replace(":", "-").replace("/", "-")
        # Several backbones share `make demo`'s ten minutes: one prompt, one task slice of 24
        # documents (ARC-Easy), 8 head-training steps (the step's logit lens at every exit point
        # over a 49k vocabulary is most of the demo's time), 256 held-out tokens for the oracle.
        # 24 documents, not fewer: at 8 and 16 mamba2-smol's full depth scores acc_norm 0.125 and
        # 0.188, below ARC-Easy's chance of 0.25, so every panel of it was flat noise; at 24, 0.333
        # (its 48-document figure is 0.354; measured 2026-12-05). One backbone gets the full demo.
        demo_one(spec, max_new_tokens, device, out, sub, limit=24, head_steps=8, prompts=PROMPTS[:1],
                 tasks=("arc_easy",), oracle_tokens=256)
        reports[spec] = sub
    if report_dir:
        from meestral.report.compare import write_comparison

        page, _ = write_comparison(reports, report_dir)
        print(f"\ncomparison of {', '.join(specs)}: {page} (and comparison.md next to it)", file=out or sys.stdout)
    return 0


def demo_one(backbone="smollm2", max_new_tokens=40, device="cpu", out=None, report_dir=None, limit=16,
             head_steps=40, prompts=PROMPTS, tasks=("arc_easy", "piqa"), oracle_tokens=512) -> int:
    out = out or sys.stdout
    print(f"loading backbone {backbone!r} ...", file=sys.stderr)
    bb = load_backbone(backbone, device=device)
    L = bb.num_layers
    exits = sorted({L // 4, L // 2, 3 * L // 4, L - 3} - {L - 1})
    trained = demo_heads(backbone, bb, exits, steps=head_steps)
    configs = [("full depth", ExitConfig())]
    # The demo's heads train for a few steps on balanced labels, so their confidence stays near 0.5:
    # at 0.7 neither embedded backbone exits on the demo's prompt (0% and 3%), at 0.6 they do (10% and
    # 21% under catchup, measured 2026-12-05 with the 8-step heads of `make demo`).
    for kind, th in (("classifier", 0.6), ("softmax", 0.9), ("saturation", 0.95)):
        heads = trained if kind == "classifier" else ExitHeads(kind, exits, bb)
        for policy in STATE_POLICIES:
            configs.append((f"{kind} > {th}", ExitConfig(heads=heads, thresholds=th, policy=policy)))
    opts = SamplingOptions(max_new_tokens=max_new_tokens)
    results = []
    bar = tqdm(total=len(configs) * len(prompts), desc="demo", unit="run", file=sys.stderr)
    reference = None
    for name, cfg in configs:
        dec = EarlyExitDecoder(bb, config=cfg)
        gens = []
        for p in prompts:
            gens.append(dec.generate([p], opts, chat=True)[0])
            bar.update(1)
        if reference is None:
            reference = gens
        stats = [s for g in gens for s in g.stats]
        s = summarize(stats, dec.cost, L, [d for g in gens for d in g.discarded])
        agree = sum(agreement(g.token_ids, r.token_ids) for g, r in zip(gens, reference)) / len(gens)
        prefix = sum(common_prefix(g.token_ids, r.token_ids) for g, r in zip(gens, reference)) / len(gens)
        results.append((name, cfg.policy if cfg.heads is not None else "-", s, agree, prefix, gens[0].text))
    bar.close()

    print(f"\nMEEstral demo: {bb.name} ({L} layers, exit points {exits}), greedy, {max_new_tokens} new tokens, "
          f"{len(prompts)} chat prompts", file=out)
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
        print(answer_line(name, policy, text), file=out)
    if report_dir:
        print("\nevaluation on a small slice of lm-eval tasks (offline suite) ...", file=sys.stderr)
        html = evaluation_report(backbone, bb, trained, report_dir, tasks=tasks, limit=limit,
                                 oracle_tokens=oracle_tokens)
        print(f"\nreport: {html} (and report.md, figures/ next to it)", file=out)
    return 0
