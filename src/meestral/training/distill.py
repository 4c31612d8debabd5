"""Distil a student causal LM from a teacher: how the embedded Mamba-2 (`mamba2-smol`) is made.

Two processes share one GPU (the recipe, recipes/mamba2-smol/, starts both):

* `teacher_text.sample_teacher` makes text: the teacher answers prompts drawn from
  `distill_prompts` (topics x templates) and writes shards of token ids into a folder.
* `distill` trains the student on rows packed from those shards (`row_pool.RowPool`) plus the
  training split of the embedded Shakespeare corpus (its held-out documents are where perplexity
  is measured). The teacher runs on the same rows and the loss is the full-vocabulary
  KL(teacher || student) plus a small cross-entropy on the tokens themselves (`kd.chunked_kd_loss`).
  Shards are picked up as they appear; the run logs how often, on average, each token has been
  seen (`epochs`).

The student is an HF `Mamba2ForCausalLM` with the teacher's tokenizer, vocabulary and special
tokens, random or continued from existing weights (`init`: the embedded `mamba2-smol`, a GGUF file
of ours or an HF folder; their shape, a fresh optimiser, the CONTINUED learning-rate defaults); it
trains through the chunked scan of `backbones/ssd.py` (equal to HF's forward). Training
checkpoints atomically every `ckpt_every` steps and `resume` continues from the last one, its
`log.jsonl` cut back to that step (`run_log.RunLog`); the end product is an HF folder and a Q8_0
GGUF file (`meestral.backbones.quantized`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from meestral.backbones.ssm import use_grouped_gated_norm
from meestral.errors import MeestralError
from meestral.files import FolderLock, append_line, atomic_folder, write_json
from meestral.training.checkpoint import CHECKPOINT, check_kind, check_out, prepare_out, read_checkpoint, save_checkpoint
from meestral.training.interrupt import StopRequests
from meestral.training.kd import chunked_kd_loss, heldout_ppl, teacher_targets
from meestral.training.optim import warmup_stable_decay
from meestral.training.row_pool import RowPool
from meestral.training.teacher_cache import TeacherCache
from meestral.training.run_log import LOG, RunLog, dumps
from meestral.training.teacher_text import load_teacher

# The shipped student: 24 Mamba-2 blocks, as wide as fits under 48 MiB in Q8_0 with headroom
# (43 MiB). State size and head size follow Codestral Mamba (128, 64); one group.
STUDENT_SHAPE = dict(hidden_size=384, num_hidden_layers=24, state_size=128, expand=2, head_dim=64,
                     n_groups=1, conv_kernel=4, chunk_size=128)


def student_config(teacher_config, **shape):
    """A Mamba-2 config speaking the teacher's vocabulary and special tokens."""
    from transformers import Mamba2Config

    s = {**STUDENT_SHAPE, **shape}
    s["num_heads"] = s["expand"] * s["hidden_size"] // s["head_dim"]
    return Mamba2Config(vocab_size=teacher_config.vocab_size, tie_word_embeddings=True, residual_in_fp32=True,
                        bos_token_id=teacher_config.bos_token_id, eos_token_id=teacher_config.eos_token_id,
                        pad_token_id=teacher_config.pad_token_id, **s)


# ---- data ----------------------------------------------------------------------------------------
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
    # 0: KL over the whole vocabulary. k > 0: over the teacher's k most likely tokens and the rest
    # as one outcome (`kd.topk_kd_loss`): the teacher's full logits never exist beyond one chunk.
    kd_topk: int = 0
    # With kd_topk: GiB of device memory for the teacher's top-k of rows already seen
    # (`teacher_cache.TeacherCache`): a row drawn again skips the teacher's forward. 0: off.
    teacher_cache_gb: float = 0.0
    clip: float = 1.0
    min_rows: int = 256  # wait for this many sampled rows before training on them,
    wait_seconds: float = 120  # but no longer than this
    log_every: int = 10
    eval_every: int = 250
    ckpt_every: int = 200
    heldout_tokens: int = 65536
    compile: bool = False  # torch.compile the student's forward and the loss after its LM head
    resume: bool = True
    seed: int = 0
    device: str | None = None  # None: cuda when a GPU is visible, else cpu (as every command's --device)


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
                   warmup=cfg.warmup if cfg.warmup is not None else base["warmup"], device=auto_device(cfg.device))


def auto_device(device: str | None) -> str:
    """`device`, or (None, "auto") cuda when a GPU is visible and cpu otherwise."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_shape(shape: dict) -> None:
    """--shape overrides: keys of the student's shape (STUDENT_SHAPE), whole numbers >= 1, and a
    width that splits into heads."""
    for k, v in shape.items():
        if k not in STUDENT_SHAPE:
            raise MeestralError(f"--shape {k}={v}: {k} is not a shape key; use {', '.join(STUDENT_SHAPE)}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MeestralError(f"--shape {k}={v}: it must be a whole number >= 1")
    s = {**STUDENT_SHAPE, **shape}
    if s["expand"] * s["hidden_size"] % s["head_dim"]:
        raise MeestralError(f"--shape: expand x hidden_size ({s['expand']} x {s['hidden_size']}) is not a multiple of "
                            f"head_dim {s['head_dim']}: change one of them")


def check_config(cfg: DistillConfig) -> None:
    """Every rule that needs no model, before anything is loaded or written."""
    from meestral.validation import check_device, check_fields

    check_fields(cfg)
    check_shape(cfg.shape)
    check_device(cfg.device)
    if cfg.teacher_cache_gb and not cfg.kd_topk:
        raise MeestralError("--teacher-cache-gb keeps the teacher's top-k of each row: give --kd-topk K too "
                            "(e.g. --kd-topk 32), or drop --teacher-cache-gb")
    if cfg.init and cfg.init != "mamba2-smol":
        path = Path(cfg.init).expanduser()
        if not (path.is_file() or (path / "config.json").is_file()):
            raise MeestralError(f"--init {cfg.init}: not 'mamba2-smol', a GGUF file or an HF folder with config.json")


def wait_for_data(cfg: DistillConfig) -> None:
    """A --data folder that does not exist yet is waited for (its sampler, started at the same
    time, creates it), saying so; if it never appears the run is refused before anything is written."""
    if not cfg.data or Path(cfg.data).is_dir():
        return
    print(f"meestral: --data {cfg.data} does not exist yet: waiting up to {cfg.wait_seconds:g} s for "
          "`meestral distill sample` to create it", file=sys.stderr)
    t0 = time.time()
    while not Path(cfg.data).is_dir():
        if time.time() - t0 >= cfg.wait_seconds:
            raise MeestralError(f"--data {cfg.data} does not exist: give the --out folder of `meestral distill sample` "
                                "(start the sampler first), or leave --data out to train on the corpus alone")
        time.sleep(min(1.0, cfg.wait_seconds))


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


RETIME = 100  # steps between re-fixings of a `seconds` run's step count


def refixed_total(step: int, s_per_step: float, s_left: float, warmup: int, decay_share: float) -> int:
    """The step count that ends a `seconds` run at its deadline from `step` at the current speed,
    but never so small that the decay would already have begun (the schedule stays continuous:
    a run late for its deadline finishes its decay a little late rather than jumping in lr)."""
    fits = step + int(max(0.0, s_left) / max(s_per_step, 1e-9))
    return max(warmup + 1, math.floor(step / (1 - decay_share)) + 1 if decay_share < 1 else step + 1, fits)


def _student(cfg: DistillConfig, teacher_config):
    """(float32 student, its Mamba-2 config): `cfg.init`'s weights, or a random one of `cfg.shape`."""
    from transformers import Mamba2ForCausalLM

    if cfg.init:
        student = init_student(cfg.init, teacher_config, cfg.shape)
        return student, student.config
    scfg = student_config(teacher_config, **cfg.shape)
    return Mamba2ForCausalLM(scfg), scfg


def _adamw(student, cfg: DistillConfig, dev: torch.device):
    """AdamW with weight decay on the matrices only (not on the vectors: norms, biases, the SSM's
    A_log, D and dt_bias)."""
    decay = [p for n, p in student.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             fused=dev.type == "cuda")


class _Deadline:
    """The step count of a `seconds` run: fixed after 20 steps, then fixed again every RETIME steps
    until the decay starts, from the speed of the last RETIME steps and the time left. The trainer
    shares its GPU with a sampler and other trainers that start and stop, and a count fixed once
    would end the decay far from the deadline (or be stopped before it)."""

    clock = staticmethod(time.time)  # every reading goes through here (a test gives a step-driven clock)

    def __init__(self, cfg: DistillConfig, dev: torch.device):
        self.cfg, self.dev = cfg, dev
        self.start = self.clock()
        self.at, self.t_mark, self.s_mark = None, None, 0

    def _now(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return self.clock()

    def total(self, step: int, total: int | None, record) -> int | None:
        """The step count after `step` (the one given, or one newly fixed and recorded)."""
        cfg = self.cfg
        if total is None and step == 20 and cfg.seconds:
            now = self._now()
            per_step = (now - self.start) / 20
            total = max(cfg.warmup + 1, int(cfg.seconds / per_step))
            self.at, self.t_mark, self.s_mark = self.start + cfg.seconds, now, step
            record({"step": step, "fixed_total_steps": total, "s_per_step": round(per_step, 4)})
        elif self.at is not None and step % RETIME == 0 and step < int(total * (1 - cfg.decay_share)):
            now = self._now()
            per_step, self.t_mark, self.s_mark = (now - self.t_mark) / (step - self.s_mark), now, step
            total = refixed_total(step, per_step, self.at - now, cfg.warmup, cfg.decay_share)
            record({"step": step, "refixed_total_steps": total, "s_per_step": round(per_step, 4),
                    "s_left": round(self.at - now)})
        return total


def distill(cfg: DistillConfig, log=print) -> dict:
    """Train the student; returns the last log record. Writes into cfg.out: checkpoint.pt,
    log.jsonl, config.json, student/ (HF folder) and mamba2-smol.gguf (Q8_0) at the end."""
    if cfg.steps is not None and cfg.warmup is not None and cfg.warmup > cfg.steps:  # a warm-up asked for
        raise MeestralError(f"--warmup {cfg.warmup} is longer than the run ({cfg.steps} steps): the learning rate would "
                            "never reach its peak; lower --warmup")
    cfg = resolved(cfg)
    check_config(cfg)
    out = Path(cfg.out).expanduser()
    check_out(out, "distill")
    wait_for_data(cfg)
    with ExitStack() as stack, StopRequests() as stop:
        try:
            return _distill(cfg, out, stack, stop, log)
        except KeyboardInterrupt:
            raise KeyboardInterrupt("distillation interrupted: rerun the same command to continue from its last "
                                    "checkpoint (resuming is the default)") from None


def final_hidden(model, ids):
    """The student's final-normed hidden states through the chunked scan (what the loss's LM head reads)."""
    from meestral.backbones.ssd import forward_collect

    return forward_collect(model, ids)[2]


def _distill(cfg: DistillConfig, out: Path, stack: ExitStack, stop: StopRequests, log) -> dict:
    from meestral.backbones.tokenizer import HFTokenizer
    from meestral.data import heldout_rows

    dev = torch.device(cfg.device)
    teacher, tok = load_teacher(cfg.teacher, cfg.device)
    torch.manual_seed(cfg.seed)
    student, scfg = _student(cfg, teacher.config)
    student.to(dev)
    stack.callback(prepare_out(out, "distill").release)  # every check passed: the folder is this run's now
    use_grouped_gated_norm(student)  # Mamba-2's per-group norm on every transformers release
    n_params = sum(p.numel() for p in student.parameters())
    opt = _adamw(student, cfg, dev)
    corpus = corpus_rows(tok, cfg.seq_len, cfg.corpus) if cfg.corpus else None
    held = heldout_rows(cfg.corpus or "embedded", HFTokenizer(tok), cfg.heldout_tokens, cfg.seq_len)
    pool = RowPool(cfg.data, corpus, cfg.seq_len, tok.eos_token_id, cfg.corpus_share, cfg.seed)
    step, total, tokens_seen, elapsed = 0, cfg.steps, 0, 0.0
    # Resuming is the default, with no check that the run is the same: a run that ran out of
    # memory is continued at a smaller batch (recipes/gpu-session/run.sh).
    state = read_checkpoint(out / CHECKPOINT) if cfg.resume and (out / CHECKPOINT).exists() else None
    if state is not None:
        check_kind(state, "distill", out / CHECKPOINT)
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

    fwd = torch.compile(final_hidden) if cfg.compile else final_hidden
    run_log = RunLog(out, step if state is not None else None)

    def record(obj):
        run_log.write(obj)
        log(dumps(obj))

    def save():
        save_checkpoint(out, {"student": student.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                              "tokens": tokens_seen, "elapsed": elapsed, "pool_rng": pool.gen.get_state()})

    def evaluate(**extra):
        student.eval()
        record({"step": step, **extra, "heldout_ppl": round(heldout_ppl(student, held), 3),
                "teacher_heldout_ppl": round(teacher_ppl, 3)})
        student.train()

    if cfg.init and step == 0:  # where the continued run starts from: the first point of its curve
        evaluate(init=cfg.init)
    pool.refresh()
    waited = 0
    if len(pool.rows) < cfg.min_rows and cfg.data:
        print(f"meestral: waiting up to {cfg.wait_seconds:g} s for {cfg.min_rows} rows of teacher shards in {cfg.data} "
              "(the corpus alone feeds training if none come)", file=sys.stderr)
    while len(pool.rows) < cfg.min_rows and cfg.data and waited < cfg.wait_seconds:
        time.sleep(5)  # the sampler's first shards; the corpus alone feeds training if none come
        waited += 5
        if pool.refresh() == 0 and (Path(cfg.data) / "STOP").exists():
            break
    deadline = _Deadline(cfg, dev)
    t_win, tok_win = time.time(), 0

    # not in the checkpoint: a resumed run fills it again as rows come back
    cache = (TeacherCache(min(cfg.kd_topk, teacher.config.vocab_size), cfg.seq_len - 1, cfg.teacher_cache_gb * 2**30, dev)
             if cfg.teacher_cache_gb else None)
    while total is None or step < total:
        stop.check()
        if step % 20 == 0:
            pool.refresh()
        x, ids = pool.batch_with_ids(cfg.batch)
        x = x.to(dev, non_blocking=True)
        lr = warmup_stable_decay(step, total or 10**9, cfg.lr, cfg.min_lr, cfg.warmup, cfg.decay_share)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            with torch.no_grad():
                if cache is not None:
                    t_logits = cache.get(x, ids, lambda rows: teacher_targets(teacher, rows, cfg.kd_topk,
                                                                              compiled=cfg.compile))
                else:
                    t_logits = teacher_targets(teacher, x, cfg.kd_topk, compiled=cfg.compile)
            hidden = fwd(student, x)[:, :-1]
            loss, kl, ce = chunked_kd_loss(student.lm_head, hidden, t_logits, x[:, 1:], cfg.ce_weight,
                                           compiled=cfg.compile)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        tok_win += x.numel()
        total = deadline.total(step, total, record)
        if step % cfg.log_every == 0 or step == total:
            dt = time.time() - t_win
            elapsed += dt
            pool_tokens = pool.rows.numel() + (0 if corpus is None else corpus.numel())
            record({"step": step, "loss": round(loss.item(), 4), "kl": round(kl.item(), 4), "ce": round(ce.item(), 4),
                    "lr": lr, "grad_norm": round(float(gnorm), 3), "tokens": tokens_seen,
                    "tok_per_s": round(tok_win / dt), "pool_rows": len(pool.rows),
                    "epochs": round(tokens_seen / max(1, pool_tokens), 2), "elapsed_s": round(elapsed),
                    **({} if cache is None else {"teacher_cached_rows": len(cache.slot),
                                                 "teacher_hit_rate": round(cache.hits / max(1, cache.hits + cache.misses), 3)})})
            t_win, tok_win = time.time(), 0
        if step % cfg.eval_every == 0 or step == total:
            evaluate()
        if step % cfg.ckpt_every == 0:
            save()
    save()
    stop.check()  # Ctrl-C during the last step: stop here (a rerun exports from the checkpoint just saved)
    # The export measures the student for minutes on a CPU: Ctrl-C stops it at once (the checkpoint is whole).
    stop.__exit__()
    return finish(student, tok, out, held, teacher_ppl, record)


def export(cfg: DistillConfig, log=print) -> dict:
    """`finish` from the run's last checkpoint: for a run stopped before its last step. The
    student's shape, the teacher and the held-out rows are the run's (its config.json)."""
    out = Path(cfg.out).expanduser()
    if not (out / CHECKPOINT).exists():
        raise MeestralError(f"{out} has no {CHECKPOINT}: give the --out folder of a distill train run")
    state = read_checkpoint(out / CHECKPOINT)  # before the teacher is loaded: a train or adapt run is refused at once
    check_kind(state, "distill", out / CHECKPOINT)
    lock = FolderLock(out, "meestral distill export")  # it writes into the run's folder: not while the run does
    try:
        return _export(cfg, out, state, log)
    finally:
        lock.release()


def _export(cfg: DistillConfig, out: Path, state: dict, log) -> dict:
    from transformers import Mamba2ForCausalLM

    from meestral.data import heldout_rows
    from meestral.backbones.tokenizer import HFTokenizer

    cfg = replace(cfg, device=auto_device(cfg.device))
    saved = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    if "distill" in saved:  # measured as the run measured: its teacher and held-out rows
        run = saved["distill"]
        cfg = replace(cfg, **{k: run[k] for k in ("teacher", "corpus", "seq_len", "heldout_tokens") if k in run})
    teacher, tok = load_teacher(cfg.teacher, cfg.device)
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

    def record(obj):  # after the run's records: nothing is redone, so nothing is cut
        append_line(out / LOG, dumps(obj))
        log(dumps(obj))

    record({"export_from_step": state["step"], "of_total": state["total"]})
    return finish(student, tok, out, held, heldout_ppl(teacher, held), record)


def finish(student, tok, out: Path, held, teacher_ppl: float, record) -> dict:
    """Save the HF folder and the Q8_0 file; measure what quantisation costs on held-out text."""
    from meestral.backbones.quantized import model_from_gguf, save_gguf

    student.eval()

    def write(tmp):
        student.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))

    # Written beside student/ and swapped in whole: a kill part way leaves the previous student/
    # (an earlier run's or export's, which a later `--init` may read) or none, never half of one.
    atomic_folder(out / "student", write)
    q = save_gguf(student.float(), out / "mamba2-smol.gguf")
    qmodel = model_from_gguf(out / "mamba2-smol.gguf").to(next(student.parameters()).device)
    res = {"final": True, "heldout_ppl_float": round(heldout_ppl(student.float(), held), 3),
           "heldout_ppl_q8_0": round(heldout_ppl(qmodel, held), 3), "teacher_heldout_ppl": round(teacher_ppl, 3),
           "gguf_bytes": q["bytes"]}
    record(res)
    return res
