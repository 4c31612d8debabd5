"""Exit-head training: a frozen backbone, one forward per batch for all exit points, one binary
classifier per exit point.

    from meestral.training.head_training import TrainConfig, train
    train(TrainConfig(backbone="smollm2", exits=[7, 15, 22, 27], data="embedded", steps=300, out="runs/h"))

One step
  1. `Backbone.collect` runs the HF forward once under no_grad and returns the hidden states at
     every exit point (+ Mamba mixer outputs) and the final logits.
  2. Labels, one exit point at a time (a [B, T, V] logit tensor each, never all at once): 1 when the
     final layer's argmax is within the top-k of the exit layer's distribution (final norm + LM
     head on the exit state). k = 15 as in DYNAMAX; k = 1 is strict token identity.
  3. Each head's BCE-with-logits (optional pos_weight balancing, per-head weights), summed; one
     backward through the heads only; gradient clipping per head; optimiser step.

Optimisers (`optim.make_optimizer`): schedule-free AdamW (`schedulefree`; switched to its averaged
weights for validation, checkpoints and the final save) or AdamW with linear warm-up + cosine decay.

Outputs in `out/`: `heads/` (ExitHeads.save: each head its own weights), `checkpoint.pt` (atomic;
heads, optimiser, scheduler, RNG states, data-stream position, balancing weights), `log.jsonl`
(one record per train window and per validation), `curves.png`, and `tb/` when TensorBoard is
installed. `resume=True` continues from `checkpoint.pt` and gives the same final weights as an
uninterrupted run.

Several processes (`torchrun --nproc_per_node N -m meestral.cli.main train ...`): DDP over the heads
only (the frozen backbone is replicated, not wrapped), gloo on CPU and nccl on GPU. Rank r owns
rows r*B/N .. (r+1)*B/N - 1 of every global batch of B rows and reads only those rows' documents
(see data.PackedStream), so N processes see exactly the batches one process would; losses are
per-token means and DDP averages gradients, so the updates match too (to float tolerance).
Rank 0 alone writes files.

Backbones larger than one GPU
  The backbone is frozen and only runs forward, so there is no optimiser or gradient state to
  shard, only its weights. Two routes:
  - FSDP2 (`fsdp=True`, `meestral train --fsdp` under torchrun; tested on CPU with gloo): each
    rank loads the backbone into host memory (a `random:` backbone on its GPU instead, see
    ranks.load_device), then `fully_shard` splits every decoder block and the
    rest of the model over the ranks and moves each rank's shard to its GPU. A block's weights are
    all-gathered just for its forward and freed after it, so each GPU holds 1/N of the blocks plus
    one whole block (and the embedding/LM head, which stay gathered after the first forward). Data
    rows, heads (DDP), labels and results are as without it.
  - accelerate's big-model inference (not wired in): load the HF model with `device_map="auto"`
    (layers spread over the visible GPUs, one process) and wrap it with `backbones.loading.wrap`;
    `collect` works unchanged because HF moves activations between devices; put the heads on the
    device of the LM head. Simpler, but the GPUs take turns (a pipeline without micro-batches).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meestral.data import tuplify
from meestral.errors import MeestralError
from meestral.training.checkpoint import (CHECKPOINT, check_same_run, prepare_out, previous_checkpoint,
                                          read_checkpoint, save_checkpoint)
from meestral.training.interrupt import StopRequests
from meestral.training.optim import averaged, check_optimizer, current_lr, make_optimizer, use_averaged
from meestral.training.ranks import Ranks, load_device, peak_memory_gib, shard_backbone
from meestral.training.run_log import RunLog, num
from meestral.validation import check_context, check_output

# Fields that define the run: a resumed run must match them, or it would not be the same run.
RUN_DEFINING = ("backbone", "exits", "features", "mlp_hidden", "data", "seq_len", "batch", "steps", "lr",
                "optimizer", "warmup", "weight_decay", "topk", "balance", "head_weights", "clip",
                "val_fraction", "shuffle_buffer", "seed", "dtype")


@dataclass
class TrainConfig:
    backbone: str = "smollm2"
    exits: list[int] | None = None  # None: every quarter of the depth
    features: str = "hidden"  # or "hidden+aux" (Mamba)
    mlp_hidden: int = 0
    data: str = "auto"
    seq_len: int = 256
    batch: int = 4  # global rows per step, over all processes
    steps: int | None = None
    tokens: int | None = None  # alternative to steps: ceil(tokens / (batch * seq_len)) steps
    lr: float = 3e-3
    optimizer: str = "schedulefree"  # or "adamw" (warm-up + cosine)
    warmup: int | None = None  # steps; None: 5% of the run
    weight_decay: float = 0.0
    topk: int = 15
    balance: bool = False
    head_weights: list[float] | None = None
    clip: float = 1.0
    log_every: int = 10  # train records (metrics over the steps since the last one)
    val_every: int = 50
    val_rows: int = 16
    val_fraction: float = 0.05
    ckpt_every: int = 50
    shuffle_buffer: int = 64
    out: str = "runs/heads"
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    fsdp: bool = False  # shard the frozen backbone over the torchrun processes (FSDP2)
    progress: bool = True

    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / (self.batch * self.seq_len)))
        raise MeestralError("give --steps or --tokens: how long to train")


# ---- labels ------------------------------------------------------------------------------------
@torch.no_grad()
def consistency_labels(backbone, h: torch.Tensor, final_top1: torch.Tensor, k: int) -> torch.Tensor:
    """1 where the final layer's argmax is among the top-k tokens of the exit distribution.

    Counted as "fewer than k tokens score strictly higher than it", which needs no sort and settles
    ties in the final token's favour (topk would break them by index, arbitrarily)."""
    logits = backbone.logits(h)
    ref = logits.gather(-1, final_top1.unsqueeze(-1))
    return (logits > ref).sum(-1) < k


@torch.no_grad()
def features_and_labels(backbone, ids: torch.Tensor, exits, topk: int, aux: bool = False):
    """One frozen forward for all exit points: (hidden states, aux features or Nones, labels), each
    a list in exit order. The final logits [B, T, V] are dropped as soon as their argmax is known."""
    hs, auxes, logits = backbone.collect(ids.to(backbone.device), exits, aux=aux)
    top1 = logits.argmax(-1)
    del logits
    labels = [consistency_labels(backbone, hs[l], top1, topk) for l in exits]
    return [hs[l] for l in exits], [auxes.get(l) for l in exits], labels


def heads_loss(logits, labels, weights, pos_weight=None) -> torch.Tensor:
    """Sum over heads of weight_j * mean BCE-with-logits_j (pos_weight_j scales positives when given)."""
    loss = 0.0
    for j, (z, y) in enumerate(zip(logits, labels)):
        pw = pos_weight[j].to(z.device) if pos_weight is not None else None
        loss = loss + weights[j] * F.binary_cross_entropy_with_logits(z, y.float(), pos_weight=pw)
    return loss


def clip_per_head(heads, max_norm: float):
    """Clip each head's gradient norm on its own: the heads are independent problems, and one
    head's large gradient must not shrink another's step (as a global clip would)."""
    for c in heads.classifiers:
        torch.nn.utils.clip_grad_norm_(c.parameters(), max_norm)


# ---- metrics -----------------------------------------------------------------------------------
def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = scores.argsort()
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of each tie group's last member
    avg_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, precision, recall, F1 (prediction: logit > 0, i.e. confidence > 0.5), label base
    rate, predicted-positive rate, AUROC, and the F1/accuracy of the trivial always-exit policy
    (never-exit has F1 0 and accuracy 1 - label_rate). Undefined ratios are NaN."""
    pred, y = logits.flatten() > 0, labels.flatten().bool()
    n = y.numel()
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    tn = n - tp - fp - fn
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    rate = (tp + fn) / n if n else nan
    return {
        "n": n, "accuracy": (tp + tn) / n if n else nan, "precision": precision, "recall": recall, "f1": f1,
        "label_rate": rate, "pred_rate": (tp + fp) / n if n else nan, "auroc": auroc(logits, labels),
        "f1_always_exit": 2 * rate / (1 + rate) if rate == rate and rate > 0 else nan,
        "accuracy_always_exit": rate,
    }


# ---- the heads as one module ----------------------------------------------------------------
class _HeadsForward(nn.Module):
    """ExitHeads behind a forward() so DDP can wrap them: logits of every head, in exit order."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, hs: list, auxes: list):
        return [self.heads.classifier_logit(j, h, a) for j, (h, a) in enumerate(zip(hs, auxes))]


# ---- the log -----------------------------------------------------------------------------------
def _scalars(record: dict):
    """TensorBoard's view of a record: loss and speed, and every head's metrics."""
    for k in ("loss", "tok_per_s"):
        if k in record:
            yield f"{record['split']}/{k}", record[k]
    for layer, m in record["heads"].items():
        for k, v in m.items():
            yield f"{record['split']}/L{layer}/{k}", v


def plot_curves(log: RunLog, png: Path):
    """Train loss, and each head's validation F1 (dashed: always exiting) and AUROC."""
    with log.curves(png, "train loss (sum over heads)") as (val, axes):
        for ax, key in zip(axes, ("f1", "auroc")):
            for layer in (val[0]["heads"] if val else {}):
                line, = ax.plot([r["step"] for r in val], [num(r["heads"][layer][key]) for r in val], label=f"L{layer}")
                if key == "f1":
                    ax.axhline(num(val[-1]["heads"][layer]["f1_always_exit"]), ls="--", color=line.get_color(), lw=0.8)
            ax.set(title=f"validation {key}" + (" (dashed: always exit)" if key == "f1" else ""), xlabel="step")
            if val:
                ax.legend()


# ---- the run -----------------------------------------------------------------------------------
def _check_config(cfg: TrainConfig, world: int):
    from meestral.validation import check_fields

    check_optimizer(cfg.optimizer)
    check_fields(cfg)
    if cfg.total_steps() < 1:
        raise MeestralError("--steps/--tokens must give at least one step")
    check_warmup(cfg.warmup, cfg.total_steps())
    if cfg.val_rows and not cfg.val_fraction:
        raise MeestralError(f"--val-fraction 0 holds no documents out, so the --val-rows {cfg.val_rows} validation rows "
                            "have none to come from: give --val-fraction > 0, or --val-rows 0 to train without validation")
    if cfg.batch % world:
        raise MeestralError(f"--batch {cfg.batch} does not split over {world} processes: use a multiple of {world}")


def check_warmup(warmup: int | None, total: int):
    """A warm-up longer than the run never reaches its learning rate (head training, adaptation)."""
    if warmup is not None and warmup > total:
        raise MeestralError(f"--warmup {warmup} is longer than the run ({total} steps): the learning rate would never "
                            "reach --lr; lower --warmup, or leave it out (5% of the run)")


def _identity(cfg: TrainConfig, backbone) -> dict:
    d = {k: getattr(cfg, k) for k in RUN_DEFINING}
    d["steps"] = cfg.total_steps()
    d["backbone"] = backbone.fingerprint()
    return d


class _Window:
    """Head logits and labels since the last train record (metrics need them all, for AUROC)."""

    def __init__(self, n_heads):
        self.n = n_heads
        self.clear()

    def clear(self):
        self.logits = [[] for _ in range(self.n)]
        self.labels = [[] for _ in range(self.n)]
        self.loss, self.steps, self.t0 = 0.0, 0, time.perf_counter()

    def add(self, logits, labels, loss):
        for j in range(self.n):
            self.logits[j].append(logits[j].detach().float().flatten().cpu())
            self.labels[j].append(labels[j].flatten().cpu())
        self.loss += loss
        self.steps += 1


def _metrics_over_ranks(dist, logits: list[torch.Tensor], labels: list[torch.Tensor], exits) -> dict:
    everyone = dist.gather((logits, labels))
    return {str(l): binary_metrics(torch.cat([e[0][j] for e in everyone]), torch.cat([e[1][j] for e in everyone]))
            for j, l in enumerate(exits)}


class Trainer:
    """One training run; `run()` returns the final validation record (or the last train record)."""

    def __init__(self, cfg: TrainConfig):
        """Every check that can fail runs here, before anything is written to `cfg.out`."""
        self.cfg = cfg
        self.dist = Ranks(cfg.device)
        _check_config(cfg, self.dist.world)
        self.total = cfg.total_steps()
        self.out = Path(cfg.out).expanduser()
        check_output(self.out, "--out", folder=True)
        state = self._previous_state()  # (and --out free for this run: files.FolderLock, checkpoint.check_out)
        self._build_heads()
        self._build_data(state)

        self.model = _HeadsForward(self.heads)
        if self.dist.on:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.model)
        self.opt, self.sched = make_optimizer(self.heads.parameters(), cfg, self.total)
        self.step, self.pos_weight = 0, None
        if state is not None:
            self._restore(state)
        self.start_step = self.step
        self.lock = prepare_out(self.out, "train") if self.dist.main else None
        resumed_at = self.step if state is not None else None
        self.log = RunLog(self.out, resumed_at, scalars=_scalars) if self.dist.main else None

    def _previous_state(self) -> dict | None:
        return previous_checkpoint(self.out, self.cfg.resume, self.out / "heads", announce=self.dist.main,
                                   kind="train" if self.dist.main else None)

    def _build_heads(self):
        from meestral.backbones.loading import load_backbone
        from meestral.decoding.heads import ExitHeads

        cfg = self.cfg
        shard = cfg.fsdp and self.dist.on
        self.bb = bb = load_backbone(cfg.backbone, dtype=cfg.dtype, device=load_device(cfg.backbone, shard, self.dist.device))
        bb.fingerprint()  # the heads' identity comes from the whole weights: take it before any sharding
        if shard:
            shard_backbone(bb, self.dist.device)
        if bb.device.type == "cuda":  # the records' peak is training's, not a random backbone's staging before sharding
            torch.cuda.reset_peak_memory_stats(bb.device)
        L = bb.num_layers
        exits = cfg.exits or sorted({L // 4, L // 2, 3 * L // 4} - {L - 1})
        check_context(bb, cfg.seq_len, f"--seq-len {cfg.seq_len}", "lower --seq-len")
        if cfg.topk > bb.vocab_size:
            raise MeestralError(f"--topk {cfg.topk} exceeds the vocabulary ({bb.vocab_size} tokens)")
        torch.manual_seed(cfg.seed)  # head initialisation (the classifiers start at zero, MLPs do not)
        self.heads = ExitHeads("classifier", exits, bb, features=cfg.features, mlp_hidden=cfg.mlp_hidden)
        self.exits = self.heads.exit_points
        self.weights = cfg.head_weights or [1.0] * len(self.exits)
        if len(self.weights) != len(self.exits):
            raise MeestralError(f"{len(self.weights)} head weights for {len(self.exits)} exit points: give one per exit point")

    def _build_data(self, state):
        from meestral.data import PackedStream, open_source, validation_rows

        cfg, bb = self.cfg, self.bb
        source = open_source(cfg.data)
        source.check()
        self.identity = _identity(cfg, bb)
        self.identity["data"] = source.name  # "auto" resolved: a resume must read the same data
        check_same_run(state, self.identity, self.out)
        per_rank = cfg.batch // self.dist.world
        lanes = range(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)
        self.stream = PackedStream(source, bb.tokenizer, cfg.seq_len, cfg.batch, lanes, cfg.val_fraction,
                                   cfg.shuffle_buffer, cfg.seed)
        if state is not None:
            self.stream.load_state_dict(state["data"])
        # The first batch is read now, so that "too little data" fails before anything is written.
        self.first_batch = self.stream.next_batch()
        if self.dist.any(self.first_batch is None) and state is None:
            raise MeestralError(f"--batch {cfg.batch} x --seq-len {cfg.seq_len} is larger than the training data of "
                                f"{source.name} (each row needs its own documents): lower them or add data")
        val = validation_rows(source, bb.tokenizer, cfg.seq_len, cfg.val_rows, cfg.val_fraction)
        if cfg.val_rows and cfg.val_fraction and len(val) == 0:
            raise MeestralError(f"no validation text in {source.name} (--val-fraction {cfg.val_fraction} picked no "
                                f"document long enough): add documents, or pass --val-rows 0 to train without validation")
        self.has_val = len(val) > 0
        self.val = val[self.dist.rank::self.dist.world]

    # ---- state -------------------------------------------------------------------------------
    def _restore(self, s):
        self.heads.load_state_dict(s["heads"])
        self.opt.load_state_dict(s["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(s["scheduler"])
        self.step = s["step"]
        self.pos_weight = s["pos_weight"]
        torch.set_rng_state(s["rng"]["torch"])
        random.setstate(tuplify(s["rng"]["python"]))

    def _save_checkpoint(self):
        data = {}
        for part in self.dist.gather(self.stream.state_dict()):
            data.update(part)
        if not self.dist.main:
            return
        state = {
            "config": self.identity, "step": self.step, "heads": self.heads.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict() if self.sched else None,
            "pos_weight": self.pos_weight, "data": data,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        save_checkpoint(self.out, state)

    # ---- one batch ---------------------------------------------------------------------------
    def _features_and_labels(self, ids):
        return features_and_labels(self.bb, ids, self.exits, self.cfg.topk, aux=self.cfg.features == "hidden+aux")

    @torch.no_grad()
    def _calibrate(self, labels):
        """At the first step of a fresh run, from the first global batch's label rate p per head:
        the classifier bias starts at the loss-optimal constant (logit p; 0 when balanced), so short
        runs spend no steps walking it from heads.py's cautious -4; with `balance`, pos_weight =
        (1 - p) / p, then fixed and checkpointed so a resumed run weighs exactly as the original."""
        local = [[float(y.sum()), float(y.numel())] for y in labels]
        counts = self.dist.sum(torch.tensor(local, dtype=torch.float64, device=self.bb.device)).cpu()
        p = (counts[:, 0] / counts[:, 1]).clamp(1e-3, 1 - 1e-3)
        if self.cfg.balance:
            self.pos_weight = ((1 - p) / p).float()
        for c, pj in zip(self.heads.classifiers, p):
            last = c[-1] if isinstance(c, nn.Sequential) else c
            last.bias.fill_(0.0 if self.cfg.balance else math.log(pj / (1 - pj)))

    def _train_step(self, ids, window):
        hs, auxes, labels = self._features_and_labels(ids)
        if self.step == 0:
            self._calibrate(labels)
        logits = self.model(hs, auxes)
        loss = heads_loss(logits, labels, self.weights, self.pos_weight if self.cfg.balance else None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_head(self.heads, self.cfg.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        window.add(logits, labels, loss.item())

    @torch.no_grad()
    def _validate(self) -> dict:
        n = len(self.exits)
        logits, labels = [[] for _ in range(n)], [[] for _ in range(n)]
        rows = self.cfg.batch // self.dist.world
        for i in range(0, len(self.val), rows):
            hs, auxes, ys = self._features_and_labels(self.val[i:i + rows])
            for j in range(n):
                logits[j].append(self.heads.classifier_logit(j, hs[j], auxes[j]).float().flatten().cpu())
                labels[j].append(ys[j].flatten().cpu())
        cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)
        return _metrics_over_ranks(self.dist, [cat(x) for x in logits], [cat(y) for y in labels], self.exits)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        use_averaged(self.opt, False)
        window = _Window(len(self.exits))
        self.bar = tqdm(total=self.total, initial=self.step, disable=not (self.dist.main and self.cfg.progress),
                        unit="step", dynamic_ncols=True, file=sys.stderr)
        last, done_at, ok = {}, self.step, False
        stop = StopRequests()  # Ctrl-C stops between two steps (training.interrupt)
        try:
            stop.__enter__()
            while self.step < self.total:
                batch = self.first_batch if self.step == self.start_step else self.stream.next_batch()
                ended, stopped = (any(f) for f in zip(*self.dist.gather((batch is None, stop.requested))))
                stop.check(stopped)
                if ended:
                    print(f"meestral: training data used up after step {self.step} of {self.total}; "
                          "saving the heads as they are", file=sys.stderr)
                    break
                self._train_step(batch, window)
                self.step += 1
                self.bar.update(1)
                end = self.step == self.total
                if self.step % self.cfg.log_every == 0 or self.step % self.cfg.val_every == 0 or end:
                    last = self._record(window, validate=self.step % self.cfg.val_every == 0 or end)
                if self.step % self.cfg.ckpt_every == 0 or self.step == self.total:
                    self._checkpoint()
                    done_at = self.step
            if window.steps:  # stopped early on data: record and checkpoint the last steps too
                last = self._record(window, validate=True)
            if done_at != self.step:
                self._checkpoint()
            stop.check()  # Ctrl-C during the last step: stop before the heads are saved (a rerun saves them)
            use_averaged(self.opt, True)  # for good: the heads saved are the averaged ones
            if self.dist.main:
                self.heads.save(self.out / "heads")
                plot_curves(self.log, self.out / "curves.png")
            ok = True
            return last
        except KeyboardInterrupt:
            ckpt = self.out / CHECKPOINT
            done = read_checkpoint(ckpt)["step"] if self.dist.main and ckpt.exists() else None
            raise KeyboardInterrupt(f"training interrupted at step {self.step} of {self.total}: " + (
                f"rerun with --resume to continue from its checkpoint of step {done}" if done is not None else
                "no checkpoint yet, rerun the command to start over")) from None
        finally:
            stop.__exit__()
            self.bar.close()
            if self.log:
                self.log.close()
            if self.lock:
                self.lock.release()
            self.dist.close(wait=ok)

    def _checkpoint(self):
        with averaged(self.opt):
            self._save_checkpoint()

    def _record(self, window, validate: bool) -> dict:
        """A train record for the window, then (when asked and possible) a validation record;
        returns the last one written."""
        tokens_per_step = self.cfg.batch * self.cfg.seq_len
        rec = train = self._record_train(window, tokens_per_step)
        if validate and self.has_val:
            with averaged(self.opt):
                rec = self._record_val(tokens_per_step)
        f1 = " ".join(f"L{l}:{m['f1']:.2f}" for l, m in rec["heads"].items())
        self.bar.set_postfix_str(f"{train['tok_per_s']:.0f} tok/s loss {train['loss']:.3f} {rec['split']} F1 {f1}")
        window.clear()  # after validation: the next window's tokens/s counts training only
        return rec

    def _record_train(self, window, tokens_per_step) -> dict:
        metrics = _metrics_over_ranks(self.dist, [torch.cat(x) for x in window.logits],
                                      [torch.cat(y) for y in window.labels], self.exits)
        elapsed = time.perf_counter() - window.t0
        loss = sum(self.dist.gather(window.loss / max(1, window.steps))) / self.dist.world
        peaks = self.dist.gather(peak_memory_gib(self.bb.device))  # one per rank: FSDP's point is the difference
        rec = {"split": "train", "step": self.step, "tokens": self.step * tokens_per_step, "loss": loss, "lr": current_lr(self.opt),
               "tok_per_s": window.steps * tokens_per_step / elapsed, "heads": metrics,
               "peak_memory_gib": [p for p, _ in peaks], "peak_memory_kind": peaks[0][1]}
        if self.log:
            self.log.write(rec)
        return rec

    def _record_val(self, tokens_per_step) -> dict:
        rec = {"split": "val", "step": self.step, "tokens": self.step * tokens_per_step, "heads": self._validate()}
        if self.log:
            self.log.write(rec)
            plot_curves(self.log, self.out / "curves.png")
        return rec


def train(cfg: TrainConfig) -> dict:
    """Train exit heads as `cfg` says; the heads land in `cfg.out/heads`. Returns the last record."""
    return Trainer(cfg).run()
