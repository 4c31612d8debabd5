"""The measurements of the model card, for the student and its teacher in one run, measured the
same way: perplexity on held-out Shakespeare (the embedded corpus's validation documents, never
trained on) and 0-shot task scores through the offline lm-eval suite at full depth.

    OMP_NUM_THREADS=1 python recipes/mamba2-smol/card.py --out docs/mamba2-smol-card.json [--limit N]

Results are written per (backbone, task) as they finish, so a stopped run resumes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from meestral.files import write_json

TASKS = ["lambada", "arc_easy", "piqa", "sciq", "hellaswag"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/mamba2-smol-card.json")
    ap.add_argument("--backbones", default="mamba2-smol,smollm2")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from meestral.backbones.loading import load_backbone
    from meestral.data import heldout_rows
    from meestral.training.kd import heldout_ppl
    from meestral.evaluation.lm_model import MeestralLM
    from meestral.evaluation.runner import load_tasks, primary, run_tasks, task_metrics

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res.setdefault("limit", args.limit)
    if res["limit"] != args.limit:
        sys.exit(f"{out} holds results for --limit {res['limit']}: give another --out")
    bbs = {spec: load_backbone(spec) for spec in args.backbones.split(",")}
    for spec, bb in bbs.items():  # a resumed file must hold these weights' results, not older ones
        held = res.get(spec, {}).get("fingerprint")
        if held is not None and held != bb.fingerprint():
            sys.exit(f"{out} holds results of {spec} with weights {held}, loaded now {bb.fingerprint()} "
                     "(new weights): give another --out, so both backbones are measured again in one run")
    for spec, bb in bbs.items():
        r = res.setdefault(spec, {"fingerprint": bb.fingerprint(), "params": sum(p.numel() for p in bb.model.parameters())})
        if "heldout_ppl" not in r:
            rows = heldout_rows("embedded", bb.tokenizer, 65536, 512)
            r["heldout_ppl"] = heldout_ppl(bb.model, rows)
            r["heldout_tokens"] = int(rows.numel())
            write_json(out, res, indent=1)
    for task in args.tasks.split(","):  # task by task, both backbones: a stopped run has pairs
        for spec, bb in bbs.items():
            r = res[spec]
            if task in r.get("tasks", {}):
                continue
            t0 = time.time()
            lm = MeestralLM(backbone=bb, head="full", batch_size=args.batch_size)
            lm.spec = spec
            names, task_dict = load_tasks([task])
            out_res = run_tasks(lm, task_dict, limit=args.limit)
            full = names[0]
            metrics = task_metrics(out_res, full)
            name, value, stderr = primary(full, metrics)
            r.setdefault("tasks", {})[task] = {"task": full, "metrics": metrics, "primary": name, "value": value,
                                               "stderr": stderr, "seconds": round(time.time() - t0)}
            write_json(out, res, indent=1)
            print(json.dumps({"backbone": spec, "task": task, name: value, "stderr": stderr,
                              "seconds": round(time.time() - t0)}), flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
