"""Head training over two processes (torchrun): DDP and FSDP against one process, and a resume.

    # the recipe: two H200s, the Mistral-7B shape in bf16 (nvidia-h200-x2; ~5 runs of a 7B load each)
    python3 benchmarks/bench_train_dist.py --device cuda --out /tmp/dist
    # the rehearsal: two CPU processes over gloo, a tiny random backbone
    python benchmarks/bench_train_dist.py --device cpu --backbone random:mistral --batch 8 --seq-len 32 \\
        --steps 24 --ckpt-every 4 --out /tmp/dist

Cases, each one `meestral train` run (python -m meestral.cli.train train), each in OUT/<case>:
  one          one process (one GPU), the reference
  ddp          torchrun --nproc_per_node N: heads under DDP, the backbone replicated
  fsdp         the same with --fsdp: the frozen backbone sharded over the N processes (FSDP2)
  ddp-resume   like ddp, stopped (SIGTERM to torchrun) once its first checkpoint is on disk, then rerun
  fsdp-resume  with --resume; its heads must equal the uninterrupted run's
A case whose OUT/<case>/heads already exists is not run again, so a command cut short by a time
limit continues where it stopped when repeated (keep --out).

Checks (JSON lines, `"check": ...`): ddp and fsdp heads against one; each resumed run against its
uninterrupted run. A pair matches when every head tensor has ||a - b|| / ||a|| <= --tol (default
2e-2 in bf16: labels are discrete, and a bf16 forward over B/N rows may flip a borderline label
that the B-row forward did not; 1e-4 in float32). `bitwise` says whether they are identical.

Figures (JSON lines, `"case": ...`): tokens/s per process (the median of the train records after
the first, which holds the warm-up), MFU per GPU (bench_train.py's model FLOPs over the peak;
GPU only) and each rank's peak memory (the train records' `peak_memory_gib`: CUDA allocator peak on
a GPU, the process's peak resident set on the CPU).

Text: a seeded word-salad corpus written into OUT (the GPU box has neither `datasets` nor the
embedded corpus's package), sized to the run. NCCL/NVSHMEM multicast stays off in every process
this script starts (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1:
the device README's rule for the multi-GPU machines). Exit status 1 when a check fails.
"""

import argparse
import datetime
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench_train import H200_BF16_DENSE, flops_per_token

CASES = ("one", "ddp", "fsdp", "ddp-resume", "fsdp-resume")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
WORDS = ("the of and to in is was that for on with as by at from his her they which be this "
         "river stone light house under over before after small great").split()


def fail(msg: str):
    print(f"bench_train_dist: error: {msg}", file=sys.stderr)
    sys.exit(2)


def write_corpus(path: Path, chars: int, seed: int = 0):
    """Seeded word-salad documents (~300 words each) until `chars` characters are written."""
    if path.exists():
        return
    rng, n, lines = random.Random(seed), 0, []
    while n < chars:
        doc = " ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 400)))
        lines.append(json.dumps({"text": doc}) + "\n")
        n += len(doc)
    path.write_text("".join(lines))


def train_argv(a, out: Path, corpus: Path) -> list[str]:
    argv = ["train", "--backbone", a.backbone, "--device", a.device, "--dtype", a.dtype, "--data", str(corpus),
            "--seq-len", a.seq_len, "--batch", a.batch, "--steps", a.steps, "--ckpt-every", a.ckpt_every,
            "--log-every", a.log_every, "--val-every", a.steps, "--val-rows", a.batch, "--val-fraction", "0.02",
            "--shuffle-buffer", "4", "--optimizer", a.optimizer, "--seed", "0", "--no-progress", "--out", str(out)]
    if a.exits:
        argv += ["--exits", a.exits]
    return [str(x) for x in argv]


def command(a, case: str, out: Path, corpus: Path) -> list[str]:
    train = ["-m", "meestral.cli.train", *train_argv(a, out, corpus)]
    if case == "one":
        return [sys.executable, *train]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc)]
    return launcher + train + (["--fsdp"] if case.startswith("fsdp") else [])


def child_env(a) -> dict:
    env = dict(os.environ, **NO_MULTICAST, PYTHONUNBUFFERED="1")
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = str(a.threads)  # per process: the processes share the cores
    return env


def run_case(a, case: str, root: Path, corpus: Path) -> dict:
    """Run one case unless its heads already exist; returns {case, wall_s, interrupted_at}."""
    out = root / case
    if (out / "heads").exists():
        return {"case": case, "wall_s": None, "reused": True}
    cmd, env, t0 = command(a, case, out, corpus), child_env(a), time.perf_counter()
    info = {"case": case, "command": " ".join(cmd)}
    if case.endswith("-resume") and not (out / "checkpoint.pt").exists():
        info["interrupted_at"] = interrupt(cmd, env, out, a.steps)
    if case.endswith("-resume"):
        cmd = cmd + ["--resume"]
    log_path = root / f"{case}.stderr"
    with log_path.open("a") as log:
        r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    if r.returncode != 0:
        fail(f"case {case} exited with {r.returncode}: {child_error(log_path)}(log: {log_path})")
    info["wall_s"] = time.perf_counter() - t0
    return info


def child_error(log_path: Path) -> str:
    """The run's own one-line error (`meestral: error: ...`), else the log's last line, so the reason
    is on the screen, not only in the log (torchrun adds its own traceback after the workers' lines)."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("meestral: error:")]
    return f"{(ours or lines or [''])[-1]} "


def interrupt(cmd, env, out: Path, steps: int) -> int:
    """Start `cmd`, stop it (SIGTERM; torchrun passes it to its workers) as soon as a checkpoint is
    on disk, and return that checkpoint's step; a run that finished first is an error (raise --steps)."""
    with (out.parent / f"{out.name}.stderr").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        while not (out / "checkpoint.pt").exists() and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    if (out / "heads").exists() or not (out / "checkpoint.pt").exists():
        fail(f"the run in {out} ended before it could be interrupted: raise --steps or lower --ckpt-every")
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    if step >= steps:
        fail(f"the run in {out} checkpointed its last step before the interruption: raise --steps")
    return step


def compare(a_dir: Path, b_dir: Path) -> dict:
    a, b = (load_file(str(d / "heads" / "heads.safetensors")) for d in (a_dir, b_dir))
    if a.keys() != b.keys():
        fail(f"{a_dir} and {b_dir} hold different heads")
    rel = max(float((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-30)) for k in a)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"max_rel_diff": rel, "max_abs_diff": diff, "bitwise": all(torch.equal(a[k], b[k]) for k in a)}


def figures(a, case: str, root: Path, flops: float | None) -> dict:
    records = [json.loads(l) for l in (root / case / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    procs = 1 if case == "one" else a.nproc
    # The last record is the rerun's in a resume case: its memory peak is the resumed process's.
    row = {"case": case, "processes": procs, "peak_memory_gib": train[-1]["peak_memory_gib"],
           "peak_memory_kind": train[-1]["peak_memory_kind"]}
    if case.endswith("-resume"):
        return row  # its log mixes the cut run's windows with the rerun's: speed comes from ddp/fsdp
    timed = train[1:] or train  # the first window holds the warm-up (allocator, kernels)
    tok_s = statistics.median(r["tok_per_s"] for r in timed)
    per_gpu = tok_s / procs
    row.update(tokens_per_s=tok_s, tokens_per_s_per_process=per_gpu, train_records=len(timed))
    if flops is not None:
        row.update(model_flops_per_token=flops, mfu_per_gpu=per_gpu * flops / a.peak_flops, peak_flops=a.peak_flops)
    return row


def model_flops(a) -> float | None:
    """bench_train.py's model FLOPs per token, from the backbone's shapes (built on the meta device:
    no weights); None off the GPU, where an MFU against the H200's peak means nothing."""
    if a.device == "cpu" or not a.backbone.startswith("random:"):
        return None
    from meestral.backbones.loading import random_backbone

    bb = random_backbone(a.backbone.split(":")[1], dtype=a.dtype, device="meta")
    L = bb.num_layers
    exits = [int(x) for x in a.exits.split(",")] if a.exits else sorted({L // 4, L // 2, 3 * L // 4} - {L - 1})
    return flops_per_token(bb, len(exits), bb.hidden_size + 1)[0]  # linear heads: d weights + a bias


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="random:mistral-7b")
    p.add_argument("--device", default="cuda", help="cuda (nccl) or cpu (gloo)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="global rows per step (the same in every case)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--ckpt-every", type=int, default=8)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--exits", help="default: every quarter of the depth")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--tol", type=float, help="largest ||a-b||/||a|| per head tensor (default: 2e-2 bf16, 1e-4 fp32)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process on the CPU")
    p.add_argument("--peak-flops", type=float, default=H200_BF16_DENSE)
    p.add_argument("--out", required=True, help="work folder (runs, corpus); keep it to continue a cut-short command")
    p.add_argument("--results", help="JSONL file the rows are appended to (default: stdout only)")
    p.add_argument("--note", default="", help="free text stored in every row (e.g. the machine)")
    a = p.parse_args()

    cases = [c for c in a.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        fail(f"unknown case(s) {', '.join(sorted(unknown))}: use {', '.join(CASES)}")
    if a.device not in ("cpu", "cuda"):
        fail(f"--device {a.device!r}: use cuda or cpu")
    if a.device == "cuda" and not torch.cuda.is_available():
        # Before the corpus is written: nothing to clean up, and the reason rather than a child's log.
        fail(f"--device cuda: no CUDA device here (torch {torch.__version__}): "
             "run it on the GPU machine, or use --device cpu for the rehearsal")
    if a.batch % a.nproc:
        fail(f"--batch {a.batch} does not split over {a.nproc} processes")
    if a.ckpt_every >= a.steps:
        fail("--ckpt-every must be below --steps: the resume cases stop at the first checkpoint")
    tol = a.tol if a.tol is not None else (1e-4 if a.dtype in ("float32", "fp32") else 2e-2)
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    # A token is >= 1 character (byte tokenizer: 1; Mistral's on these words: ~4.5): 6 characters
    # per token needed covers either, with the held-out share and validation rows.
    write_corpus(corpus, max(500_000, 6 * a.batch * a.seq_len * (a.steps + 2)))  # >= ~1,700 documents

    base = {"bench": "train_dist", "backbone": a.backbone, "device": a.device, "dtype": a.dtype,
            "batch": a.batch, "seq_len": a.seq_len, "steps": a.steps, "nproc": a.nproc, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "note": a.note}
    if a.device == "cuda" and torch.cuda.is_available():
        base["gpu"] = torch.cuda.get_device_name()
    rows, flops = [], model_flops(a)
    for case in cases:
        info = run_case(a, case, root, corpus)
        rows.append({**base, **info, **figures(a, case, root, flops)})
    pairs = [("ddp", "one"), ("fsdp", "one"), ("ddp-resume", "ddp"), ("fsdp-resume", "fsdp")]
    ok = True
    for got, ref in pairs:
        if (root / got / "heads").exists() and (root / ref / "heads").exists():
            c = compare(root / ref, root / got)
            c.update(check=f"{got} vs {ref}", tol=tol, passed=c["max_rel_diff"] <= tol)
            ok &= c["passed"]
            rows.append({**base, **c})
    for r in rows:
        print(json.dumps(r))
    if a.results:
        with open(a.results, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
