"""Throughput probe for the distillation recipe (random weights in the real shapes): how fast one
training step (teacher forward + student forward/backward) and teacher sampling run on this GPU,
to size the run, and where a step's time goes. One JSON line per case.

    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py                       # the default cases
    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py train:64:512:0:0:1 train:64:512:1:64:1
      # train:BATCH:SEQ:COMPILE:KD_TOPK:PROFILE (KD_TOPK 0: whole-vocabulary KL; PROFILE 1: kernels)
    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py gen:4096:256:1 gen:4096:256:0
      # gen:BATCH:NEW_TOKENS[:STATIC] (the sampler with HF's StaticCache, 1, or DynamicCache, 0)
"""

import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2ForCausalLM

from meestral.training.distill import final_hidden, student_config
from meestral.training.kd import chunked_kd_loss, teacher_targets
from meestral.training.teacher_text import sample_batch

# SmolLM2-135M's shape (config.json of the embedded backbone).
TEACHER = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def sync():
    torch.cuda.synchronize()


def train_case(teacher, batch, seq, compile_, topk=0, profile=False):
    """Steps of the trainer's own loop (distill._distill): teacher forward (whole logits, or their
    top-k a chunk at a time with --kd-topk), student forward through the chunked scan, the chunked
    KD loss, backward, AdamW. Median step time, and where it goes: each phase timed between
    synchronisations, and with `profile` the heaviest kernels of one step (torch.profiler)."""
    torch.manual_seed(0)
    student = Mamba2ForCausalLM(student_config(TEACHER)).cuda()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    fwd = torch.compile(final_hidden) if compile_ else final_hidden
    x = torch.randint(0, 49152, (batch, seq), device="cuda")
    times, phases = [], []

    def step():
        marks = [time.time()]

        def mark():
            sync()
            marks.append(time.time())

        with torch.autocast("cuda", dtype=torch.bfloat16):
            tl = teacher_targets(teacher, x, topk)
            mark()
            hidden = fwd(student, x)[:, :-1]
            mark()
            loss, _, _ = chunked_kd_loss(student.lm_head, hidden, tl, x[:, 1:], 0.2, compiled=compile_)
            mark()
        opt.zero_grad()
        loss.backward()
        mark()
        opt.step()
        mark()
        return [b - a for a, b in zip(marks, marks[1:])]

    t_first = time.time()
    for i in range(8):
        t = time.time()
        phases.append(step())
        times.append(time.time() - t)
        if i == 0:
            first = time.time() - t_first
    mid = sorted(range(2, 8), key=lambda j: times[j])[3]
    names = ("teacher", "student_fwd", "kd_loss_fwd", "backward", "adamw")
    row = {"case": "train", "batch": batch, "seq": seq, "compile": compile_, "kd_topk": topk,
           "first_step_s": round(first, 1), "step_s": round(times[mid], 4), "tok_per_s": round(batch * seq / times[mid]),
           "phase_ms": {n: round(1e3 * v, 1) for n, v in zip(names, phases[mid])},
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            step()
        ev = sorted(p.key_averages(), key=lambda e: -e.device_time_total)
        busy = sum(e.device_time_total for e in ev)
        row["kernels"] = [{"name": e.key[:90], "ms": round(e.device_time_total / 1e3, 2), "calls": e.count,
                           "share": round(e.device_time_total / busy, 3)} for e in ev[:20]]
        row["device_busy_ms"] = round(busy / 1e3, 1)
    print(json.dumps(row), flush=True)
    del student, opt, fwd
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


@torch.inference_mode()
def gen_case(teacher, batch, new, static=None):
    """The sampler (teacher_text.sample_batch) at this batch: its K/V cache static (HF's
    StaticCache, the default for an attention teacher) or dynamic (static 0)."""
    x = torch.randint(3, 49152, (batch, 48), device="cuda")
    att = torch.ones_like(x)
    sample_batch(teacher, x[:, :8], att[:, :8], 4, 1.0, 200, [-1], 2, static_cache=static)
    sync()
    t = time.time()
    out = sample_batch(teacher, x, att, new, 1.0, 200, [-1], 2, static_cache=static)  # no EOS: `new` steps a row
    sync()
    dt = time.time() - t
    print(json.dumps({"case": "sample", "batch": batch, "new_tokens": out.shape[1], "static_cache": static,
                      "s": round(dt, 2), "tok_per_s": round(batch * out.shape[1] / dt)}), flush=True)


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    teacher = LlamaForCausalLM(TEACHER).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    teacher.config._attn_implementation = "sdpa"
    for args in sys.argv[1:] or ["train:64:512:0", "train:32:512:0", "gen:1024:64", "gen:2048:64", "gen:4096:64"]:
        kind, *rest = args.split(":")
        try:
            if kind == "train":  # train:BATCH:SEQ:COMPILE[:TOPK[:PROFILE]]
                rest += ["0"] * (5 - len(rest))
                train_case(teacher, int(rest[0]), int(rest[1]), bool(int(rest[2])), int(rest[3]), bool(int(rest[4])))
            else:  # gen:BATCH:NEW[:STATIC] (STATIC 0: HF's DynamicCache; default: the sampler's choice)
                gen_case(teacher, int(rest[0]), int(rest[1]), bool(int(rest[2])) if len(rest) > 2 else None)
        except Exception as e:  # a probe that fails says so and the next one runs
            print(json.dumps({"case": args, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
