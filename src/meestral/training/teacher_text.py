"""The text a teacher writes for distillation: sampled from varied prompts (`distill_prompts`)
into shards of token ids, which `row_pool.RowPool` packs into training rows while the sampler goes
on; and the check of that text against evaluation sets (shared n-grams).

The teacher answers by sampling (temperature 1 over the 200 most likely tokens, so the text
follows the teacher's own distribution without its long tail); shards are written atomically, so
a trainer reading the folder never sees half of one. Ctrl-C stops the sampler within one token
step (`interrupt.StopRequests`): the shard being sampled is dropped, the written ones are kept, and
the same command continues the numbering (shard k is sampled from seed (seed, k) whenever it is
made, so a stopped and continued folder holds the shards an uninterrupted run would).
"""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import torch

from meestral.errors import MeestralError
from meestral.files import atomic_write
from meestral.training.interrupt import StopRequests


def load_teacher(spec: str, device: str, dtype=torch.bfloat16):
    """(HF model, HF tokenizer) of the teacher: 'smollm2' (embedded) or an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        from meestral.backbones.assets import smollm2_dir

        spec = str(smollm2_dir())
    from transformers.utils import logging as hf_logging

    if not Path(spec).is_dir():
        raise MeestralError(f"teacher {spec!r} is not a folder: give 'smollm2' or an HF model folder")
    tok = AutoTokenizer.from_pretrained(spec)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local load takes seconds: no bar before the command's own lines
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, attn_implementation="sdpa").to(device)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.eval().requires_grad_(False)
    # grouped K/V heads: decode steps attend without repeating them (teacher_attention.py)
    from meestral.training import teacher_attention

    teacher_attention.use(model)
    return model, tok


# ---- sampling ------------------------------------------------------------------------------------
def _prompt_ids(tok, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tok(text, add_special_tokens=False)["input_ids"]


def _static_cache_fits(model) -> bool:
    """Whether the teacher takes a fixed-size K/V cache: an attention model HF can compile whole
    (Llama, Mistral, Qwen...; not a state-space model, whose cache is its state)."""
    return hasattr(model.config, "num_attention_heads") and bool(getattr(model, "_can_compile_fullgraph", False))


@torch.inference_mode()
def sample_batch(model, inp, att, max_new_tokens: int, temperature: float, top_k: int, eos_ids, pad: int,
                 stop=None, static_cache: bool | None = None):
    """Sampled continuations [B, max_new_tokens] of left-padded prompts (pad after a row's EOS);
    `stop` (a StopRequests) is checked before every token step: a batch takes minutes on a CPU.

    A plain cached loop rather than `generate`: HF's top-p sort and `multinomial` over a 49k
    vocabulary at batch 2048 made `generate` run at 27k tokens/s on an H200. Here each step takes
    the top-k logits and samples them with the Gumbel-max trick; one host read every 32 steps
    checks whether every row has finished.

    The K/V cache is HF's StaticCache where the teacher takes one (`static_cache` None: where
    `_static_cache_fits`): allocated once for prompt + max_new_tokens and written in place, where
    the DynamicCache concatenates every layer's whole cache at every step (at batch 8192 on an H200
    the sampler ran at ~24k tokens/s with it: 273 ms a step). The same tokens either way (tests)."""
    import inspect

    from transformers import DynamicCache, StaticCache

    # HF renamed the cache keyword (past_key_values -> cache) during 5.x and warns on the old one.
    kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    static = _static_cache_fits(model) if static_cache is None else static_cache
    P = inp.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens) if static else DynamicCache()

    def at(lo, n):
        """The slots a call writes, for the static cache (the dynamic one appends)."""
        return {"cache_position": torch.arange(lo, lo + n, device=inp.device)} if static else {}

    # the padding mask of every position the loop will reach; step t sees its first P + t + 1 columns
    att = torch.cat([att, att.new_ones(att.shape[0], max_new_tokens)], dim=1)
    pos = (att[:, :P].cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=inp, attention_mask=att[:, :P], position_ids=pos, **{kw: cache}, **at(0, P),
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    eos = torch.tensor(eos_ids, device=inp.device)
    done = torch.zeros(inp.shape[0], dtype=torch.bool, device=inp.device)
    out = torch.full((inp.shape[0], max_new_tokens), pad, dtype=torch.long, device=inp.device)
    pos = pos[:, -1:]
    top_k = min(top_k, logits.shape[-1])  # more than the vocabulary: every token (as generate's --top-k)
    for t in range(max_new_tokens):
        val, idx = logits.float().topk(top_k, dim=-1)
        gumbel = -torch.log(-torch.log(torch.rand_like(val).clamp_(1e-20, 1.0)))
        tok = idx.gather(-1, (val / temperature + gumbel).argmax(-1, keepdim=True))[:, 0]
        tok = torch.where(done, pad, tok)
        out[:, t] = tok
        done |= torch.isin(tok, eos)
        if t == max_new_tokens - 1 or (t % 32 == 31 and bool(done.all())):
            break  # the last token needs no forward after it
        if stop is not None:
            stop.check()
        pos = pos + 1  # finished rows run on (padding): they are sliced off later
        logits = model(input_ids=tok[:, None], attention_mask=att[:, :P + t + 1], position_ids=pos, **{kw: cache},
                       **at(P + t, 1), use_cache=True).logits[:, -1]
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
    from meestral.training.checkpoint import check_out, prepare_out

    if top_k < 1:
        raise MeestralError(f"--top-k is {top_k}: sampling needs at least the most likely token (1 or more)")
    out = Path(out_dir).expanduser()
    check_out(out, "sample")
    model, tok = load_teacher(teacher, device)
    check_room(model, max_new_tokens)
    lock = prepare_out(out, "sample")  # every check passed: the folder is created and held now
    before = _count(out, seed)
    try:
        with StopRequests() as stop:  # Ctrl-C stops between two token steps (training.interrupt)
            return _sample(model, tok, out, batch, max_new_tokens, temperature, top_k, seed, shards, seconds, device,
                           log, stop)
    except KeyboardInterrupt:
        k = _count(out, seed)  # read from the folder: a second Ctrl-C may land inside a shard's rename
        n = k - before
        raise KeyboardInterrupt(f"sampling interrupted: {n} shard{'s' * (n != 1)} written by this run ({k} of seed {seed} "
                                f"in {out}; a shard not finished is not kept): rerun the same command to add more, "
                                f"from shard-{seed:03d}-{k:05d}.pt on") from None
    finally:
        lock.release()


def _count(out: Path, seed: int) -> int:
    """Shards of `seed` in `out`: the next one's number."""
    return len(list(out.glob(f"shard-{seed:03d}-*.pt")))


# Positions kept for a prompt (distill_prompts' are a few dozen tokens, chat template included).
PROMPT_ROOM = 128


def check_room(model, max_new_tokens: int) -> None:
    """A prompt and `max_new_tokens` fit in the teacher's context (it is never truncated)."""
    n = getattr(model.config, "max_position_embeddings", None)
    if n and PROMPT_ROOM + max_new_tokens > n:
        raise MeestralError(f"--max-new-tokens {max_new_tokens:,} and a prompt of up to {PROMPT_ROOM} tokens need "
                            f"{PROMPT_ROOM + max_new_tokens:,} positions, but the teacher has a context of {n:,}: "
                            f"lower --max-new-tokens to {n - PROMPT_ROOM:,} or less")


def _sample(model, tok, out: Path, batch, max_new_tokens, temperature, top_k, seed, shards, seconds, device, log,
            stop) -> int:
    from meestral.training.distill_prompts import sample_prompt

    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    # A plain continuation may end with the document separator instead of the chat end token.
    eos_ids |= {tok.get_vocab()[s] for s in ("<|endoftext|>", "</s>") if s in tok.get_vocab()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else sorted(eos_ids)[0]
    k = _count(out, seed)
    t0, written = time.time(), 0
    while (shards is None or written < shards) and (seconds is None or time.time() - t0 < seconds):
        stop.check()
        if (out / "STOP").exists():
            break
        rng = random.Random(f"{seed}:{k}")
        torch.manual_seed(hash((seed, k)) % 2**31)
        prompts = [sample_prompt(rng) for _ in range(batch)]
        ids = [_prompt_ids(tok, p, chat) for p, chat in prompts]
        width = max(map(len, ids))
        if width > PROMPT_ROOM:  # distill_prompts' prompts are far shorter: a template grew past the room kept
            raise MeestralError(f"a prompt of {width} tokens exceeds the {PROMPT_ROOM} kept for prompts: shorten it")
        inp = torch.full((batch, width), pad, dtype=torch.long)
        att = torch.zeros((batch, width), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding: every row's continuation starts at `width`
            inp[r, width - len(x):] = torch.tensor(x)
            att[r, width - len(x):] = 1
        ts = time.time()
        gen = sample_batch(model, inp.to(device), att.to(device), max_new_tokens, temperature, top_k, sorted(eos_ids), pad,
                           stop)
        gen = gen.cpu()
        docs, n_tok = [], 0
        for r, x in enumerate(ids):
            cont = gen[r].tolist()
            cut = next((j + 1 for j, t in enumerate(cont) if t in eos_ids), len(cont))
            doc = torch.tensor(x + cont[:cut], dtype=torch.int32)
            docs.append(doc)
            n_tok += len(doc)
        path = out / f"shard-{seed:03d}-{k:05d}.pt"
        buf = io.BytesIO()  # serialised first: a full disk then fails as an OSError of a plain write, in one line
        torch.save({"docs": docs, "prompts": prompts}, buf)
        atomic_write(path, lambda t: t.write_bytes(buf.getbuffer()))
        dt = time.time() - ts
        log(json.dumps({"shard": path.name, "docs": len(docs), "tokens": n_tok, "seconds": round(dt, 1),
                        "tok_per_s": round(n_tok / dt)}))
        k += 1
        written += 1
    return written


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
