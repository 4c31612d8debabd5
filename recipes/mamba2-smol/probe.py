"""Throughput probe for the distillation recipe (random weights in the real shapes): how fast one
training step (teacher forward + student forward/backward) and teacher sampling run on this GPU,
to size the run. One JSON line per case.

    PYTHONPATH=src python3 recipes/mamba2-smol/probe.py
"""

import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2ForCausalLM

from meestral.backbones.ssd import forward_logits
from meestral.training.distill import student_config
from meestral.training.kd import kd_loss
from meestral.training.teacher_text import sample_batch

# SmolLM2-135M's shape (config.json of the embedded backbone).
TEACHER = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def sync():
    torch.cuda.synchronize()


def train_case(teacher, batch, seq, compile_):
    torch.manual_seed(0)
    student = Mamba2ForCausalLM(student_config(TEACHER)).cuda()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    fwd = torch.compile(forward_logits) if compile_ else forward_logits
    x = torch.randint(0, 49152, (batch, seq), device="cuda")
    times = []
    t_first = time.time()
    for i in range(8):
        t = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                tl = teacher(x).logits[:, :-1]
            sl = fwd(student, x)[:, :-1]
            loss, _, _ = kd_loss(sl, tl, x[:, 1:], 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        times.append(time.time() - t)
        if i == 0:
            first = time.time() - t_first
    step = sorted(times[2:])[len(times[2:]) // 2]
    print(json.dumps({"case": "train", "batch": batch, "seq": seq, "compile": compile_, "first_step_s": round(first, 1),
                      "step_s": round(step, 4), "tok_per_s": round(batch * seq / step),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}), flush=True)
    del student, opt, fwd
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


@torch.inference_mode()
def gen_case(teacher, batch, new):
    x = torch.randint(3, 49152, (batch, 48), device="cuda")
    att = torch.ones_like(x)
    sample_batch(teacher, x[:, :8], att[:, :8], 4, 1.0, 200, [-1], 2)
    sync()
    t = time.time()
    out = sample_batch(teacher, x, att, new, 1.0, 200, [-1], 2)  # no EOS: every row runs `new` steps
    sync()
    dt = time.time() - t
    print(json.dumps({"case": "sample", "batch": batch, "new_tokens": out.shape[1], "s": round(dt, 2),
                      "tok_per_s": round(batch * out.shape[1] / dt)}), flush=True)


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    teacher = LlamaForCausalLM(TEACHER).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    teacher.config._attn_implementation = "sdpa"
    for args in sys.argv[1:] or ["train:64:512:0", "train:32:512:0", "gen:1024:64", "gen:2048:64", "gen:4096:64"]:
        kind, *rest = args.split(":")
        try:
            if kind == "train":
                train_case(teacher, int(rest[0]), int(rest[1]), bool(int(rest[2])))
            else:
                gen_case(teacher, int(rest[0]), int(rest[1]))
        except Exception as e:  # a probe that fails says so and the next one runs
            print(json.dumps({"case": args, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
