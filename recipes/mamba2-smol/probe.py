"""Throughput probe for the distillation recipe (random weights in the real shapes): how fast one
training step (teacher forward + student forward/backward) and teacher sampling run on this GPU,
to size the run, and where a step's time goes. One JSON line per case.

    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py                       # the default cases
    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py train:64:512:0:0:1 train:64:512:1:64:1
      # train:BATCH:SEQ:COMPILE:KD_TOPK:PROFILE[:CACHED] (KD_TOPK 0: whole-vocabulary KL; PROFILE 1:
      # kernels; CACHED 1: the teacher's targets reused, a teacher-cache hit)
    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py gen:4096:256:1 gen:4096:256:0
      # gen:BATCH:NEW_TOKENS[:STATIC[:PROFILE]] (the sampler with HF's StaticCache, 1, or
      # DynamicCache, 0; PROFILE 1: kernels of 16 token steps)
    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py train:64:512:1:0 set:FUSED_CONV=0 train:64:512:1:0
      # set:NAME=0|1 switches backbones/ssd.py's FUSED_CONV, FUSED_SCAN or FUSED_MIXER for the cases after it,
      # training/kd.py's FUSED_GRAD (the KD loss's gradient written out in its forward pass), or
      # PACKED_GQA (the teacher's attention: training/teacher_attention.py, on by default, or HF's sdpa)
"""

import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2ForCausalLM

from meestral.backbones.ssm import use_grouped_gated_norm
from meestral.training.distill import final_hidden, student_config
from meestral.training.kd import chunked_kd_loss, teacher_targets
from meestral.training import kd, teacher_attention
from meestral.training.teacher_text import sample_batch

# SmolLM2-135M's shape (config.json of the embedded backbone).
TEACHER = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def sync():
    torch.cuda.synchronize()


def train_case(teacher, batch, seq, compile_, topk=0, profile=False, cached=False):
    """Steps of the trainer's own loop (distill._distill): teacher forward (whole logits, or their
    top-k a chunk at a time with --kd-topk), student forward through the chunked scan, the chunked
    KD loss, backward, AdamW. Median step time, and where it goes: each phase timed between
    synchronisations, and with `profile` the heaviest kernels of one step (torch.profiler). The
    synchronisations leave the GPU idle while the host queues each phase's first kernels (an H100
    step: 256 ms of wall time, 206 ms of kernels), so `unsynced_tok_per_s` also times four steps
    queued back to back, as the trainer runs them. `cached`: the teacher's targets computed once and
    reused, as every hit of `--teacher-cache-gb` is (the step is then the student's alone)."""
    torch.manual_seed(0)
    student = Mamba2ForCausalLM(student_config(TEACHER)).cuda()
    use_grouped_gated_norm(student)  # as the trainer: the norm mamba-ssm's combined mixer computes
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    fwd = torch.compile(final_hidden) if compile_ else final_hidden
    x = torch.randint(0, 49152, (batch, seq), device="cuda")
    times, phases = [], []
    if cached:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hit = teacher_targets(teacher, x, topk, compiled=compile_)

    def step(phased=True):
        marks = [time.time()]

        def mark():
            if phased:
                sync()
                marks.append(time.time())

        with torch.autocast("cuda", dtype=torch.bfloat16):
            tl = hit if cached else teacher_targets(teacher, x, topk, compiled=compile_)
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
    sync()
    t = time.time()
    for _ in range(4):
        step(phased=False)
    sync()
    unsynced = (time.time() - t) / 4
    names = ("teacher", "student_fwd", "kd_loss_fwd", "backward", "adamw")
    row = {"case": "train", "batch": batch, "seq": seq, "compile": compile_, "kd_topk": topk, "teacher_cached": cached,
           "first_step_s": round(first, 1), "step_s": round(times[mid], 4), "tok_per_s": round(batch * seq / times[mid]),
           "unsynced_tok_per_s": round(batch * seq / unsynced),
           "phase_ms": {n: round(1e3 * v, 1) for n, v in zip(names, phases[mid])},
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            step()
        row["kernels"], row["device_busy_ms"] = kernel_rows(p)
    print(json.dumps(row), flush=True)
    del student, opt, fwd, step
    torch._dynamo.reset()  # compiled graphs hold the student: free it before the next case
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def kernel_rows(p, n=20):
    """The heaviest kernels of a torch.profiler run: (rows, device-busy ms)."""
    ev = sorted(p.key_averages(), key=lambda e: -e.device_time_total)
    busy = sum(e.device_time_total for e in ev)
    return [{"name": e.key[:90], "ms": round(e.device_time_total / 1e3, 2), "calls": e.count,
             "share": round(e.device_time_total / busy, 3)} for e in ev[:n]], round(busy / 1e3, 1)


@torch.inference_mode()
def gen_case(teacher, batch, new, static=None, profile=False):
    """The sampler (teacher_text.sample_batch) at this batch: its K/V cache static (HF's
    StaticCache, the default for an attention teacher) or dynamic (static 0). `profile`: the
    heaviest kernels of 16 token steps (the sampler's step time grows with the batch, 73 ms at 2048
    rows and 278 ms at 8192 on an H100, 2026-12-08: which kernels do)."""
    x = torch.randint(3, 49152, (batch, 48), device="cuda")
    att = torch.ones_like(x)
    sample_batch(teacher, x[:, :8], att[:, :8], 4, 1.0, 200, [-1], 2, static_cache=static)
    sync()
    t = time.time()
    out = sample_batch(teacher, x, att, new, 1.0, 200, [-1], 2, static_cache=static)  # no EOS: `new` steps a row
    sync()
    dt = time.time() - t
    row = {"case": "sample", "batch": batch, "new_tokens": out.shape[1], "static_cache": static,
           "s": round(dt, 2), "tok_per_s": round(batch * out.shape[1] / dt)}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            sample_batch(teacher, x, att, 16, 1.0, 200, [-1], 2, static_cache=static)
            sync()
        row["kernels"], row["device_busy_ms"] = kernel_rows(p)
    print(json.dumps(row), flush=True)


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    teacher = LlamaForCausalLM(TEACHER).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    teacher.config._attn_implementation = "sdpa"
    teacher_attention.use(teacher)  # as load_teacher: decode steps without repeated K/V heads
    for args in sys.argv[1:] or ["train:64:512:0", "train:32:512:0", "gen:1024:64", "gen:2048:64", "gen:4096:64"]:
        kind, *rest = args.split(":")
        try:
            if kind == "set":  # set:FUSED_CONV=0 (ssd's switches or the teacher's attention, for the cases that follow)
                from meestral.backbones import ssd

                name, value = rest[0].split("=")
                if name == "PACKED_GQA":
                    teacher_attention.use(teacher, bool(int(value)))
                    print(json.dumps({"case": "set", "attention": teacher.config._attn_implementation}), flush=True)
                    continue
                where = kd if name == "FUSED_GRAD" else ssd
                assert name in ("FUSED_CONV", "FUSED_SCAN", "FUSED_MIXER", "FUSED_GRAD"), name
                setattr(where, name, bool(int(value)))
                print(json.dumps({"case": "set", name: getattr(where, name)}), flush=True)
            elif kind == "train":  # train:BATCH:SEQ:COMPILE[:TOPK[:PROFILE[:CACHED]]]
                rest += ["0"] * (6 - len(rest))
                train_case(teacher, int(rest[0]), int(rest[1]), bool(int(rest[2])), int(rest[3]), bool(int(rest[4])),
                           bool(int(rest[5])))
            else:  # gen:BATCH:NEW[:STATIC[:PROFILE]] (STATIC 0: HF's DynamicCache; default: the sampler's choice)
                gen_case(teacher, int(rest[0]), int(rest[1]), bool(int(rest[2])) if len(rest) > 2 else None,
                         len(rest) > 3 and bool(int(rest[3])))
        except Exception as e:  # a probe that fails says so and the next one runs
            print(json.dumps({"case": args, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
