"""Helpers of recipes/gpu-session/run.sh (stdlib only, so they run before anything is installed).

    python3 status.py tick W            a few lines: sampler, adapt, distill, GPU memory per process
    python3 status.py final W           the curves: adapt (bound, perplexity, agreement) and distill (perplexity)
    python3 status.py steps W SECONDS SLOWDOWN
                                        adapt steps that fit SECONDS, from the probe run's speed
    python3 status.py weights L         LayerSkip-like exit weights for layers 0..L-2 (rising as the
                                        square of the depth, mean 1), comma-separated
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def records(path):
    out = []
    try:
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def alive(w, name):
    try:
        pid = int((w / "pids" / name).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def gpu_apps():
    """{pid: MiB} of the GPU's compute processes, and one line of totals ('' without nvidia-smi)."""
    try:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout
        tot = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}, ""
    mem = {}
    for line in apps.splitlines():
        try:
            pid, mib = (x.strip() for x in line.split(","))
            mem[int(pid)] = int(mib)
        except ValueError:
            pass
    return mem, tot


def tick(w):
    w = Path(w)
    left = int(Path(w / "deadline").read_text()) - int(time.time()) if (w / "deadline").exists() else None
    mem, tot = gpu_apps()
    names = ["sampler", "adapt", "distill"]
    pids = {n: alive(w, n) for n in names}
    state = " ".join(f"{n}:{'up' if p else 'down'}" + (f"({mem[p] / 1024:.1f}G)" if p in mem else "")
                     for n, p in pids.items())
    print(f"--- {time.strftime('%H:%M:%S')} left {left}s | {state} | gpu {tot}")
    shards = sorted((w / "samples").glob("shard-*.pt")) if (w / "samples").is_dir() else []
    s = [r for r in records(w / "sample.log") if "shard" in r]
    print(f"  sampler: {len(shards)} shards" + (f", last {s[-1]['tokens']} tok in {s[-1]['seconds']}s "
                                               f"({s[-1]['tok_per_s']} tok/s)" if s else ""))
    a = records(w / "adapt" / "log.jsonl")
    tr = [r for r in a if r.get("split") == "train"]
    va = [r for r in a if r.get("split") == "val"]
    steps = (w / "adapt.steps").read_text().strip() if (w / "adapt.steps").exists() else "?"
    if tr or va:
        line = "  adapt:"
        if tr:
            r = tr[-1]
            line += (f" step {r['step']}/{steps} loss {r['loss']:.3f} kl_final {r['kl'].get('final', 0):.4f} "
                     f"{r['tok_per_s']:.0f} tok/s lr {r['lr']:.2e}")
        if va:
            r = va[-1]
            line += f" | val@{r['step']}: bound {r['bound_speedup_layers']:.3f}x ppl {r['heldout_ppl']:.2f}"
            line += f" (step 0: {va[0]['bound_speedup_layers']:.3f}x, {va[0]['heldout_ppl']:.2f})"
        print(line)
    d = records(w / "distill" / "log.jsonl")
    if d:
        tot_steps = [r.get("refixed_total_steps", r.get("fixed_total_steps")) for r in d
                     if "fixed_total_steps" in r or "refixed_total_steps" in r]
        tr = [r for r in d if "loss" in r]
        pp = [r for r in d if "heldout_ppl" in r]
        line = "  distill:"
        if tr:
            r = tr[-1]
            line += (f" step {r['step']}/{tot_steps[-1] if tot_steps else '?'} loss {r['loss']} kl {r['kl']} "
                     f"{r['tok_per_s']} tok/s lr {r['lr']:.2e} pool {r['pool_rows']} rows, {r['epochs']} epochs")
        if pp:
            line += " | ppl " + " ".join(f"{r['step']}:{r['heldout_ppl']}" for r in pp[-4:])
        fin = [r for r in d if r.get("final")]
        if fin:
            line += f" | final float {fin[-1]['heldout_ppl_float']} q8_0 {fin[-1]['heldout_ppl_q8_0']}"
        print(line)
    for n, log, product in (("adapt", "adapt.log", "adapt/adapter.safetensors"),
                            ("distill", "distill.log", "distill/mamba2-smol.gguf")):
        if (w / "pids" / n).exists() and not pids[n] and (w / product).exists():
            print(f"  {n} has ended: {product} ({(w / product).stat().st_size} bytes)")
        elif (w / "pids" / n).exists() and not pids[n]:
            tail = [x for x in (w / log).read_text(errors="replace").splitlines()
                    if x.strip() and not x.startswith("[transformers]")][-2:] if (w / log).exists() else []
            print(f"  {n} has ended: " + " / ".join(t[:200] for t in tail))


def final(w):
    w = Path(w)
    a = records(w / "adapt" / "log.jsonl")
    va = [r for r in a if r.get("split") == "val"]
    if va:
        keys = list(va[0]["agreement"])
        show = [k for k in ("7", "14", "20", "24", "27", "28") if k in keys]
        print("adapt (smollm2, held-out Shakespeare): step | strict oracle bound (x, layers) | mean layers run | "
              "ppl | agreement " + " ".join(f"L{k}" for k in show))
        base = va[0]["heldout_ppl"]
        for r in va:
            print(f"  {r['step']:6d} | {r['bound_speedup_layers']:.3f}x | {r['mean_layers_run']:.2f} | "
                  f"{r['heldout_ppl']:.2f} ({100 * (r['heldout_ppl'] / base - 1):+.1f}%) | "
                  + " ".join(f"{r['agreement'][k]:.3f}" for k in show))
    d = records(w / "distill" / "log.jsonl")
    pp = [r for r in d if "heldout_ppl" in r]
    if pp:
        print("distill (mamba2-smol from the shipped weights): step:held-out ppl  "
              + " ".join(f"{r['step']}:{r['heldout_ppl']}" for r in pp))
    tr = [r for r in d if "loss" in r]
    if tr:
        print(f"  last: step {tr[-1]['step']}, {tr[-1]['tokens']} tokens, {tr[-1]['elapsed_s']} s, "
              f"{tr[-1]['epochs']} epochs of the pool")
    for r in d:
        if r.get("final") or "export_from_step" in r:
            print("  " + json.dumps(r))
    c = w / "compare" / "compare.json"
    if c.exists():
        res = json.loads(c.read_text())
        for k in ("original", "adapted"):
            m = res[k]
            print(f"compare {k}: oracle {m['mean_layers_run']:.2f}/{res['num_layers']} layers "
                  f"(bound {m['bound_speedup_layers']:.3f}x), ppl {m['heldout_ppl']:.2f}")


def steps(w, seconds, slowdown):
    """Adapt steps for `seconds` of training at the probe's speed divided by `slowdown`."""
    w = Path(w)
    tr = [r for r in records(w / "adapt-probe" / "log.jsonl") if r.get("split") == "train"]
    if not tr:
        raise SystemExit("the adapt probe wrote no train record: see adapt-probe.log")
    cfg = json.loads((w / "adapt.shape").read_text())
    tok_s = tr[-1]["tok_per_s"]  # the last window: past the first steps' warm-up
    s_step = cfg["batch"] * cfg["seq_len"] / tok_s
    n = int(float(seconds) / (s_step * float(slowdown)))
    print(max(cfg.get("min", 50), min(cfg.get("max", 100000), n)))
    print(f"adapt probe: {tok_s:.0f} tok/s = {s_step:.3f} s/step alone with the sampler; x{slowdown} for the "
          f"distill trainer joining: {n} steps in {seconds} s", file=sys.stderr)


def weights(n_layers):
    L = int(n_layers)
    raw = [(l + 1) ** 2 for l in range(L - 1)]
    m = sum(raw) / len(raw)
    print(",".join(f"{x / m:.4g}" for x in raw))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"tick": tick, "final": final, "steps": steps, "weights": weights}[cmd](*args)
