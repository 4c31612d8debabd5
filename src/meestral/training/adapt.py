"""Early-exit adaptation: continue training a backbone (through LoRA adapters) so that its
intermediate layers, read through the shared final norm + LM head, predict what its last layer
does. That is what makes a lossless exit (`verify`) pay: on the frozen SmolLM2 the oracle needs
26.4 of 30 layers (README.md).

    from meestral.training.adapt import AdaptConfig, adapt
    adapt(AdaptConfig(backbone="smollm2", out="runs/ee", steps=2000, samples="/tmp/d/data"))
    # -> runs/ee/adapter.safetensors, log.jsonl (oracle bound + per-layer agreement over steps)

The loss of one batch (LayerSkip's early-exit loss, with a distillation target)
  * The original model (the same weights with the adapters off, `LoRA.disabled`) gives the final
    logits p_T once, under no_grad.
  * Full depth: final_weight x KL(p_T || adapted final) — the term that keeps the full model as good
    as the original.
  * Each exit point l the curriculum switches on at this step: KL(p_T || LMhead(norm(h_l))), with
    its per-layer weight, averaged over the active exits. Both terms add ce_weight x the
    cross-entropy on the next tokens themselves (0 by default: the target is the original model),
    or with ce_target "teacher" on the original model's own top-1 (what the strict oracle checks).
  * Layer dropout (optional): block i is skipped for a row with probability
    layer_dropout x i/(L-1) (none at the first layer, the most at the last), as LayerSkip does, so
    later blocks learn to refine rather than rewrite.
Curricula: `all` (every exit every step), `rotate` (exits j with j % rotation == step %
rotation: 1/rotation of the LM-head work), `gradual` (exits join from the deepest to the shallowest
over the first curriculum_share of the run). Both the curriculum and the dropout masks are pure
functions of the step and seed, so a resumed run draws exactly what an uninterrupted one would.

Data: the distillation's sources (`row_pool.RowPool`): teacher-sampled shards (`meestral distill
sample`), mixed with the training split of a text corpus (the embedded Shakespeare); the corpus's
held-out split (`data.is_validation`) is where agreement, the oracle bound and perplexity are
measured, never trained on (at the run's exit points: every layer but the last by default).
Evaluation sets are never read.

The loss is distillation's (`kd.chunked_kd_loss`); the run's machinery is the trainers' shared
core: the optimiser (`optim.make_optimizer`, as head training's), the JSONL log cut back to the
checkpoint on resume (`run_log.RunLog`), atomic checkpoints (`checkpoint`). One process; the LoRA
weights are the only trained parameters. `seconds` stops a call early with a checkpoint (device
calls are 10 minutes); `resume=True` continues it and equals an uninterrupted run.
`init_adapter` starts a new run from an adapter file (e.g. the shipped `smollm2-ee`) instead of
B = 0, at its rank or a higher one (`LoRA.start_from`): a second run builds on the first one's
tokens with another schedule or loss, its curve starting where the file left off.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from meestral.errors import MeestralError
from meestral.files import FolderLock
from meestral.training.checkpoint import (CHECKPOINT, check_kind, check_same_run, prepare_out, previous_checkpoint,
                                          read_checkpoint, save_checkpoint)
from meestral.training.interrupt import StopRequests
from meestral.training.kd import chunked_kd_loss, heldout_ppl
from meestral.training.optim import averaged, check_optimizer, current_lr, make_optimizer, use_averaged
from meestral.training.row_pool import RowPool
from meestral.training.run_log import RunLog, num

ADAPTER = "adapter.safetensors"
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CURRICULA = ("all", "rotate", "gradual")
CE_TARGETS = ("data", "teacher")
RUN_DEFINING = ("backbone", "exits", "rank", "alpha", "samples", "corpus", "corpus_share", "seq_len", "batch",
                "steps", "lr", "optimizer", "warmup", "weight_decay", "clip", "final_weight", "exit_weights",
                "ce_weight", "curriculum", "rotation", "curriculum_share", "layer_dropout", "seed", "dtype")


@dataclass
class AdaptConfig:
    backbone: str = "smollm2"
    out: str = "runs/adapt"
    exits: list[int] | None = None  # None: every layer but the last
    rank: int = 8
    alpha: float | None = None  # None: 2 x rank
    samples: str | None = None  # folder of teacher shards (meestral distill sample)
    corpus: str = "embedded"  # text source: training split mixed in, held-out split measured on
    corpus_share: float = 0.5  # share of corpus rows in a batch when samples are given
    seq_len: int = 256
    batch: int = 8
    steps: int = 200
    seconds: float | None = None  # stop this call after so long (checkpointed; resume continues)
    lr: float = 1e-3
    optimizer: str = "adamw"  # or "schedulefree"
    warmup: int | None = None  # None: 5% of the run
    weight_decay: float = 0.0
    clip: float = 1.0
    final_weight: float = 1.0
    exit_weights: list[float] | None = None  # one per exit point; None: all 1
    ce_weight: float = 0.0
    ce_target: str = "data"  # the cross-entropy's labels: the next tokens, or the original's top-1 ("teacher")
    curriculum: str = "rotate"
    rotation: int = 4
    curriculum_share: float = 0.5
    layer_dropout: float = 0.0
    val_every: int = 50
    val_tokens: int = 4096
    ckpt_every: int = 50
    log_every: int = 10
    resume: bool = False
    seed: int = 0
    init_adapter: str | None = None  # continue from this adapter file (same base; rank <= rank)
    device: str = "cpu"
    dtype: str | None = None
    export_dtype: str = "float32"  # of the adapter file (bfloat16 halves it: rank 16 on SmolLM2 fits then)
    progress: bool = True

    def check(self) -> None:
        """The CLI's rules, for Python callers too; then what no single rule can see."""
        from meestral.validation import check_fields

        from meestral.training.head_training import check_warmup

        check_fields(self)
        if self.exits:
            twice = sorted({e for e in self.exits if self.exits.count(e) > 1})
            if twice:
                raise MeestralError(f"--exits lists {', '.join(map(str, twice))} twice: give each exit point once")
        if self.exit_weights and len(self.exit_weights) != len(self.exits or self.exit_weights):
            raise MeestralError(f"{len(self.exit_weights)} exit weights for {len(self.exits)} exit points: "
                                "give one per exit point")
        if self.final_weight == 0 and self.exit_weights and not any(self.exit_weights):
            raise MeestralError("every loss weight is 0 (--final-weight 0, --exit-weights all 0): the loss would be 0 "
                                "and nothing would train; give at least one weight > 0")
        check_warmup(self.warmup, self.steps)
        if self.corpus == "none":
            raise MeestralError("--corpus none: adaptation measures agreement and perplexity on the held-out split of "
                                "--corpus, so it needs one (e.g. embedded)")
        if self.samples is not None:
            folder = Path(self.samples).expanduser()
            if not folder.is_dir():
                raise MeestralError(f"--samples {self.samples} is not a folder: give the --out of `meestral distill sample`")
            if not any(folder.glob("shard-*.pt")):
                raise MeestralError(f"--samples {self.samples} holds no shard-*.pt: give the --out of `meestral distill "
                                    "sample` once it has written a shard, or leave --samples out")
        if self.ce_target not in CE_TARGETS:
            raise MeestralError(f"unknown --ce-target {self.ce_target!r}: use {' or '.join(CE_TARGETS)}")
        if self.ce_target != "data" and self.ce_weight == 0:
            raise MeestralError(f"--ce-target {self.ce_target} sets the labels of a cross-entropy weighted 0: "
                                "give --ce-weight > 0 too")
        if self.curriculum not in CURRICULA:
            raise MeestralError(f"unknown curriculum {self.curriculum!r}: use one of {', '.join(CURRICULA)}")
        adapter_dtype(self.export_dtype)
        check_optimizer(self.optimizer)


def adapter_dtype(name: str) -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise MeestralError(f"unknown export dtype {name!r}: use {' or '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


# ---- the schedule of a step ------------------------------------------------------------------------
def active_exits(curriculum: str, n: int, step: int, total: int, rotation: int = 4, share: float = 0.5) -> list[bool]:
    """Which of n exit points (in depth order) the early-exit loss covers at `step`."""
    if curriculum == "all" or n == 0:
        return [True] * n
    if curriculum == "rotate":
        r = min(rotation, n)
        return [j % r == step % r for j in range(n)]
    if curriculum == "gradual":  # the deepest exit from step 0, the shallowest from share x total
        last = share * total
        return [step >= (last * (n - 1 - j) / (n - 1) if n > 1 else 0) for j in range(n)]
    raise MeestralError(f"unknown curriculum {curriculum!r}: use one of {', '.join(CURRICULA)}")


def dropout_mask(num_layers: int, rows: int, rate: float, seed: int, step: int) -> torch.Tensor | None:
    """[L, rows] bool, True where block i is skipped for that row: probability rate x i/(L-1).
    Drawn from a generator seeded by (seed, step), so a resumed run skips the same blocks."""
    if rate <= 0:
        return None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    p = rate * torch.arange(num_layers, dtype=torch.float64)[:, None] / max(1, num_layers - 1)
    return torch.rand(num_layers, rows, generator=gen, dtype=torch.float64) < p


# ---- the loss ----------------------------------------------------------------------------------------
def adapt_loss(bb, lora, ids, exits, active, weights, final_weight=1.0, ce_weight=0.0, skip=None, ce_target="data"):
    """(total loss, {"final": kl, layer: kl, ...}) for one batch `ids` [B, T] (module docstring)."""
    with torch.no_grad(), lora.disabled():
        _, t_final = bb.train_forward(ids)
        teacher = bb.lm_head(t_final[:, :-1])
    # "teacher": the cross-entropy pulls each exit's top-1 toward the original's own top-1, the one
    # thing the strict oracle (and verify) checks, where the KL spreads its pull over the whole
    # distribution: on a near-tie the KL hardly cares which candidate ranks first
    targets = teacher.argmax(-1) if ce_target == "teacher" else ids[:, 1:]
    layers = [l for l, a in zip(exits, active) if a]
    hidden, final = bb.train_forward(ids, layers, skip)
    head = bb.lm_head_module

    def kd_at(h):
        # the head module itself (as bb.lm_head reads it), so that a plain linear head takes the
        # loss's fused gradient (kd.FUSED_GRAD); the final norm stays outside, under autograd
        return chunked_kd_loss(head, h.to(head.weight.dtype), teacher, targets, ce_weight)

    loss, kl, _ = kd_at(final[:, :-1])
    parts = {"final": kl.item()}
    total = final_weight * loss
    if layers:
        w = {l: wt for l, wt in zip(exits, weights)}
        exit_loss = 0.0
        for l in layers:
            le, kl_l, _ = kd_at(bb.final_norm(hidden[l][:, :-1]))
            exit_loss = exit_loss + w[l] * le
            parts[l] = kl_l.item()
        total = total + exit_loss / len(layers)
    return total, parts


# ---- measuring ---------------------------------------------------------------------------------------
def measure(bb, rows: torch.Tensor, layers=None, batch: int = 8) -> dict:
    """Per-layer agreement with the final layer, the oracle exit and its bound (every layer an exit
    point unless `layers` says otherwise) and the perplexity of the final layer, on `rows`."""
    from meestral.evaluation.oracle import oracle_report

    layers = list(range(bb.num_layers - 1)) if layers is None else list(layers)
    rep = oracle_report(bb, rows, layers, seq_len=rows.shape[1], batch=batch, progress=False)
    return {"tokens": rep["tokens"], "agreement": {str(l): a for l, a in rep["agreement"].items()},
            "mean_layers_run": rep["mean_layers_run"], "bound_speedup_layers": rep["bound_speedup_layers"],
            "by_confidence": rep["by_confidence"], "heldout_ppl": heldout_ppl(bb.model, rows, batch=batch)}


# ---- the log -----------------------------------------------------------------------------------------
def _scalars(record: dict):
    """TensorBoard's view of a record: its numbers (per-layer agreement stays in the JSONL log)."""
    for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
            yield f"{record['split']}/{k}", v


def plot_curves(log: RunLog, png: Path):
    """Train loss; the oracle bound and perplexity on held-out text; a few layers' agreement."""
    with log.curves(png, "train loss") as (val, axes):
        steps = [r["step"] for r in val]
        axes[0].plot(steps, [num(r["bound_speedup_layers"]) for r in val], marker="o", label="oracle bound")
        axes[0].set(title="held-out text: oracle bound and perplexity", xlabel="step", ylabel="oracle bound (x, in layers)")
        if val:  # the bar is the pair: a bound bought with perplexity does not count
            ppl = axes[0].twinx()
            ppl.plot(steps, [num(r["heldout_ppl"]) for r in val], marker="s", color="tab:red", label="perplexity")
            ppl.set_ylabel("perplexity (final layer)", color="tab:red")
            keys = list(val[0]["agreement"])
            shown = keys[:: max(1, len(keys) // 6)]
            for k in shown + [k for k in keys[-1:] if k not in shown]:
                axes[1].plot(steps, [num(r["agreement"][k]) for r in val], label=f"L{k}")
            axes[1].legend(fontsize=7)
        axes[1].set(title="top-1 agreement with the final layer", xlabel="step")


# ---- the run -----------------------------------------------------------------------------------------
class Adapter:
    """One adaptation run; `run()` returns the last record (the final validation when complete)."""

    def __init__(self, cfg: AdaptConfig):
        """Every check that can fail runs here, before anything is written to `cfg.out`."""
        from meestral.backbones.loading import load_backbone
        from meestral.backbones.lora import LoRA, check_base, read_adapter, tensors_digest
        from meestral.data import heldout_rows, open_source, training_rows
        from meestral.validation import check_context, check_output

        cfg.check()
        self.cfg = cfg
        self.out = check_output(Path(cfg.out).expanduser(), "--out", folder=True)
        state = previous_checkpoint(self.out, cfg.resume, kind="adapt")  # (and --out free for this run)
        self.bb = bb = load_backbone(cfg.backbone, dtype=cfg.dtype, device=cfg.device)
        L = bb.num_layers
        self.exits = sorted(cfg.exits) if cfg.exits else list(range(L - 1))
        if self.exits[0] < 0 or self.exits[-1] > L - 2:
            raise MeestralError(f"--exits must lie in [0, {L - 2}] for {bb.name} ({L} layers; the last is full depth)")
        self.weights = cfg.exit_weights or [1.0] * len(self.exits)
        if len(self.weights) != len(self.exits):
            raise MeestralError(f"{len(self.weights)} exit weights for {len(self.exits)} exit points: give one per exit point")
        check_context(bb, cfg.seq_len, f"--seq-len {cfg.seq_len}", "lower --seq-len")

        source = open_source(cfg.corpus)
        source.check()
        eos = sorted(bb.tokenizer.eos_ids)[0]
        corpus = training_rows(source, bb.tokenizer, cfg.seq_len)
        self.pool = RowPool(cfg.samples, corpus, cfg.seq_len, eos, cfg.corpus_share, cfg.seed)
        self.pool.refresh()  # once: the run's pool is fixed, so a resume reads the same rows
        if cfg.samples is not None and len(self.pool.rows) == 0:
            raise MeestralError(f"--samples {cfg.samples}: its shards hold no row of --seq-len {cfg.seq_len} tokens: "
                                "lower --seq-len or sample more text")
        if len(corpus) + len(self.pool.rows) == 0:
            raise MeestralError(f"no training text: {cfg.corpus} has no training document of {cfg.seq_len} tokens "
                                "and no --samples were given")
        self.held = heldout_rows(cfg.corpus, bb.tokenizer, cfg.val_tokens, cfg.seq_len)
        self.identity = {k: getattr(cfg, k) for k in RUN_DEFINING}
        self.identity.update(backbone=bb.fingerprint(), exits=self.exits, pool_rows=len(self.pool.rows) + len(corpus))

        self.lora = LoRA(bb, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
        if cfg.init_adapter:
            # A second run on top of a shipped adapter (its 33 M tokens are not repeated): checked
            # against this base, and named by content in the run's identity, so a resume with
            # another starting file is refused. The teacher stays the base (LoRA.disabled).
            meta, tensors = read_adapter(cfg.init_adapter)
            check_base(meta, bb, cfg.init_adapter)
            if state is None:
                self.lora.start_from(meta, tensors, cfg.init_adapter)
            self.identity["init_adapter"] = tensors_digest(tensors)
        if cfg.ce_target != "data":  # (only when set: checkpoints made before the option still resume)
            self.identity["ce_target"] = cfg.ce_target
        check_same_run(state, self.identity, self.out)
        self.opt, self.sched = make_optimizer(self.lora.parameters(), cfg, cfg.steps)
        self.step, self.elapsed = 0, 0.0
        if state is not None:
            self.lora.load_state_dict(state["lora"])
            self.opt.load_state_dict(state["optimizer"])
            if self.sched is not None:
                self.sched.load_state_dict(state["scheduler"])
            self.pool.gen.set_state(state["pool_rng"])
            self.step, self.elapsed = state["step"], state["elapsed"]
        self.lock = prepare_out(self.out, "adapt")
        self.log = RunLog(self.out, self.step if state is not None else None, scalars=_scalars)

    def _save_checkpoint(self):
        # Saved inside the block: state_dict() holds the weights themselves, not copies, and leaving
        # the block turns them back into the training weights (the optimiser's state would still
        # say they are the averaged ones).
        with averaged(self.opt):
            save_checkpoint(self.out, {
                "config": self.identity, "step": self.step, "elapsed": self.elapsed,
                "lora": self.lora.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched else None, "pool_rng": self.pool.gen.get_state(),
                "adapt_config": asdict(self.cfg)})

    def _train_step(self) -> tuple[float, dict]:
        cfg, bb = self.cfg, self.bb
        ids = self.pool.batch(cfg.batch).to(bb.device)
        active = active_exits(cfg.curriculum, len(self.exits), self.step, cfg.steps, cfg.rotation, cfg.curriculum_share)
        skip = dropout_mask(bb.num_layers, ids.shape[0], cfg.layer_dropout, cfg.seed, self.step)
        dev = torch.device(bb.device)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, parts = adapt_loss(bb, self.lora, ids, self.exits, active, self.weights, cfg.final_weight,
                                     cfg.ce_weight, skip, cfg.ce_target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora.parameters(), cfg.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return loss.item(), parts

    def validate(self) -> dict:
        with averaged(self.opt):
            # In the weights' own dtype, without the training step's bf16 autocast: on CUDA the
            # curve's points then are what `adapt compare` (and the CPU) measure on the same rows;
            # bf16 logits flip near-tied top-1s and move the perplexity by about a percent, the
            # size of the effects the bar is about.
            m = measure(self.bb, self.held, self.exits, batch=self.cfg.batch)
        rec = {"split": "val", "step": self.step, **m}
        self.log.write(rec)
        return rec

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        use_averaged(self.opt, False)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
        stop = StopRequests()  # Ctrl-C stops between two steps (training.interrupt)
        try:  # (the step-0 measurement inside: a failure there releases the folder too)
            stop.__enter__()
            last = self.validate() if self.step == 0 else {}  # step 0: the original backbone (B = 0)
            t_call, t_win, win_loss, win_n, win_parts = time.perf_counter(), time.perf_counter(), 0.0, 0, {}
            while self.step < cfg.steps:
                stop.check()
                loss, parts = self._train_step()
                self.step += 1
                bar.update(1)
                win_loss, win_n = win_loss + loss, win_n + 1
                for k, v in parts.items():
                    win_parts.setdefault(str(k), []).append(v)
                end = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or end:
                    dt = time.perf_counter() - t_win
                    self.elapsed += dt
                    last = {"split": "train", "step": self.step, "loss": win_loss / win_n,
                            "kl": {k: sum(v) / len(v) for k, v in win_parts.items()},
                            "tok_per_s": win_n * cfg.batch * cfg.seq_len / dt, "elapsed_s": self.elapsed,
                            "lr": current_lr(self.opt)}
                    self.log.write(last)
                    bar.set_postfix_str(f"loss {last['loss']:.3f} kl_final {last['kl']['final']:.3f}")
                    t_win, win_loss, win_n, win_parts = time.perf_counter(), 0.0, 0, {}
                if self.step % cfg.val_every == 0 or end:
                    last = self.validate()
                    bar.set_postfix_str(f"bound {last['bound_speedup_layers']:.2f}x ppl {last['heldout_ppl']:.2f}")
                    plot_curves(self.log, self.out / "curves.png")
                    t_win = time.perf_counter()
                if self.step % cfg.ckpt_every == 0 or end:
                    self._save_checkpoint()
                if cfg.seconds is not None and time.perf_counter() - t_call > cfg.seconds and not end:
                    if self.step % cfg.val_every:  # a point on the bound-vs-steps curve at each stop
                        self.validate()
                    self._save_checkpoint()
                    print(f"meestral: stopped after {cfg.seconds:g} s at step {self.step} of {cfg.steps}: "
                          "rerun with --resume to continue", file=sys.stderr)
                    return {"split": "stopped", "step": self.step, "steps": cfg.steps}
            stop.check()  # Ctrl-C during the last step: stop before the adapter is written (a rerun writes it)
            if self.step == cfg.steps and not (self.out / ADAPTER).exists():
                last = dict(last, adapter=self.export())
            return last
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"adaptation interrupted at step {self.step} of {cfg.steps}: rerun with --resume "
                                    "to continue from its last checkpoint") from None
        finally:
            stop.__exit__()
            bar.close()
            self.log.close()
            self.lock.release()

    def export(self, path=None) -> dict:
        with averaged(self.opt):
            return self.lora.save(path or self.out / ADAPTER, dtype=adapter_dtype(self.cfg.export_dtype),
                                  step=self.step, steps=self.cfg.steps, exits=self.exits,
                                  config={k: v for k, v in asdict(self.cfg).items() if k != "progress"})


def adapt(cfg: AdaptConfig) -> dict:
    """Adapt the backbone as `cfg` says; `cfg.out/adapter.safetensors` at the end of the run."""
    return Adapter(cfg).run()


def export(out, path=None, dtype: str | None = None, device: str = "cpu") -> dict:
    """The adapter file from the last checkpoint in `out` (a run stopped before its last step)."""
    ckpt = Path(out).expanduser() / CHECKPOINT
    if not ckpt.exists():
        raise MeestralError(f"{Path(out)} has no {CHECKPOINT}: give the --out folder of a `meestral adapt train` run")
    state = read_checkpoint(ckpt)
    check_kind(state, "adapt", ckpt)
    # Into the run's folder only while no run writes there (its own export would replace this one).
    lock = None if path else FolderLock(Path(out).expanduser(), "meestral adapt export")
    try:
        return _export(state, ckpt, out, path, dtype, device)
    finally:
        if lock:
            lock.release()


def _export(state: dict, ckpt: Path, out, path, dtype, device) -> dict:
    from meestral.backbones.loading import load_backbone
    from meestral.backbones.lora import LoRA

    fields = dict(state["adapt_config"])
    cfg = AdaptConfig(**{**fields, "device": device})
    bb = load_backbone(cfg.backbone, dtype=cfg.dtype, device=device)
    if bb.fingerprint() != state["config"]["backbone"]:
        raise MeestralError(f"{ckpt} was trained on another {cfg.backbone!r} (fingerprint differs): load that one")
    lora = LoRA(bb, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed)
    lora.load_state_dict(state["lora"])
    return lora.save(path or Path(out) / ADAPTER, dtype=adapter_dtype(dtype or cfg.export_dtype), step=state["step"],
                     steps=cfg.steps, exits=state["config"]["exits"],
                     config={k: v for k, v in fields.items() if k != "progress"})

