"""Distil a student causal LM from a teacher: how the embedded Mamba-2 (`mamba2-smol`) is made.

Two processes share one GPU (the recipe, recipes/mamba2-smol/, starts both):

* `sample_teacher` makes text: the teacher answers prompts drawn from `distill_prompts` (topics x
  templates) by sampling (temperature 1 over the 200 most likely tokens, so the text follows the
  teacher's own distribution without its long tail), and writes shards of token ids atomically into a folder.
* `distill` trains the student on rows packed from those shards plus the training split of the
  embedded Shakespeare corpus (its held-out documents are where perplexity is measured). The
  teacher runs on the same rows and the loss is the full-vocabulary KL(teacher || student) plus a
  small cross-entropy on the tokens themselves. Shards are picked up as they appear; the run logs
  how often, on average, each token has been seen (`epochs`).

The student is an HF `Mamba2ForCausalLM` with the teacher's tokenizer, vocabulary and special
tokens, random or continued from existing weights (`init`: the embedded `mamba2-smol`, a GGUF file
of ours or an HF folder; their shape, a fresh optimiser, the CONTINUED learning-rate defaults); it
trains through the chunked scan of `backbones/ssd.py` (equal to HF's forward). Training
checkpoints atomically every `ckpt_every` steps and `resume` continues from the last one; the
end product is an HF folder and a Q8_0 GGUF file (`meestral.backbones.quantized`).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from meestral.backbones.ssm import use_grouped_gated_norm
from meestral.errors import MeestralError
from meestral.files import atomic_write, write_json

# The shipped student: 24 Mamba-2 blocks, as wide as fits under 48 MiB in Q8_0 with headroom
# (43 MiB). State size and head size follow Codestral Mamba (128, 64); one group.
STUDENT_SHAPE = dict(hidden_size=384, num_hidden_layers=24, state_size=128, expand=2, head_dim=64,
                     n_groups=1, conv_kernel=4, chunk_size=128)


# ---- models ------------------------------------------------------------------------------------
def load_teacher(spec: str, device: str, dtype=torch.bfloat16):
    """(HF model, HF tokenizer) of the teacher: 'smollm2' (embedded) or an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        from meestral.backbones.assets import smollm2_dir

        spec = str(smollm2_dir())
    if not Path(spec).is_dir():
        raise MeestralError(f"teacher {spec!r} is not a folder: give 'smollm2' or an HF model folder")
    tok = AutoTokenizer.from_pretrained(spec)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval().requires_grad_(False)
    return model, tok


def student_config(teacher_config, **shape):
    """A Mamba-2 config speaking the teacher's vocabulary and special tokens."""
    from transformers import Mamba2Config

    s = {**STUDENT_SHAPE, **shape}
    s["num_heads"] = s["expand"] * s["hidden_size"] // s["head_dim"]
    return Mamba2Config(vocab_size=teacher_config.vocab_size, tie_word_embeddings=True, residual_in_fp32=True,
                        bos_token_id=teacher_config.bos_token_id, eos_token_id=teacher_config.eos_token_id,
                        pad_token_id=teacher_config.pad_token_id, **s)


# ---- teacher text --------------------------------------------------------------------------------
def _prompt_ids(tok, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def sample_batch(model, inp, att, max_new_tokens: int, temperature: float, top_k: int, eos_ids, pad: int):
    """Sampled continuations [B, max_new_tokens] of left-padded prompts (pad after a row's EOS).

    A plain cached loop rather than `generate`: HF's top-p sort and `multinomial` over a 49k
    vocabulary at batch 2048 made `generate` run at 27k tokens/s on an H200. Here each step takes
    the top-k logits and samples them with the Gumbel-max trick; one host read every 32 steps
    checks whether every row has finished."""
    from transformers import DynamicCache

    cache = DynamicCache()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=inp, attention_mask=att, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    eos = torch.tensor(eos_ids, device=inp.device)
    done = torch.zeros(inp.shape[0], dtype=torch.bool, device=inp.device)
    out = torch.full((inp.shape[0], max_new_tokens), pad, dtype=torch.long, device=inp.device)
    pos = pos[:, -1:]
    for t in range(max_new_tokens):
        val, idx = logits.float().topk(top_k, dim=-1)
        gumbel = -torch.log(-torch.log(torch.rand_like(val).clamp_(1e-20, 1.0)))
        tok = idx.gather(-1, (val / temperature + gumbel).argmax(-1, keepdim=True))[:, 0]
        tok = torch.where(done, pad, tok)
        out[:, t] = tok
        done |= torch.isin(tok, eos)
        if t % 32 == 31 and bool(done.all()):
            break
        att = torch.cat([att, att.new_ones(att.shape[0], 1)], dim=1)  # finished rows are sliced off later
        pos = pos + 1
        logits = model(input_ids=tok[:, None], attention_mask=att, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return out


@torch.inference_mode()
def sample_teacher(teacher: str, out_dir: str, *, batch: int = 512, max_new_tokens: int = 384,
                   temperature: float = 1.0, top_k: int = 200, seed: int = 0, shards: int | None = None,
                   seconds: float | None = None, device: str = "cuda", log=print) -> int:
    """Write shards `out_dir/shard-<seed>-<k>.pt` of teacher samples (temperature `temperature`
    over the `top_k` most likely tokens) until `shards` are written,
    `seconds` have passed or a file `out_dir/STOP` appears. Each shard is a dict with `docs` (list
    of int32 tensors: prompt + sampled continuation, cut after the first EOS) and the prompts.
    Returns the number of shards written; restarting with the same seed continues the numbering."""
    from meestral.training.distill_prompts import sample_prompt

    if top_k < 1:
        raise MeestralError(f"--top-k is {top_k}: sampling needs at least the most likely token (1 or more)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_teacher(teacher, device)
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    # A plain continuation may end with the document separator instead of the chat end token.
    eos_ids |= {tok.get_vocab()[s] for s in ("<|endoftext|>", "</s>") if s in tok.get_vocab()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else sorted(eos_ids)[0]
    k = len(list(out.glob(f"shard-{seed:03d}-*.pt")))
    t0, written = time.time(), 0
    while (shards is None or written < shards) and (seconds is None or time.time() - t0 < seconds):
        if (out / "STOP").exists():
            break
        rng = random.Random(f"{seed}:{k}")
        torch.manual_seed(hash((seed, k)) % 2**31)
        prompts = [sample_prompt(rng) for _ in range(batch)]
        ids = [_prompt_ids(tok, p, chat) for p, chat in prompts]
        width = max(map(len, ids))
        inp = torch.full((batch, width), pad, dtype=torch.long)
        att = torch.zeros((batch, width), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding: every row's continuation starts at `width`
            inp[r, width - len(x):] = torch.tensor(x)
            att[r, width - len(x):] = 1
        ts = time.time()
        gen = sample_batch(model, inp.to(device), att.to(device), max_new_tokens, temperature, top_k, sorted(eos_ids), pad)
        gen = gen.cpu()
        docs, n_tok = [], 0
        for r, x in enumerate(ids):
            cont = gen[r].tolist()
            cut = next((j + 1 for j, t in enumerate(cont) if t in eos_ids), len(cont))
            doc = torch.tensor(x + cont[:cut], dtype=torch.int32)
            docs.append(doc)
            n_tok += len(doc)
        path = out / f"shard-{seed:03d}-{k:05d}.pt"
        atomic_write(path, lambda t: torch.save({"docs": docs, "prompts": prompts}, t))
        dt = time.time() - ts
        log(json.dumps({"shard": path.name, "docs": len(docs), "tokens": n_tok, "seconds": round(dt, 1),
                        "tok_per_s": round(n_tok / dt)}))
        k += 1
        written += 1
    return written


# ---- data ----------------------------------------------------------------------------------------
class RowPool:
    """Training rows of `seq_len` tokens packed from the teacher's shards (read as they appear) and
    from a fixed corpus tensor; `batch(n)` mixes them in the ratio `corpus_share`."""

    def __init__(self, data_dir: str | None, corpus: torch.Tensor | None, seq_len: int, eos: int,
                 corpus_share: float, seed: int):
        self.dir = Path(data_dir) if data_dir else None
        self.seq_len, self.eos, self.share = seq_len, eos, corpus_share
        self.corpus = corpus
        self.buf = torch.zeros((0, seq_len), dtype=torch.int32)  # grows by doubling: appends stay cheap
        self.n = 0
        self.seen: set[str] = set()
        self.gen = torch.Generator().manual_seed(seed)
        self.leftover: list[int] = []

    def refresh(self) -> int:
        """Pack shards not read yet; returns how many rows were added."""
        if self.dir is None or not self.dir.is_dir():
            return 0
        new = []
        for p in sorted(self.dir.glob("shard-*.pt")):
            if p.name in self.seen:
                continue
            try:
                docs = torch.load(p, weights_only=False)["docs"]
            except Exception:  # a shard being renamed into place right now: next refresh
                continue
            self.seen.add(p.name)
            buf = self.leftover
            for d in docs:
                buf.extend(d.tolist())
                if buf[-1] != self.eos:
                    buf.append(self.eos)
            n = len(buf) // self.seq_len
            if n:
                new.append(torch.tensor(buf[: n * self.seq_len], dtype=torch.int32).view(n, self.seq_len))
            self.leftover = buf[n * self.seq_len:]
        for rows in new:
            need = self.n + len(rows)
            if need > len(self.buf):
                grown = torch.zeros((max(need, 2 * len(self.buf)), self.seq_len), dtype=torch.int32)
                grown[: self.n] = self.buf[: self.n]
                self.buf = grown
            self.buf[self.n: need] = rows
            self.n = need
        return sum(x.shape[0] for x in new)

    @property
    def rows(self) -> torch.Tensor:
        return self.buf[: self.n]

    def batch(self, n: int) -> torch.Tensor:
        n_corpus = 0
        if self.corpus is not None and len(self.corpus):
            n_corpus = n if not len(self.rows) else int(round(n * self.share))
        parts = []
        if n_corpus:
            parts.append(self.corpus[torch.randint(len(self.corpus), (n_corpus,), generator=self.gen)])
        if n - n_corpus:
            parts.append(self.rows[torch.randint(len(self.rows), (n - n_corpus,), generator=self.gen)])
        return torch.cat(parts).long()


def corpus_rows(tok, seq_len: int, spec: str = "embedded", val_fraction: float = 0.05) -> torch.Tensor:
    """Every training-split document of a text source, tokenised as head training does (BOS +
    text + EOS) and packed into rows: the held-out documents (`data.is_validation`) stay out."""
    from meestral.data import is_validation, open_source

    src = open_source(spec)
    src.check()
    buf: list[int] = []
    for _, text in src.documents():
        if not is_validation(text, val_fraction):
            buf += _encode(tok, text)
    n = len(buf) // seq_len
    return torch.tensor(buf[: n * seq_len], dtype=torch.int32).view(n, seq_len)


def _encode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return bos + ids + [tok.eos_token_id]


def heldout_ppl(model, rows: torch.Tensor, batch: int = 8) -> float:
    """Perplexity of `model` on packed held-out rows (every next-token prediction counted); a
    Mamba-2 goes through the chunked scan (`ssd.forward_logits`, equal to HF's forward)."""
    from meestral.backbones.ssd import forward_logits

    run = (lambda x: forward_logits(model, x)) if model.config.model_type == "mamba2" else (lambda x: model(x).logits)
    nll, n = 0.0, 0
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            x = rows[i:i + batch].long().to(dev)
            logits = run(x)[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x[:, 1:].numel()
    return math.exp(nll / n)


# ---- the loss ------------------------------------------------------------------------------------
def kd_loss(student_logits, teacher_logits, targets, ce_weight: float):
    """(loss, kl, ce): mean over tokens of KL(teacher || student) on the full vocabulary, plus
    `ce_weight` x cross-entropy of the student on the actual next tokens. Computed in float32."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    ce = F.nll_loss(s.reshape(-1, s.shape[-1]), targets.reshape(-1))
    return kl + ce_weight * ce, kl, ce


def chunked_kd_loss(lm_head, hidden, teacher_logits, targets, ce_weight: float, rows: int = 8):
    """`kd_loss(lm_head(hidden), ...)` with the same value and gradients, a few rows at a time.

    Full-vocabulary float32 log-softmaxes of a 64 x 512 batch are ~6 GB each and the loss keeps
    several for backward: at batch 64 they were 85 GiB of peak memory on an H200, and the trainer
    ran out of memory beside the sampler (2026-12-01). Each chunk's loss is recomputed in backward
    (activation checkpointing), so only one chunk's logits are alive at a time."""
    from torch.utils.checkpoint import checkpoint

    def part(h, t, y):
        return torch.stack(kd_loss(lm_head(h), t, y, ce_weight))

    n = hidden.shape[0]
    total = hidden.new_zeros(3, dtype=torch.float32)
    for i in range(0, n, rows):
        sl = slice(i, min(n, i + rows))
        w = (sl.stop - sl.start) / n  # kd_loss averages over tokens: weigh chunks by their size
        total = total + w * checkpoint(part, hidden[sl], teacher_logits[sl], targets[sl], use_reentrant=False)
    return total[0], total[1], total[2]


# ---- training --------------------------------------------------------------------------------------
@dataclass
class DistillConfig:
    teacher: str = "smollm2"
    data: str | None = None  # folder of teacher shards (sample_teacher's out_dir)
    corpus: str | None = "embedded"  # a text source mixed in (its held-out split is never trained on)
    corpus_share: float = 0.05
    out: str = "runs/distill"
    shape: dict = field(default_factory=dict)  # overrides of STUDENT_SHAPE
    # Continue from existing weights instead of a random student: 'mamba2-smol' (the embedded
    # one), a GGUF file written by `finish`/`save_gguf`, or an HF folder. The student's shape is
    # then theirs; the optimiser starts fresh. A checkpoint in `out` (resume) takes precedence.
    init: str | None = None
    steps: int | None = None
    seconds: float | None = None  # instead of steps: the step count is fixed after 20 timed steps
    batch: int = 64
    seq_len: int = 512
    # None: the defaults of SCRATCH or CONTINUED below, by whether `init` is given.
    lr: float | None = None
    min_lr: float | None = None
    warmup: int | None = None
    decay_share: float = 0.25  # warm-up, constant, then linear decay over the last share of steps
    weight_decay: float = 0.1
    ce_weight: float = 0.2
    clip: float = 1.0
    min_rows: int = 256  # wait for this many sampled rows before training on them,
    wait_seconds: float = 120  # but no longer than this
    log_every: int = 10
    eval_every: int = 250
    ckpt_every: int = 200
    heldout_tokens: int = 65536
    compile: bool = False
    resume: bool = True
    seed: int = 0
    device: str = "cuda"


# Learning-rate defaults (peak, floor, warm-up steps). From scratch: warm-up 200, constant 3e-3,
# linear decay to 3e-4 over the last `decay_share` of the run (the run that made the shipped
# weights). Continued from trained weights (`init`): the same shape of schedule at half the peak,
# with the floor at the same 10% of it and a short warm-up. The shipped weights ended their run
# annealed at 3e-4; re-warming to the full 3e-3 would first undo that annealing (a loss spike
# that costs a good part of a short run to recover), while their perplexity curve was still
# falling steeply, so they are far from converged and a peak well above the old floor still pays.
# Re-warming to a fraction of the original peak and decaying again is the usual rule for
# continued pre-training (e.g. Ibrahim et al. 2024, "Simple and scalable strategies to
# continually pre-train large language models"). 50 steps of warm-up: the fresh AdamW moments
# need a few dozen steps to settle; the weights themselves need no warm-up.
SCRATCH = dict(lr=3e-3, min_lr=3e-4, warmup=200)
CONTINUED = dict(lr=1.5e-3, min_lr=1.5e-4, warmup=50)


def resolved(cfg: DistillConfig) -> DistillConfig:
    """`cfg` with the learning-rate fields left at None filled in (SCRATCH or CONTINUED; the
    floor is a tenth of the peak whichever peak is given)."""
    from dataclasses import replace

    base = CONTINUED if cfg.init else SCRATCH
    lr = cfg.lr if cfg.lr is not None else base["lr"]
    return replace(cfg, lr=lr, min_lr=cfg.min_lr if cfg.min_lr is not None else lr / 10,
                   warmup=cfg.warmup if cfg.warmup is not None else base["warmup"])


def init_student(spec: str, teacher_config, shape: dict | None = None):
    """The float32 Mamba-2 in `spec` ('mamba2-smol', a GGUF file, an HF folder), checked to speak
    the teacher's vocabulary; `shape` overrides that contradict its shape are refused."""
    from transformers import Mamba2ForCausalLM

    from meestral.backbones.quantized import model_from_gguf

    path = Path(spec).expanduser()
    if spec == "mamba2-smol":
        from meestral.backbones.assets import MAMBA2_SMOL

        if not MAMBA2_SMOL.is_file():
            raise MeestralError(f"--init mamba2-smol: the embedded weights are missing ({MAMBA2_SMOL}): "
                                "give the GGUF file's path instead")
        model = model_from_gguf(MAMBA2_SMOL)
    elif path.is_file():
        model = model_from_gguf(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model = Mamba2ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    else:
        raise MeestralError(f"--init {spec}: not 'mamba2-smol', a GGUF file or an HF folder with config.json")
    cfg = model.config
    if cfg.model_type != "mamba2":
        raise MeestralError(f"--init {spec} is a {cfg.model_type!r} model: the student is a Mamba-2")
    if cfg.vocab_size != teacher_config.vocab_size:
        raise MeestralError(f"--init {spec} has a vocabulary of {cfg.vocab_size}, the teacher "
                            f"{teacher_config.vocab_size}: it was not distilled from this teacher")
    for k, v in (shape or {}).items():
        if getattr(cfg, k, None) != v:
            raise MeestralError(f"--shape {k}={v} contradicts --init {spec} ({k}={getattr(cfg, k, None)}): "
                                "the student's shape comes from its weights; drop --shape")
    return model.float().train()


def _lr(cfg: DistillConfig, step: int, total: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_from = int(total * (1 - cfg.decay_share))
    if step < decay_from:
        return cfg.lr
    frac = (step - decay_from) / max(1, total - decay_from)
    return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, frac)


RETIME = 100  # steps between re-fixings of a `seconds` run's step count


def refixed_total(step: int, s_per_step: float, s_left: float, warmup: int, decay_share: float) -> int:
    """The step count that ends a `seconds` run at its deadline from `step` at the current speed,
    but never so small that the decay would already have begun (the schedule stays continuous:
    a run late for its deadline finishes its decay a little late rather than jumping in lr)."""
    fits = step + int(max(0.0, s_left) / max(s_per_step, 1e-9))
    return max(warmup + 1, math.floor(step / (1 - decay_share)) + 1 if decay_share < 1 else step + 1, fits)


def distill(cfg: DistillConfig, log=print) -> dict:
    """Train the student; returns the last log record. Writes into cfg.out: checkpoint.pt,
    log.jsonl, config.json, student/ (HF folder) and mamba2-smol.gguf (Q8_0) at the end."""
    from transformers import Mamba2ForCausalLM

    from meestral.data import heldout_rows
    from meestral.backbones.tokenizer import HFTokenizer

    cfg = resolved(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    teacher, tok = load_teacher(cfg.teacher, cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        student = init_student(cfg.init, teacher.config, cfg.shape).to(dev)
        scfg = student.config
    else:
        scfg = student_config(teacher.config, **cfg.shape)
        student = Mamba2ForCausalLM(scfg).to(dev)
    use_grouped_gated_norm(student)  # Mamba-2's per-group norm on every transformers release
    n_params = sum(p.numel() for p in student.parameters())
    decay = [p for n, p in student.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=dev.type == "cuda")
    corpus = corpus_rows(tok, cfg.seq_len, cfg.corpus) if cfg.corpus else None
    held = heldout_rows(cfg.corpus or "embedded", HFTokenizer(tok), cfg.heldout_tokens, cfg.seq_len)
    pool = RowPool(cfg.data, corpus, cfg.seq_len, tok.eos_token_id, cfg.corpus_share, cfg.seed)
    step, total, tokens_seen, elapsed = 0, cfg.steps, 0, 0.0
    ckpt = out / "checkpoint.pt"
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        step, total, tokens_seen, elapsed = state["step"], state["total"], state["tokens"], state["elapsed"]
        total = cfg.steps if cfg.steps is not None else total  # a longer run may continue a shorter one
        pool.gen.set_state(state["pool_rng"])
        # The checkpoint's weights replace the --init ones: a stopped run continues where it was.
        log(json.dumps({"resumed_at": step, "total": total, **({"init_ignored": cfg.init} if cfg.init else {})}))
    write_json(out / "config.json", {"distill": asdict(cfg), "student": scfg.to_dict(), "params": n_params},
               indent=1)
    log(json.dumps({"student_params": n_params, "corpus_rows": 0 if corpus is None else len(corpus),
                    "heldout_rows": len(held)}))
    teacher_ppl = heldout_ppl(teacher, held)
    from meestral.backbones.ssd import forward_collect

    def final_hidden(model, ids):
        return forward_collect(model, ids)[2]

    fwd = torch.compile(final_hidden) if cfg.compile else final_hidden
    logf = open(out / "log.jsonl", "a")

    def record(obj):
        line = json.dumps(obj)
        logf.write(line + "\n")
        logf.flush()
        log(line)

    def save_ckpt():
        atomic_write(ckpt, lambda t: torch.save({
            "student": student.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
            "tokens": tokens_seen, "elapsed": elapsed, "pool_rng": pool.gen.get_state()}, t))

    if cfg.init and step == 0:  # where the continued run starts from: the first point of its curve
        student.eval()
        record({"step": 0, "init": cfg.init, "heldout_ppl": round(heldout_ppl(student, held), 3),
                "teacher_heldout_ppl": round(teacher_ppl, 3)})
        student.train()
    pool.refresh()
    waited = 0
    while len(pool.rows) < cfg.min_rows and cfg.data and waited < cfg.wait_seconds:
        time.sleep(5)  # the sampler's first shards; the corpus alone feeds training if none come
        waited += 5
        if pool.refresh() == 0 and (Path(cfg.data) / "STOP").exists():
            break
    t_run = time.time()
    t_win, tok_win = time.time(), 0
    # With `seconds` the step count is fixed after 20 steps, then fixed again every RETIME steps
    # until the decay starts, from the speed of the last RETIME steps and the time left: the
    # trainer shares its GPU with a sampler and other trainers that start and stop, and a count
    # fixed once would end the decay far from the deadline (or be stopped before it).
    deadline, t_mark, s_mark = None, None, 0
    while total is None or step < total:
        if step % 20 == 0:
            pool.refresh()
        x = pool.batch(cfg.batch).to(dev, non_blocking=True)
        lr = _lr(cfg, step, total or 10**9)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            with torch.no_grad():
                t_logits = teacher(x).logits[:, :-1]
            hidden = fwd(student, x)[:, :-1]
            loss, kl, ce = chunked_kd_loss(student.lm_head, hidden, t_logits, x[:, 1:], cfg.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        tok_win += x.numel()
        if total is None and step == 20 and cfg.seconds:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_run) / 20
            total = max(cfg.warmup + 1, int(cfg.seconds / per_step))
            deadline, t_mark, s_mark = t_run + cfg.seconds, time.time(), step
            record({"step": step, "fixed_total_steps": total, "s_per_step": round(per_step, 4)})
        elif deadline is not None and step % RETIME == 0 and step < int(total * (1 - cfg.decay_share)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            per_step, t_mark, s_mark = (now - t_mark) / (step - s_mark), now, step
            new = refixed_total(step, per_step, deadline - now, cfg.warmup, cfg.decay_share)
            record({"step": step, "refixed_total_steps": new, "s_per_step": round(per_step, 4),
                    "s_left": round(deadline - now)})
            total = new
        if step % cfg.log_every == 0 or step == total:
            dt = time.time() - t_win
            elapsed += dt
            pool_tokens = pool.rows.numel() + (0 if corpus is None else corpus.numel())
            record({"step": step, "loss": round(loss.item(), 4), "kl": round(kl.item(), 4), "ce": round(ce.item(), 4),
                    "lr": lr, "grad_norm": round(float(gnorm), 3), "tokens": tokens_seen,
                    "tok_per_s": round(tok_win / dt), "pool_rows": len(pool.rows),
                    "epochs": round(tokens_seen / max(1, pool_tokens), 2), "elapsed_s": round(elapsed)})
            t_win, tok_win = time.time(), 0
        if step % cfg.eval_every == 0 or step == total:
            student.eval()
            record({"step": step, "heldout_ppl": round(heldout_ppl(student, held), 3),
                    "teacher_heldout_ppl": round(teacher_ppl, 3)})
            student.train()
        if step % cfg.ckpt_every == 0:
            save_ckpt()
    save_ckpt()
    return finish(student, tok, out, held, teacher_ppl, record)


def export(cfg: DistillConfig, log=print) -> dict:
    """`finish` from the run's last checkpoint: for a run stopped before its last step. The
    student's shape, the teacher and the held-out rows are the run's (its config.json)."""
    from transformers import Mamba2ForCausalLM

    from meestral.data import heldout_rows
    from meestral.backbones.tokenizer import HFTokenizer

    out = Path(cfg.out)
    if not (out / "checkpoint.pt").exists():
        raise MeestralError(f"{out} has no checkpoint.pt: give the --out folder of a distill train run")
    saved = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    if "distill" in saved:  # measured as the run measured: its teacher and held-out rows
        from dataclasses import replace

        run = saved["distill"]
        cfg = replace(cfg, **{k: run[k] for k in ("teacher", "corpus", "seq_len", "heldout_tokens") if k in run})
    teacher, tok = load_teacher(cfg.teacher, cfg.device)
    state = torch.load(out / "checkpoint.pt", map_location=cfg.device, weights_only=False)
    if "student" in saved:
        # The shape the run trained (its --init's or its --shape's), not the flags given here.
        from transformers import Mamba2Config

        scfg = Mamba2Config.from_dict(saved["student"])
    else:
        scfg = student_config(teacher.config, **cfg.shape)
    student = Mamba2ForCausalLM(scfg).to(cfg.device)
    use_grouped_gated_norm(student)
    student.load_state_dict(state["student"])
    held = heldout_rows(cfg.corpus or "embedded", HFTokenizer(tok), cfg.heldout_tokens, cfg.seq_len)

    def record(obj):
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(obj) + "\n")
        log(json.dumps(obj))

    record({"export_from_step": state["step"], "of_total": state["total"]})
    return finish(student, tok, out, held, heldout_ppl(teacher, held), record)


def finish(student, tok, out: Path, held, teacher_ppl: float, record) -> dict:
    """Save the HF folder and the Q8_0 file; measure what quantisation costs on held-out text."""
    from meestral.backbones.quantized import model_from_gguf, save_gguf

    student.eval()
    folder = out / "student"
    student.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    q = save_gguf(student.float(), out / "mamba2-smol.gguf")
    qmodel = model_from_gguf(out / "mamba2-smol.gguf").to(next(student.parameters()).device)
    res = {"final": True, "heldout_ppl_float": round(heldout_ppl(student.float(), held), 3),
           "heldout_ppl_q8_0": round(heldout_ppl(qmodel, held), 3), "teacher_heldout_ppl": round(teacher_ppl, 3),
           "gguf_bytes": q["bytes"]}
    record(res)
    return res


# ---- contamination ---------------------------------------------------------------------------------
def ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    w = "".join(c.lower() if c.isalnum() else " " for c in text).split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def contamination(train_texts, eval_texts, n: int = 13) -> dict:
    """Share of training documents that share an n-gram (13 words, as in GPT-3's decontamination)
    with any evaluation document, and how many n-grams are shared."""
    ev: set = set()
    for t in eval_texts:
        ev |= ngrams(t, n)
    hit_docs, shared = 0, 0
    docs = 0
    for t in train_texts:
        docs += 1
        g = ngrams(t, n) & ev
        hit_docs += bool(g)
        shared += len(g)
    return {"train_docs": docs, "eval_ngrams": len(ev), "docs_with_overlap": hit_docs,
            "shared_ngrams": shared, "share": hit_docs / max(1, docs)}

