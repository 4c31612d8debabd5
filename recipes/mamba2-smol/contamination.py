"""Does the distillation text overlap the evaluation sets? 13-gram overlap (GPT-3's rule) of
teacher shards and the Shakespeare training split against every document of the offline suite
(prompt text and every answer choice).

    python recipes/mamba2-smol/contamination.py SHARD.pt [SHARD.pt ...] --out docs/mamba2-smol-contamination.json
"""

import argparse
import json

import torch

from meestral.files import write_json

TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande", "sciq", "openbookqa", "lambada",
         "triviaqa", "coqa"]


def eval_texts(names):
    from meestral.evaluation.runner import load_tasks

    _, task_dict = load_tasks(names)
    stack = list(task_dict.items())
    while stack:
        name, task = stack.pop()
        if isinstance(task, dict):
            stack += list(task.items())
            continue
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        for doc in docs:
            parts = [str(task.doc_to_text(doc))]
            if getattr(task.config, "doc_to_choice", None) is not None:
                parts += [str(c) for c in (task.doc_to_choice(doc) or [])]
            else:  # generation tasks: the reference answer
                parts.append(str(task.doc_to_target(doc)))
            yield " ".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shards", nargs="+")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", default="docs/mamba2-smol-contamination.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from meestral.backbones.assets import smollm2_dir
    from meestral.data import embedded_files, is_validation
    from meestral.training.teacher_text import contamination

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    teacher = []
    for s in args.shards:
        teacher += [tok.decode(d.tolist(), skip_special_tokens=True) for d in torch.load(s, weights_only=False)["docs"]]
    shakespeare = [p.read_text(encoding="utf-8") for p in embedded_files()]
    shakespeare = [t for t in shakespeare if not is_validation(t, 0.05)]
    ev = list(eval_texts(args.tasks.split(",")))
    out = {"eval_docs": len(ev), "tasks": args.tasks.split(","), "n": 13,
           "teacher_samples": contamination(teacher, ev), "shakespeare_train": contamination(shakespeare, ev)}
    write_json(args.out, out, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
