"""Input checked at the boundary, once, for every command: a bad value is refused with one line
naming it and the fix before anything is loaded, computed or written.

- `check_args(args)`: every parsed option, by name, against one table (`RULES`): numbers finite
  and in range, lists not empty and without repeats, no empty strings, the device available,
  and options that another option would silently override. An option keeps one meaning (and
  one rule) in every command that has it.
- `check_fields(cfg)`: the same rules for a config dataclass built in Python.
- `check_device(spec)`: the device exists on this machine (also called by `load_backbone`).
- `check_model_folder(path)`: a Hugging Face folder holds weights and tokenizer files.
- `check_output(path, option)`: an output location is writable, before the work that fills it.
- The context-length rule (`context_length`, `check_context`), below.

Context length
--------------
A Transformer backbone has a positional limit (its config's `max_position_embeddings`). MEEstral
REFUSES input that would run past it, with the limit in the message; it never truncates on its
own: `generate` (prompt tokens + `--max-new-tokens`), `train` / `oracle` / `calibrate`
(`--seq-len`), `eval` / `sweep` / the lm-eval model (`--max-length` / `max_length`, and a task's
`max_gen_toks` against that window). Inside lm-eval requests lm-eval's own rules still apply, as
its `hf` model does: contexts are left-truncated to the window. State-space backbones (Mamba,
Mamba-2) have no positional limit; the lm-eval model's window defaults to 2048 tokens there, as
lm-eval's `hf` model's does.

Memory bounds every architecture, state-space ones included: past `MEMORY_CHECK_FROM` tokens
(rows x positions), the same checks also estimate the memory of the prompt pass, from the tensor
bytes that pass allocates on this backbone at three small lengths (measured once per backbone and
process, on its own device: `prefill_bytes`), and refuse input whose estimate exceeds what the
device has free (`available_bytes`), saying how many tokens fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from meestral.errors import MeestralError


# ---- one option's rule ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    """A finite int or float within [low, high] (either end open or absent)."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        lo, hi = (x if x is None or self.kind is int else f"{x:g}" for x in (self.low, self.high))
        if self.low is not None and self.high is not None:
            rng = f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        elif self.low is not None:
            rng = f"{'>' if self.low_open else '>='} {lo}"
        elif self.high is not None:
            rng = f"{'<' if self.high_open else '<='} {hi}"
        else:
            rng = ""
        return " ".join(x for x in (what, rng) if x) + (f" ({self.hint})" if self.hint else "")

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.kind is int and v != int(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))

    def check(self, value, option: str):
        if not self.ok(value):
            raise MeestralError(f"{option} is {value!r}: it must be {self.describe()}")


@dataclass(frozen=True)
class Items:
    """A list (already parsed from 'a,b,c'): not empty, each item by `item`, optionally unique."""

    item: Number | None = None
    unique: bool = False
    example: str = "1,2,3"

    def check(self, value, option: str):
        if isinstance(value, str):  # comma-separated names
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not value:
            raise MeestralError(f"{option} is empty: give e.g. {option} {self.example}")
        for v in value:
            if self.item is not None and not self.item.ok(v):
                raise MeestralError(f"{option} holds {v!r}: each value must be {self.item.describe()}")
            if isinstance(v, str) and not v:
                raise MeestralError(f"{option} holds an empty value: give e.g. {option} {self.example}")
        if self.unique:
            twice = sorted({v for v in value if value.count(v) > 1}, key=str)
            if twice:
                raise MeestralError(f"{option} lists {', '.join(map(str, twice))} twice: give each value once")


UNIT = Number(float, 0, 1)
OPEN_UNIT = Number(float, 0, 1, low_open=True, high_open=True)

# dest -> rule. Options not listed need none (free text, choices argparse checks, ids checked on load).
RULES = {
    # generation
    "max_new_tokens": Number(int, 1), "temperature": Number(float, 0, hint="0: greedy"),
    "top_k": Number(int, 0, hint="0: off"), "top_p": Number(float, 0, 1, low_open=True, hint="1: off"),
    "seed": Number(int, 0, 2**31 - 1), "max_backlog": Number(int, 1),
    "threshold": Items(UNIT, example="0.9 or 0.9,0.8,0.7"), "exits": Items(Number(int), example="8,16,24 (or leave it out: every quarter)"),
    "stop": Items(example="'\\n\\n'"),
    # evaluation
    "tasks": Items(unique=True, example="arc_easy,piqa"), "limit": Number(int, 1), "batch_size": Number(int, 1),
    "max_length": Number(int, 1), "thresholds": Items(UNIT, unique=True, example="0.5,0.7,0.9"),
    "policies": Items(unique=True, example="copy,catchup,verify"),
    "static_layers": Items(Number(int), unique=True, example="7,15,22"),
    "layer_drop": Items(Number(int, 1), unique=True, example="2,4,8"),
    "epsilon": OPEN_UNIT, "delta": OPEN_UNIT, "calib_fraction": OPEN_UNIT,
    # training (and the token counts of oracle / calibrate / bench)
    "seq_len": Number(int, 1), "batch": Number(int, 1), "steps": Number(int, 1), "tokens": Number(int, 1),
    "lr": Number(float, 0, 1, low_open=True), "warmup": Number(int, 0), "weight_decay": Number(float, 0),
    "topk": Number(int, 1, hint="1: strict"), "clip": Number(float, 0, low_open=True),
    "head_weights": Items(Number(float, 0, low_open=True), example="1,1,2"), "mlp_hidden": Number(int, 0, hint="0: linear head"),
    "log_every": Number(int, 1), "val_every": Number(int, 1), "ckpt_every": Number(int, 1),
    "val_rows": Number(int, 0, hint="0: no validation"), "val_fraction": Number(float, 0, 1, high_open=True),
    "shuffle_buffer": Number(int, 1),
    # bench
    "repeats": Number(int, 1), "prompt_tokens": Number(int, 1),
    "prompts": Number(int, 1, 6, hint="the benchmark has six prompts"),
    "peers": Items(unique=True, example="hf,hf-static,hf-compiled"),
    # distill
    "shards": Number(int, 1), "seconds": Number(float, 0, low_open=True), "corpus_share": Number(float, 0, 1),
    "ce_weight": Number(float, 0), "eval_every": Number(int, 1), "kd_topk": Number(int, 0, hint="0: the whole vocabulary"),
    "teacher_cache_gb": Number(float, 0, hint="0: off"),
    # adapt
    "rank": Number(int, 1), "alpha": Number(float, 0, low_open=True), "final_weight": Number(float, 0),
    "exit_weights": Items(Number(float, 0), example="1,1,2"), "rotation": Number(int, 1),
    "curriculum_share": Number(float, 0, 1), "layer_dropout": Number(float, 0, 1, high_open=True),
    "val_tokens": Number(int, 1),
    "inject": Items(UNIT, example="0.5,0.8"),  # bench: injected draft acceptance
    "draft_vocab": Number(int, 0, hint="0: the whole vocabulary"),
}
AUTO = {"exits"}  # options that also take the word auto (--exits auto: speculate's calibrated exit point)
FREE_TEXT = {"prompt", "rest"}  # checked where they are read (an empty prompt has its own message)
# (command, option) -> the word it takes for "no value" (an empty string is refused): only where
# that word is accepted (adapt measures on its corpus, so it has none).
EMPTY_MEANS = {("distill", "corpus"): "none"}
# --head: the training-free kinds, and full (no exit heads); classifier heads come from --heads DIR.
HEAD_KINDS = ("softmax", "margin", "saturation", "static", "full")


def check_fields(cfg) -> None:
    """A config dataclass's fields against the same rules as their command-line options, for
    Python callers (a NaN lr must not train): the first bad one is refused in one line."""
    from dataclasses import fields

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in RULES and value is not None:
            RULES[f.name].check(value, "--" + f.name.replace("_", "-"))


def check_args(args) -> None:
    """Refuse the first bad option of a parsed command line (see the module docstring). Fills in
    `--head`'s default (softmax), which is left unset so that `--heads` with `--head` is seen."""
    values = {k: v for k, v in vars(args).items() if v is not None and k not in ("func", "command")}
    for dest, value in values.items():
        option = "--" + dest.replace("_", "-")
        if value == "auto" and dest in AUTO:
            continue
        if dest in RULES:
            RULES[dest].check(value, option)
        elif isinstance(value, str) and not value.strip() and dest not in FREE_TEXT:
            none = EMPTY_MEANS.get((getattr(args, "command", None), dest))
            instead = f" (or {option} {none} for none)" if none else ""
            raise MeestralError(f"{option} is empty: give a value{instead}, or leave the option out")
    if "device" in values:
        check_device(values["device"])
    if values.get("head") not in (None, "none", "classifier", *HEAD_KINDS):  # classifier: its own message later
        raise MeestralError(f"--head {values['head']!r} is not a head kind: use {' | '.join(HEAD_KINDS)} (full: the "
                            "full model, no exits), or --heads DIR for trained heads")
    if values.get("heads"):  # trained heads fix their kind and exit points (oracle also measures at --exits)
        for other in ("head",) if getattr(args, "command", None) == "oracle" else ("exits", "head"):
            if other in values:
                raise MeestralError(f"--{other} has no effect with --heads (the trained heads in {values['heads']} "
                                    f"fix it): drop --{other}")
    if "steps" in values and "tokens" in values:  # train
        raise MeestralError("--steps and --tokens both say how long to train: give one of them")
    if hasattr(args, "head") and args.head is None:
        args.head = "softmax"


# ---- devices ---------------------------------------------------------------------------------------
def check_device(spec) -> None:
    """The device `spec` names exists here: cpu, cuda[:N] with a GPU present, or mps."""
    import torch

    try:
        dev = torch.device(str(spec))
    except (RuntimeError, TypeError, ValueError):
        raise MeestralError(f"unknown device {spec!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise MeestralError(f"device {spec!r} is not available here ({build} {torch.__version__}): use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise MeestralError(f"device {spec!r} does not exist: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise MeestralError(f"device {spec!r} is not available here (no Apple GPU): use --device cpu")
    elif dev.type != "cpu":
        raise MeestralError(f"device {spec!r} is not supported: use cpu, cuda, cuda:N or mps")


# ---- model folders ---------------------------------------------------------------------------------
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json", "spiece.model", "tokenizer.tiktoken")


def check_model_folder(path: Path) -> None:
    """A local Hugging Face folder holds its weights (every shard its index names) and tokenizer."""
    import json

    if not any((path / f).is_file() for f in WEIGHTS):
        raise MeestralError(f"backbone folder {path} has config.json but no weights ({' or '.join(WEIGHTS[::2])}): "
                            "copy the model's weight files into it")
    for index in WEIGHTS[1::2]:
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise MeestralError(f"{path / index} is not a weight index (no weight_map): copy it again") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise MeestralError(f"backbone folder {path} lacks weight file(s) {', '.join(missing)} named in {index}: "
                                    "copy them into it")
    if not any((path / f).is_file() for f in TOKENIZER):
        raise MeestralError(f"backbone folder {path} has no tokenizer files ({' or '.join(TOKENIZER[:2])}): "
                            "copy the model's tokenizer files into it")


# ---- outputs ---------------------------------------------------------------------------------------
def check_output(path, option: str, folder: bool = False) -> Path:
    """`path` can be written (created, or replaced) by this process: its first existing ancestor is
    a writable folder, and what exists at `path` is of the right kind. Nothing is created."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise MeestralError(f"{option} {path} is a {'file' if folder else 'folder'}: give a "
                            f"{'folder' if folder else 'file'} path")
    p = path if folder and path.exists() else path.parent
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise MeestralError(f"{option} {path} is not writable (at {p}): choose a writable location")
    return path


# ---- the context-length rule (module docstring) ----------------------------------------------------
def context_length(bb) -> int | None:
    """Positions the backbone was built for, or None where it has no positional limit (SSMs)."""
    cfg = getattr(getattr(bb, "model", None), "config", None)
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(cfg, attr, None)
        if v:
            return int(v)
    return None


def check_context(bb, needed: int, what: str, fix: str, rows: int = 1) -> None:
    """Refuse `needed` positions (in each of `rows` rows) past the backbone's context, '{what} needs
    N positions...: {fix}', or past the memory the prompt pass would need (`check_memory`)."""
    n = context_length(bb)
    if n is not None and needed > n:
        raise MeestralError(f"{what} needs {needed:,} positions, but {bb.name} has a context of {n:,}: {fix}")
    check_memory(bb, needed, what, fix, rows)


# Below this many tokens (rows x positions) no check is made: measuring costs three short passes,
# and every backbone whose weights load here has room for that many.
MEMORY_CHECK_FROM = 4096
MEMORY_SHARE = 0.8  # of the free memory: the rest is left for what the estimate does not see
_PREFILL_BYTES: dict = {}  # (name, fingerprint, device, dtype) -> (a, b, c): bytes = a + b*T + c*T^2


def check_memory(bb, needed: int, what: str, fix: str, rows: int = 1) -> None:
    """Refuse a prompt pass of `rows` x `needed` tokens whose estimated memory (`prefill_bytes`)
    exceeds MEMORY_SHARE of what the device has free, saying how many tokens would fit."""
    if needed * rows < MEMORY_CHECK_FROM:
        return
    free = available_bytes(bb.device)
    if free is None:  # unknown here: nothing to compare with
        return
    a, b, c = prefill_bytes(bb)
    est = lambda t: a + b * t + c * t * t  # noqa: E731
    budget = MEMORY_SHARE * free
    if est(needed) * rows <= budget:
        return
    per_row = budget / rows
    # The largest T with est(T) <= per_row (est grows with T: its coefficients are >= 0).
    fit = int((-b + math.sqrt(b * b + 4 * c * max(per_row - a, 0))) / (2 * c)) if c > 0 else int(max(per_row - a, 0) / b)
    where = f"{rows:,} rows of " if rows > 1 else ""
    gib = 2.0**30
    raise MeestralError(
        f"{what} needs about {est(needed) * rows / gib:,.1f} GiB for its prompt pass ({where}{needed:,} tokens on "
        f"{bb.name}, about {(est(needed) - a) / needed / 1024:,.1f} KiB a token), but device {bb.device} has "
        f"{free / gib:,.1f} GiB free: at most about {fit:,} tokens{' a row' if rows > 1 else ''} fit: {fix}")


def available_bytes(device) -> int | None:
    """Memory free for new tensors on `device` (CPU: MemAvailable, within a cgroup's limit), or None."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        return None
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            room = int(Path(limit).read_text()) - int(Path(used).read_text())
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
        free = room if free is None else min(free, room)
    return free


def prefill_bytes(bb) -> tuple[float, float, float]:
    """(a, b, c): the tensor bytes a full-depth prompt pass of T tokens (one row) allocates at its
    peak, a + b*T + c*T^2, fitted to passes of 128, 256 and 512 tokens on the backbone itself (the
    T^2 term: attention scores where the kernel materialises them). Cached per backbone."""
    import torch

    key = (bb.name, bb.fingerprint(), str(bb.device), str(bb.dtype))
    if key not in _PREFILL_BYTES:
        from meestral.decoding.engine import EagerEngine

        engine = EagerEngine(bb)

        def prefill(t):  # the decoder's prompt pass: a state with room for t + 1 slots, blocks, LM head
            state = engine.new_state(1, t + 1)
            pad = torch.zeros(1, dtype=torch.long, device=bb.device)
            engine.logits(engine.prefill(torch.zeros(1, t, dtype=torch.long, device=bb.device), state, pad)[:, -1])

        (t1, y1), (t2, y2), (t3, y3) = [(t, _peak_tensor_bytes(lambda: prefill(t))) for t in (128, 256, 512)]
        c = max(((y3 - y2) / (t3 - t2) - (y2 - y1) / (t2 - t1)) / (t3 - t1), 0.0)
        b = max((y2 - y1) / (t2 - t1) - c * (t1 + t2), 1.0)
        a = max(y1 - b * t1 - c * t1 * t1, 0.0)
        _PREFILL_BYTES[key] = (a, b, c)
        if bb.device.type == "cuda":
            torch.cuda.empty_cache()
    return _PREFILL_BYTES[key]


def _peak_tensor_bytes(fn) -> int:
    """The most bytes of tensor storage that `fn` held alive at once (any device): every op's new
    outputs are counted until the last tensor on their storage is gone. Storages that existed
    before (weights, views of them) are not counted."""
    import weakref

    import torch
    from torch.utils import _pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it]
    total = [0, 0]  # now, peak

    def gone(ptr):
        entry = live.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                total[0] -= entry[0]
                del live[ptr]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = None
            for t in pytree.tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr == 0:
                    continue
                entry = live.get(ptr)
                if entry is None:
                    if inputs is None:
                        inputs = {x.untyped_storage().data_ptr() for x in pytree.tree_leaves((args, kwargs))
                                  if isinstance(x, torch.Tensor)}
                    if ptr in inputs:  # a view of, or in-place on, what existed before
                        continue
                    entry = live[ptr] = [storage.nbytes(), 0]
                    total[0] += entry[0]
                    total[1] = max(total[1], total[0])
                entry[1] += 1
                weakref.finalize(t, gone, ptr)
            return out

    with torch.no_grad(), Count():
        fn()
    return total[1]
