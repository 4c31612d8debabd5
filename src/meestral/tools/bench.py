"""Decode benchmark: our full depth and exits forced at two layers under each state policy,
against the full-depth decoders a user could take instead (the peers), in one run.

Exits are forced with `static` heads (confidence 1, no probe cost), so the numbers isolate the
mechanism: what skipping layers and filling their state costs and saves. Their decisions are known
before a step runs, so on a capturing engine their steps run several to a device run (copy /
propagate: chunks of up to 8 steps; catchup: a whole backlog cycle), as full depth's do: the rows
show the cost of the layers, not of host round trips. Exits decided by a confidence read each
decision back, once per exit point asked. Each case is timed
`repeats` times, round-robin across cases so drift hits all of them alike; the median is kept.
Every ratio is taken within the run: to our full depth (`speedup_vs_full`, on the engine the
exits run on) and to the fastest peer (`speedup_vs_best_peer`). On CUDA the run also measures a
device-to-device copy, the bandwidth a batch-1 decode that reads every weight once is bound by:
each row gives the weight bytes it read per second and their share of it.

Peers (`peers`): `hf` = HF `generate` with its default (dynamic) cache; `hf-static` = HF
`generate(cache_implementation="static")`, which compiles its forward itself; `hf-compiled` = a
`StaticCache` and one-token steps over HF's modules through `torch.compile(mode="reduce-overhead")`
(the gpt-fast recipe, the strongest full-depth peer we can build from HF); `mamba-ssm` = mamba-ssm's
own `generate(cg=True)` on the same weights, Mamba models only, where mamba-ssm imports
(tools/mamba_ssm_peer.py; wheels: benchmarks/build_mamba_ssm.sh). The compiling peers take minutes
to compile: ask for them where the time is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import platform
import signal
import statistics
import sys
import threading
import time

import torch

from meestral.backbones import decode_attention, gemv, mamba2_step, pdl, ssm
from meestral.backbones.loading import load_backbone
from meestral.decoding.decoder import EarlyExitDecoder
from meestral.decoding.config import ExitConfig
from meestral.decoding.heads import ExitHeads, check_exit_points
from meestral.decoding.sampling import SamplingOptions

PROMPT = "The history of the printing press begins"
# `--prompts N` takes the first N: text of different kinds (prose, explanation, story, list, code,
# summary), because how often an exit point agrees with the full model, and so what `speculate`
# gains, depends on the text; a claim like "never slower than full depth" must hold on each.
PROMPTS = (
    PROMPT,
    "Explain to a ten-year-old why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "List three ways to save energy at home, with one sentence on each.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Summarise the causes of the First World War in one paragraph.",
)
POLICIES = ("copy", "propagate", "catchup", "verify")  # the default rows; speculate is asked for
ALL_POLICIES = POLICIES + ("speculate",)
PEERS = ("hf", "hf-static", "hf-compiled", "hf-assisted", "mamba-ssm")
PEER_CASES = {"hf": "hf_generate", "hf-static": "hf_generate_static", "hf-compiled": "hf_compiled_step",
              "mamba-ssm": "mamba_ssm_generate_cg"}


def prompt_ids(bb, n: int | None, text: str = PROMPT, chat: bool = False) -> list[int]:
    """A benchmark prompt as token ids (with `chat`, inside the tokenizer's chat template where it
    has one); with n, repeated or cut to exactly n tokens."""
    ids = bb.tokenizer.apply_chat(text) if chat else bb.tokenizer.encode(text)
    if n is None:
        return ids
    return (ids * (n // len(ids) + 1))[:n]


def cases(bb, exits, max_backlog, policies=POLICIES):
    """(name, ExitConfig) per case. Under catchup a forced exit still goes deep every
    `max_backlog + 1` tokens (the backlog bound); under verify the random drafts are mostly
    rejected, so that row shows the cost of verification, not a quality-preserving speed-up."""
    yield "full", ExitConfig()
    for e in exits:
        heads = ExitHeads("static", [e], bb)
        for policy in policies:
            if policy != "speculate":  # its rows: speculate_bench.speculate_cases
                yield f"exit@{e}", ExitConfig(heads=heads, thresholds=0.0, policy=policy, max_backlog=max_backlog)


def _with_switches(dec, module, **flags):
    """dec, its every generation run with a kernel module's switches set so (its graphs are captured
    that way): e.g. gemv ENABLED=False, cuBLAS for every matmul; mamba2_step / decode_attention
    ENABLED=False, inductor's code for the Mamba-2 step / the attention."""
    generate = dec.generate

    def run(*args, **kwargs):
        old = {k: getattr(module, k) for k in flags}
        for k, v in flags.items():
            setattr(module, k, v)
        try:
            return generate(*args, **kwargs)
        finally:
            for k, v in old.items():
                setattr(module, k, v)

    dec.generate = run
    return dec


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_gbps(device, nbytes: int = 1 << 30, repeats: int = 10, batches: int = 3) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s), the best of
    `batches` timed batches; None off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(dev)
    best = 0.0
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(repeats):
            y.copy_(x)
        _sync(dev)
        best = max(best, 2 * nbytes * repeats / (time.perf_counter() - t0) / 1e9)
    return best


def best_copy_gbps(probes) -> float | None:
    """The copy bandwidth the rows are measured against: the highest of the run's probes (None
    where none was taken). One probe after all the timed runs once read 14% below the same
    machine's other runs (benchmarks/NOTES.md 2026-12-07, eighth session), which inflates every
    "% of copy" figure; the highest reading is the conservative denominator."""
    got = [g for g in probes if g is not None]
    return max(got) if got else None


def _hf_generate_ms(bb, ids, tokens, repeats, **generate_kw):
    """Decode ms/token of HF's own `generate` (greedy) on the same prompt. A logits processor
    stamps the time at every step, so the prefill is left out and each decode step is timed."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            _sync(scores.device)
            self.times.append(time.perf_counter())
            return scores

    x = torch.tensor([ids], device=bb.device)
    steps = []
    for _ in range(repeats + 1):  # the first run warms up (and compiles, for the static cache)
        stamp = Stamp()
        bb.model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                          eos_token_id=None, logits_processor=LogitsProcessorList([stamp]), **generate_kw)
        steps.append([(b - a) * 1000 for a, b in zip(stamp.times, stamp.times[1:])])
    return statistics.median(statistics.mean(s) for s in steps[1:])


def _cache_kw(model) -> str:
    """The cache keyword HF's forward declares in this version (renamed during 5.x)."""
    params = inspect.signature(type(model).forward).parameters
    return next(k for k in ("cache", "cache_params", "past_key_values") if k in params)


class HFStepper:
    """Greedy decode through HF's own modules, one token per step, the step compiled with
    mode="reduce-overhead" (CUDA graphs + fused kernels): the gpt-fast recipe. Transformers use
    one `StaticCache`, reset between runs so that compiled code and graphs are reused; Mamba
    models use the cache their own prompt pass returns (HF's recurrent cache is fixed-size)."""

    def __init__(self, bb, max_len: int, compile_step: bool = True):
        self.bb, self.model = bb, bb.model
        self.kw = _cache_kw(self.model)
        self.static = None
        if bb.family == "transformer":
            from transformers import StaticCache

            self.static = StaticCache(config=self.model.config, max_cache_len=max_len)

        def step(tok, pos, cache):
            return self.model(input_ids=tok, cache_position=pos, position_ids=pos[None], use_cache=True,
                              **{self.kw: cache}).logits[:, -1]

        self.step = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compile_step else step

    @torch.no_grad()
    def generate(self, ids, tokens, times=None) -> list[int]:
        dev, P = self.bb.device, len(ids)
        x = torch.tensor([ids], device=dev)
        if self.static is not None:
            self.static.reset()
            cache = self.static
            out = self.model(input_ids=x, cache_position=torch.arange(P, device=dev), use_cache=True, **{self.kw: cache})
        else:
            out = self.model(input_ids=x, use_cache=True)
            cache = getattr(out, "cache_params", None) or out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        new = [tok]
        for t in range(P, P + tokens - 1):
            tok = self.step(tok, torch.tensor([t], device=dev), cache).argmax(-1, keepdim=True).clone()
            new.append(tok)
            if times is not None:
                _sync(dev)
                times.append(time.perf_counter())
        return torch.cat(new, 1)[0].tolist()


# The compiled peer's first steps warm up and record its CUDA graphs: left out of its mean.
PEER_WARM_STEPS = 3


def _hf_compiled_ms(bb, ids, tokens, repeats):
    stepper = HFStepper(bb, len(ids) + tokens)
    runs = []
    for _ in range(repeats + 1):  # the first run compiles and captures
        times = []
        stepper.generate(ids, tokens, times=times)
        runs.append([(b - a) * 1000 for a, b in zip(times, times[1:])][PEER_WARM_STEPS:])
    return statistics.median(statistics.mean(s) for s in runs[1:])


def _peer_ms(name, bb, ids, tokens, repeats):
    try:
        if name == "hf":
            return _hf_generate_ms(bb, ids, tokens, repeats)
        if name == "hf-static":
            return _hf_generate_ms(bb, ids, tokens, repeats, cache_implementation="static")
        if name == "hf-compiled":
            return _hf_compiled_ms(bb, ids, tokens, repeats)
        if name == "mamba-ssm":
            from meestral.tools.mamba_ssm_peer import mamba_ssm_ms

            return mamba_ssm_ms(bb, ids, tokens, repeats)
    except Exception as e:  # a peer that cannot run this backbone is reported, not fatal
        print(f"peer {name} skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return None
    raise ValueError(f"unknown peer {name!r}: use {', '.join(PEERS)}")


class _Stopped(Exception):
    """SIGTERM while the peers run (see `_term_stops`)."""


@contextlib.contextmanager
def _term_stops():
    """While the peers run, SIGTERM (what `timeout` sends at a time limit) raises _Stopped, so that
    the rows of the cases already measured are still written (a peer's warm-up or compile can take
    minutes: a GPU call cut off inside mamba-ssm's lost a whole table this way). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Stopped()

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _progress(label, ms):
    """One stderr line per measured case as it comes: a run cut short by a time limit still shows
    what it measured (the JSON rows, with their in-run ratios, are written at the end)."""
    got = "skipped" if ms is None else f"{ms:.3f} ms/token ({1000.0 / ms:.1f} tok/s)"
    print(f"measured: {label}: {got}", file=sys.stderr, flush=True)


SWITCHES = ("eager", "cublas", "fusion", "gemv-runs", "window-gemv", "window-attention", "launches", "ssm-step",
            "ssm-state", "attention", "fold", "device-exits")


def _add_switch_rows(bb, decs, engine, switches=SWITCHES):
    """Rows that time one kernel switch against its default in the same run (a capturing engine on
    the Triton GEMV): `switches` names which (SWITCHES; `eager`, the eager engine's full depth beside
    a fixed-shape engine's, is run_bench's own: it needs no GPU). Full depth unless said: cublas (every
    matmul on cuBLAS: what the Triton GEMV gains), fusion (the norms, gate and residual adds inside
    the GEMV or not; a Mamba block: its residual add, and a Mamba-2 block's norm, gemv.FUSED_MAMBA_NORM),
    gemv-runs (the one-row GEMV's autotuner with or without the tilings that read two runs of weights
    at a time, gemv.RUNS), window-gemv / window-attention (the first
    catch-up case with the several-row fusions switched / with inductor's window attention),
    launches (dependent or serial launches of our kernels, pdl.py; full depth and the first
    catch-up case), ssm-step (inductor's Mamba-2 step), ssm-state (a Mamba-2 state in float32 or in
    the model's dtype, ssm.STATE_IN_MODEL_DTYPE; full depth and the first catch-up case), attention (inductor's one-token attention),
    fold (one token's attention parts combined inside its first kernel or by a second one),
    device-exits (the first copy case's exit point asked by softmax heads, whose decision depends
    on the data: threshold 0, so every token still leaves there, decided on the host one step at
    a time, and, where graphs can branch, on the device in chunks; threshold 1, no token leaves,
    decided on the device: what the branches cost)."""
    def row(name, policy, module, config=None, **flags):
        return name, policy, _with_switches(EarlyExitDecoder(bb, config=config, engine=engine), module, **flags)

    win = next(((n, d.config) for n, pol, d in decs if pol == "catchup"), None)  # the first catch-up case
    if "cublas" in switches:
        decs.insert(1, row("full_cublas_matmuls", "-", gemv, ENABLED=False))
    if "fusion" in switches:
        flag = "FUSED" if bb.family == "transformer" else "FUSED_KEEP"
        decs.insert(1, row(f"full_{'unfused' if getattr(gemv, flag) else 'fused'}_gemv", "-", gemv,
                           **{flag: not getattr(gemv, flag)}))
        if getattr(bb, "v2", False) and gemv.FUSED:  # a Mamba-2 block's norm: inside in_proj's GEMV or not
            decs.insert(1, row(f"full_norm_{'outside' if gemv.FUSED_MAMBA_NORM else 'in'}_gemv", "-", gemv,
                               FUSED_MAMBA_NORM=not gemv.FUSED_MAMBA_NORM))
    if "gemv-runs" in switches and gemv.ENABLED:
        decs.insert(1, row(f"full_{'one_run' if gemv.RUNS > 1 else 'two_run'}_gemv", "-", gemv,
                           RUNS=1 if gemv.RUNS > 1 else 2))
    if bb.family == "transformer" and win is not None:
        if "window-gemv" in switches and gemv.FUSED:
            decs.append(row(f"{win[0]}_{'unfused' if gemv.FUSED_ROWS else 'fused'}_window_gemv", "catchup", gemv,
                            win[1], FUSED_ROWS=not gemv.FUSED_ROWS))
        if "window-attention" in switches and decode_attention.ENABLED and decode_attention.WINDOW:
            decs.append(row(f"{win[0]}_compiled_window_attention", "catchup", decode_attention, win[1], WINDOW=False))
    if "launches" in switches and pdl.capable(torch.zeros(1, device=bb.device)):
        launches = "serial" if pdl.ENABLED else "dependent"
        decs.insert(1, row(f"full_{launches}_launches", "-", pdl, ENABLED=not pdl.ENABLED))
        if win is not None:
            decs.append(row(f"{win[0]}_{launches}_launches", "catchup", pdl, win[1], ENABLED=not pdl.ENABLED))
    if "ssm-step" in switches and getattr(bb, "v2", False) and mamba2_step.ENABLED:
        decs.insert(1, row("full_compiled_ssm_step", "-", mamba2_step, ENABLED=False))
    if "ssm-state" in switches and getattr(bb, "v2", False):
        kept = "float32" if ssm.STATE_IN_MODEL_DTYPE else "model_dtype"
        decs.insert(1, row(f"full_{kept}_state", "-", ssm, STATE_IN_MODEL_DTYPE=not ssm.STATE_IN_MODEL_DTYPE))
        if win is not None:
            decs.append(row(f"{win[0]}_{kept}_state", "catchup", ssm, win[1],
                            STATE_IN_MODEL_DTYPE=not ssm.STATE_IN_MODEL_DTYPE))
    if "attention" in switches and bb.family == "transformer" and decode_attention.ENABLED:
        decs.insert(1, row("full_compiled_attention", "-", decode_attention, ENABLED=False))
    first_copy = "device-exits" in switches and next(
        ((n, d.config) for n, pol, d in decs if pol == "copy" and d.config.exit_points), None)
    if first_copy:
        from meestral.decoding.graph_engine import branches_in_graphs

        name, cfg = first_copy
        heads = ExitHeads("softmax", cfg.exit_points[:1], bb).to(bb.device)
        branch = branches_in_graphs() and decs[0][2].engine.capture
        for thr, where in ((0.0, "host"), (0.0, "device"), (1.0, "device")):
            if where == "device" and not branch:
                continue
            dec = EarlyExitDecoder(bb, config=ExitConfig(heads=heads, thresholds=thr, policy="copy"), engine=engine)
            dec.engine.decides_on_device = where == "device"
            decs.append((f"{name}_softmax{'_never' if thr else ''}_{where}_decisions", "copy", dec))
    if "fold" in switches and bb.family == "transformer" and decode_attention.ENABLED:
        decs.insert(1, row(f"full_{'unfolded' if decode_attention.FOLD else 'folded'}_attention", "-", decode_attention,
                           FOLD=not decode_attention.FOLD))


def run_bench(backbone="smollm2", exits=None, tokens=32, device="cpu", dtype=None, repeats=3, out=None,
              max_backlog=4, prompt_tokens=None, engine="auto", policies=POLICIES, peers=("hf",), profile=None,
              draft_tokens=(4,), inject=(), draft_vocab=(0,), prompts=1, chat=False, one_step=True,
              switches=SWITCHES):
    """Rows of JSON per case (see the module's docstring). `profile` (a path): also profile one
    generation of our full depth, of the first exit layer's copy and catchup rows and of the first
    fixed-k speculate row, and write
    their kernel tables there (kernel_profile.py). With `speculate` in `policies`: its rows per
    exit point, per `draft_tokens` entry (a number or 'auto') and per injected acceptance in
    `inject` (speculate_bench.py). `prompts`: how many of PROMPTS each case decodes per run (with
    `chat`, in the chat template); a row's ms/token is the mean over them of each prompt's median,
    and with several it also gives each prompt's ratio to our full depth. The full-depth peers are
    timed on every prompt too; hf-assisted (10-50x slower) on the first. `one_step` False: no
    one-step-at-a-time twins of the chunked rows (a shorter run). `switches`: which kernel switches
    get a row of their own on a GPU (`_add_switch_rows`; () for none: a shorter run), and with
    `eager` the eager engine's full depth beside a fixed-shape engine's."""
    from meestral.tools.speculate_bench import (add_time_predictions, assisted_peer_ms, speculate_cases,
                                                speculate_fields)

    out = out or sys.stdout  # resolved per call, so redirections made after import are honoured
    bb = load_backbone(backbone, dtype=dtype, device=device)
    L = bb.num_layers
    exits = check_exit_points(exits or [L // 3, 2 * L // 3], L)
    if not 1 <= prompts <= len(PROMPTS):
        raise ValueError(f"prompts={prompts}: give 1 to {len(PROMPTS)}")
    prompt_set = [prompt_ids(bb, prompt_tokens, text, chat) for text in PROMPTS[:prompts]]
    ids = prompt_set[0]
    opts = SamplingOptions(max_new_tokens=tokens)
    # full depth runs no exit: its policy reads "-" in the table, the JSON, the stderr lines and the
    # profile, whatever policy its config carries
    decs = [(name, "-" if name == "full" else cfg.policy, EarlyExitDecoder(bb, config=cfg, engine=engine))
            for name, cfg in cases(bb, exits, max_backlog, policies)]
    alpha = {}  # speculate row's decoder -> its injected acceptance (None: the drafts' own)
    if "speculate" in policies:
        for name, cfg, a in speculate_cases(bb, exits, draft_tokens, inject, draft_vocab):
            dec = EarlyExitDecoder(bb, config=cfg, engine=engine)
            dec.policy.inject = a
            alpha[dec] = a
            decs.append((name, "speculate", dec))
    kind = type(decs[0][2].engine).__name__
    # the eager engine's full depth beside it: what the fixed path gains (a minute of a GPU call on
    # a 7B Mamba shape: a run whose switches leave out `eager` skips it)
    if kind != "EagerEngine" and "eager" in switches:
        decs.insert(1, ("full", "-", EarlyExitDecoder(bb, engine="eager")))
    if one_step and decs[0][2].engine.chunk_steps:  # and one step at a time: what chunks gain (full_chunk.py)
        twins = []
        for name, policy, dec in decs:  # every case whose steps run several to a device run
            if dec.engine.chunk_steps and getattr(dec.policy, "known", None) is not None:
                one = EarlyExitDecoder(bb, config=dec.config, engine=engine)
                one.engine.chunk_steps = False
                twins.append((f"{name}_one_step_at_a_time", policy, one))
        decs[1:1] = twins[:1]
        decs.extend(twins[1:])
    if decs[0][2].engine.capture and gemv.applies(torch.zeros(1, 8, device=bb.device, dtype=bb.dtype),
                                                   torch.zeros(8, 8, device=bb.device, dtype=bb.dtype)):
        _add_switch_rows(bb, decs, engine, switches)
    for name, policy, dec in decs:
        # Warm-up (allocator, compile, capture). A capturing engine meets a new shape at each key
        # range and each cycle length up to the last token: it warms up on the whole length, so the
        # timed runs replay graphs and never time a capture.
        warm = tokens if dec.engine.capture else min(tokens, 8)
        t0 = time.perf_counter()
        for p_ids in prompt_set:  # each prompt length is its own key range
            dec.generate([p_ids], SamplingOptions(max_new_tokens=warm))
        # One line each: a run cut short by a time limit shows where its warm-up time went.
        print(f"warmed up: {name} {policy} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    probes = [copy_gbps(bb.device)]  # before the timed runs, and again after them (best_copy_gbps)
    runs = {i: [[] for _ in prompt_set] for i in range(len(decs))}  # case -> prompt -> one summary per repeat
    counts = {dec: [] for dec in alpha}
    for _ in range(repeats):
        for i, (name, policy, dec) in enumerate(decs):
            for p, p_ids in enumerate(prompt_set):
                if dec in alpha:
                    dec.policy.reset_counts()
                # dec.summary charges the work on rolled-back (verify) tokens to the kept ones.
                runs[i][p].append(dec.summary(dec.generate([p_ids], opts)[0]))
                if dec in alpha:
                    counts[dec].append(dict(dec.policy.reset_counts(),
                                            ms=runs[i][p][-1]["ms_per_token"] * runs[i][p][-1]["tokens"]))
                _progress(f"{name} {policy} {type(dec.engine).__name__}" + (f" prompt {p}" if prompts > 1 else ""),
                          runs[i][p][-1]["ms_per_token"])
    peer_ms = {}  # peer -> ms/token per prompt (None: it could not run)
    stopped = False
    try:
        with _term_stops():
            for p in peers:
                if p == "hf-assisted":
                    for e, ms in assisted_peer_ms(bb, ids, tokens, repeats, exits).items():
                        peer_ms[f"hf-assisted@{e}"] = None if ms is None else [ms]
                        _progress(f"peer hf-assisted@{e}", ms)
                    continue
                per = []
                for p_ids in prompt_set:
                    per.append(_peer_ms(p, bb, p_ids, tokens, repeats))
                    _progress(f"peer {p}", per[-1])
                    if per[-1] is None:
                        break
                peer_ms[p] = None if None in per else per
    except _Stopped:
        stopped = True
        print(f"stopped (SIGTERM) while timing the peers: rows written with the peers measured so far "
              f"({', '.join(k for k, v in peer_ms.items() if v is not None) or 'none'})", file=sys.stderr, flush=True)
    probes.append(copy_gbps(bb.device))
    gbps = best_copy_gbps(probes)
    rows = []
    for i, (name, policy, dec) in enumerate(decs):
        by_prompt = [statistics.median(r["ms_per_token"] for r in s) for s in runs[i]]
        first = [s[0] for s in runs[i]]  # the accounting is the same in every repeat
        ms = statistics.mean(by_prompt)
        rows.append({
            "case": name, "policy": policy, "engine": type(dec.engine).__name__,
            "backbone": bb.name, "device": str(bb.device), "dtype": str(bb.dtype).removeprefix("torch."), "layers": L,
            "prompt_tokens": len(ids), "prompts": prompts, "chat": chat, "decoded_tokens": first[0]["tokens"],
            "mean_layers_run": _mean(first, "mean_layers_run"), "draft_mean_layers_run": _mean(first, "draft_mean_layers_run"),
            "deep_passes_per_token": _mean(first, "deep_passes_per_token"), "rolled_back": _mean(first, "rolled_back"),
            "max_backlog": max_backlog if policy in ("catchup", "verify") else None,
            "weight_bytes_per_token": _mean(first, "weight_bytes_per_token"),
            "flops_per_token": _mean(first, "flops_per_token"), "ms_per_token": ms, "tokens_per_s": 1000.0 / ms,
            "ms_per_token_by_prompt": by_prompt,
        })
        if dec in alpha:
            rows[-1].update(speculate_fields(bb, dec.config, alpha[dec], counts[dec]))
    full = rows[0]
    for p, per in peer_ms.items():
        if per is not None:
            case = PEER_CASES.get(p) or p.replace("hf-assisted", "hf_assisted")
            ms = statistics.mean(per)
            rows.append(dict(full, case=case, policy="-", engine="mamba-ssm" if p == "mamba-ssm" else "hf",
                             ms_per_token=ms, tokens_per_s=1000.0 / ms, ms_per_token_by_prompt=per))
    # The assisted peer is a lossless early-exit decoder, not a full-depth one: kept out of "best peer".
    peer_rows = [r for r in rows if r["engine"] in ("hf", "mamba-ssm") and not r["case"].startswith("hf_assisted")]
    best_peer = min((r["ms_per_token"] for r in peer_rows), default=None)
    for r in rows:
        r["speedup_vs_full"] = full["ms_per_token"] / r["ms_per_token"]
        r["speedup_vs_full_by_prompt"] = [f / m for f, m in zip(full["ms_per_token_by_prompt"], r["ms_per_token_by_prompt"])]
        r["worst_prompt_speedup_vs_full"] = min(r["speedup_vs_full_by_prompt"])
        if r.get("predicted_speedup"):
            r["of_predicted"] = r["speedup_vs_full"] / r["predicted_speedup"]
        r["speedup_vs_best_peer"] = None if best_peer is None else best_peer / r["ms_per_token"]
        r["weight_bytes_ratio"] = r["weight_bytes_per_token"] / full["weight_bytes_per_token"]
        # What an exit gains against what its bytes allow (1.0: every byte saved is time saved).
        r["speedup_of_byte_ratio"] = r["speedup_vs_full"] * r["weight_bytes_ratio"]
        r["weight_gbps"] = r["weight_bytes_per_token"] * r["tokens_per_s"] / 1e9
        r["copy_gbps"] = gbps
        r["copy_gbps_probes"] = probes
        r["pct_of_copy_bandwidth"] = None if gbps is None else 100.0 * r["weight_gbps"] / gbps
        r["host"] = platform.node() or "unknown"
        r["torch"] = torch.__version__
        r["date"] = time.strftime("%Y-%m-%d")
    add_time_predictions(rows, full["ms_per_token"])
    for r in rows:
        print(json.dumps(r), file=out, flush=True)
    if stopped:
        raise SystemExit(143)  # as a process ended by SIGTERM: the caller's time limit still shows
    if profile:
        _write_profiles(profile, bb, ids, tokens, opts, decs)
    print(f"\n{'case':<32} {'policy':<10} {'engine':<12} {'layers':>7} {'deep':>5} {'tok/s':>8} {'vs full':>8} "
          f"{'vs peer':>8} {'GB/s':>7} {'bytes':>6} {'of bytes':>8}", file=sys.stderr)
    for r in rows:
        vp = "" if r["speedup_vs_best_peer"] is None else f"{r['speedup_vs_best_peer']:.2f}x"
        spec = ""
        if r.get("acceptance") is not None:
            spec = f"  acceptance {r['acceptance']:.2f}, {r['accepted_per_cycle']:.2f} accepted/cycle"
            if r.get("predicted_speedup"):
                spec += f", predicted {r['predicted_speedup']:.2f}x ({r['of_predicted']:.2f} of it)"
            if r.get("predicted_speedup_time"):
                spec += f", from times {r['predicted_speedup_time']:.2f}x ({r['of_predicted_time']:.2f})"
        if prompts > 1:
            spec += f"  worst prompt {r['worst_prompt_speedup_vs_full']:.2f}x"
        print(f"{r['case']:<32} {r['policy']:<10} {r['engine']:<12} {r['mean_layers_run']:>7.1f} "
              f"{r['deep_passes_per_token']:>5.2f} {r['tokens_per_s']:>8.1f} {r['speedup_vs_full']:>7.2f}x {vp:>8} "
              f"{r['weight_gbps']:>7.1f} {r['weight_bytes_ratio']:>5.2f}x {r['speedup_of_byte_ratio']:>8.2f}{spec}",
              file=sys.stderr)
    return rows


def _mean(summaries, key):
    """The mean of a summary field over prompts (None where the field is not given)."""
    vals = [s.get(key) for s in summaries]
    return None if None in vals else statistics.mean(vals)


def _write_profiles(path, bb, ids, tokens, opts, decs):
    """Kernel tables of our full depth, the first exit layer's copy / catchup rows and the first
    fixed-k speculate row, per decode step (the prompt and first token subtracted).

    CUPTI cannot be trusted on CUDA-graph replays (an illegal memory access on the 2026-12-02 run,
    pytorch#75504; kineto#1165: misattributed kernels before CUDA 13.1), so the profiled decoders
    launch the *same compiled kernels* without capture (engine "compiled"): device busy time per
    token is what the graph replays too, and the timed graph rows give the wall-clock beside it."""
    from meestral.files import write_json
    from meestral.tools.kernel_profile import format_table, kernel_table

    first_exit = next((n for n, _, _ in decs if n.startswith("exit@")), None)
    # The first fixed-k speculate row too: where a cycle's time goes (drafts, deep pass, the state
    # history and its restore on a Mamba) against the bytes it reads.
    first_spec = next((n for n, p, d in decs if p == "speculate" and not d.config.adaptive), None)
    first = dataclasses.replace(opts, max_new_tokens=1)  # the prompt and first token: what `minus` runs
    tables = {}
    for name, policy, dec in decs:
        if not ((name == "full" and dec is decs[0][2]) or (name == first_exit and policy in ("copy", "catchup"))
                or (name == first_spec and policy == "speculate")):
            continue
        engine = "compiled" if bb.device.type == "cuda" and type(dec.engine).__name__ == "GraphEngine" else "eager"
        prof = EarlyExitDecoder(bb, config=dec.config, engine=engine)
        # the timed row's device runs (chunks, catch-up cycles), not the one-step path: the kernels
        # and window lengths it times (the compiled engine runs the same bodies without capture)
        prof.engine.chunk_steps = dec.engine.chunk_steps
        if policy == "speculate":
            prof.policy.inject = dec.policy.inject  # the same acceptance as the timed row
        # compile / warm up outside the profile, over the whole length: catch-up meets its window
        # lengths only as it goes, and a Mamba shape compiled under the profiler took minutes
        # (benchmarks/NOTES.md 2026-12-07, seventh session)
        prof.generate([ids], opts)
        # the decode steps alone: the prompt and first token run again apart and are subtracted
        # (a Mamba-2 prompt through the chunked scan outweighed a hundred decode steps)
        tables[f"{name} {policy} ({engine} kernels)"] = kernel_table(lambda: prof.generate([ids], opts), bb.device,
                                                                     per=max(tokens - 1, 1),
                                                                     minus=lambda: prof.generate([ids], first))
    write_json(path, {"backbone": bb.name, "device": str(bb.device), "dtype": str(bb.dtype), "tokens": tokens,
                      "prompt_tokens": len(ids), "tables": tables}, indent=1)
    for label, t in tables.items():
        print(format_table(label, t), file=sys.stderr)
