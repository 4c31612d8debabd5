"""How far an adapted backbone's full model moved from the original, by kind of text: held-out
Shakespeare, the model's own chat answers to the distillation prompts, and the prompts + first
answers of evaluation tasks (read to measure, never trained on). Mean KL(original || adapted) per
token and top-1 agreement (`training.adapt_compare.drift`), one adapter, one copy of the weights.

    PYTHONPATH=src python recipes/adapt/drift.py --adapter src/meestral/embedded/smollm2-ee.lora.safetensors \
        --tasks arc_easy,piqa,sciq --limit 300 --out docs/smollm2-ee-drift.json

A drift that is the same on every kind of text says the data did not hold the model anywhere
(not that a domain was missing from it); a drift that is large only on task text says the data
lacked that kind of text.
"""

import argparse
import random

import torch
from tqdm import tqdm

from meestral.backbones.loading import load_backbone
from meestral.backbones.lora import check_base, load_adapter, read_adapter
from meestral.data import heldout_rows
from meestral.evaluation.runner import task_token_sequences
from meestral.files import write_json
from meestral.training.adapt_compare import drift
from meestral.training.distill_prompts import CHAT_TEMPLATES, TOPICS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--tokens", type=int, default=8192, help="held-out Shakespeare tokens")
    ap.add_argument("--chat", type=int, default=8, help="own chat answers (greedy, 128 tokens each)")
    ap.add_argument("--tasks", default="arc_easy,piqa,sciq")
    ap.add_argument("--limit", type=int, default=300, help="documents per task")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    meta, _ = read_adapter(args.adapter)
    bb = load_backbone(args.backbone, device=args.device)
    check_base(meta, bb, args.adapter)
    sources = {"shakespeare_heldout": heldout_rows("embedded", bb.tokenizer, args.tokens, 512).tolist()}
    rng = random.Random(5)  # the original model answers, before the adapter is attached
    chat = []
    for _ in tqdm(range(args.chat), desc="chat answers"):
        msg = rng.choice(CHAT_TEMPLATES).format(t=rng.choice(TOPICS), u=rng.choice(TOPICS))
        ids = torch.tensor(bb.tokenizer.apply_chat(msg), device=bb.device)[None]
        with torch.no_grad():
            chat.append(bb.model.generate(ids, max_new_tokens=128, do_sample=False)[0].tolist())
    sources["own_chat_answers"] = chat
    for task in [t for t in args.tasks.split(",") if t]:
        sources[task] = [s[:512] for s in task_token_sequences(bb, [task], args.limit)]
    lora = load_adapter(bb, args.adapter)
    out = {"backbone": bb.name, "adapter": args.adapter, "sources": {}}
    for name, seqs in tqdm(sources.items(), desc="drift"):
        out["sources"][name] = drift(bb, lora, seqs)
        print(name, out["sources"][name], flush=True)
    write_json(args.out, out, indent=1)


if __name__ == "__main__":
    main()
