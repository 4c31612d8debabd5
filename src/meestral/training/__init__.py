"""Training with the backbone frozen or adapted: three trainers over one shared loop core.

    head_training.py    exit heads on a frozen backbone (labels, metrics, the run)
    ranks.py            head training over torchrun's processes; the FSDP2-sharded frozen backbone
    adapt.py            early-exit adaptation: LoRA trained with the early-exit loss
    adapt_compare.py    original vs adapted backbone on held-out text
    distill.py          a Mamba-2 student distilled from a teacher (how mamba2-smol is made)
    teacher_text.py     the teacher's sampled text for distillation, and its contamination check
    distill_prompts.py  the prompts the teacher answers

  the loop core:
    run_log.py          log.jsonl (cut back to the checkpoint on resume), TensorBoard, the curves
    checkpoint.py       checkpoint.pt: atomic writes, resume, the same-run check
    optim.py            optimisers, learning-rate schedules, schedule-free's averaged weights
    kd.py               the distillation loss (whole or chunked) and held-out perplexity
    row_pool.py         training rows from teacher shards and a corpus (adapt, distill)
"""
