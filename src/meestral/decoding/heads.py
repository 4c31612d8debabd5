"""Exit heads: given the features at an exit point, a confidence in [0, 1] that leaving there
yields the same token as the full model.

Kinds
- `classifier` (DYNAMAX): a learned binary classifier per exit point on the RMS-normalised hidden
  state; for Mamba the block's mixer output can be joined to it (`features="hidden+aux"`).
- `softmax`: max probability of the exit distribution (final norm + LM head on the exit state).
- `margin`: top-1 minus top-2 probability of that distribution.
- `saturation`: cosine similarity of the hidden state with the previous layer's (CALM).
- `static`: confidence 1 everywhere: a baseline that always leaves at the first exit point (the
  static exit-at-layer baseline, and how benchmarks force an exit without any probe cost).

The last two kinds of the list above need no training. `softmax`/`margin` read the whole LM head
at every probe: on small backbones that can cost more than the blocks they skip (see
accounting.py), which is why the classifier exists.

Heads save as `heads.safetensors` + `heads.json` in a folder. The JSON records the backbone's
identity (architecture, layers, hidden size, vocabulary, weights fingerprint) and the exit points;
loading onto another backbone is refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from meestral.errors import MeestralError

KINDS = ("classifier", "softmax", "margin", "saturation", "static")
FORMAT_VERSION = 1


def check_exit_points(points, num_layers: int) -> list[int]:
    """Exit points sorted, unique, each in [0, L-2] (exiting after the last block is no exit)."""
    import operator

    try:
        if isinstance(points, (str, bytes)):
            raise TypeError
        pts = [operator.index(p) for p in points]  # refuses 1.5 instead of truncating it
    except TypeError:
        raise MeestralError(f"exit points must be a list of integers, got {points!r}") from None
    if not pts:
        raise MeestralError("no exit points given: pass e.g. --exits 8,16,24")
    if len(set(pts)) != len(pts):
        dup = sorted({p for p in pts if pts.count(p) > 1})
        raise MeestralError(f"exit point(s) {dup} given twice: list each layer once")
    bad = [p for p in pts if not 0 <= p <= num_layers - 2]
    if bad:
        raise MeestralError(
            f"exit point(s) {bad} out of range: this backbone has {num_layers} layers, so exit points "
            f"must lie in [0, {num_layers - 2}]"
        )
    return sorted(pts)


def check_thresholds(thresholds, n_points: int) -> list[float]:
    """One threshold for all exit points, or one per exit point; each in [0, 1], not NaN."""
    try:
        if isinstance(thresholds, (str, bytes)):
            raise TypeError
        if not hasattr(thresholds, "__len__"):
            thresholds = [thresholds]
        th = [float(t) for t in thresholds]
    except (TypeError, ValueError):
        raise MeestralError(f"thresholds must be numbers in [0, 1], got {thresholds!r}") from None
    if len(th) == 1:
        th = th * n_points
    if len(th) != n_points:
        raise MeestralError(f"{len(th)} thresholds for {n_points} exit points: give one, or one per exit point")
    for t in th:
        if math.isnan(t) or not 0.0 <= t <= 1.0:
            raise MeestralError(f"threshold {t} is outside [0, 1]: exit happens when confidence > threshold")
    return th


class _RMS(nn.Module):
    """Parameter-free RMS normalisation: hidden states grow with depth; the head sees a fixed scale."""

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ExitHeads(nn.Module):
    def __init__(self, kind: str, exit_points, backbone, features: str = "hidden", mlp_hidden: int = 0):
        super().__init__()
        if kind not in KINDS:
            raise MeestralError(f"unknown head kind {kind!r}: use one of {', '.join(KINDS)}")
        if features not in ("hidden", "hidden+aux"):
            raise MeestralError(f"unknown head features {features!r}: use 'hidden' or 'hidden+aux'")
        if features == "hidden+aux" and backbone.aux_dim() == 0:
            raise MeestralError(f"features 'hidden+aux' need a Mamba backbone; {backbone.arch} has no mixer output")
        self.kind = kind
        self.exit_points = check_exit_points(exit_points, backbone.num_layers)
        self.features = features
        self.mlp_hidden = int(mlp_hidden)
        if self.mlp_hidden < 0:
            raise MeestralError(f"MLP head width {self.mlp_hidden} is negative: use 0 (a linear head) or a width >= 1")
        self.identity = backbone.identity()
        self.source = None  # the folder the heads were loaded from, if any
        d = backbone.hidden_size + (backbone.aux_dim() if features == "hidden+aux" else 0)
        self.feature_dim = d
        self.norm = _RMS()
        if kind == "classifier":
            def make():
                if self.mlp_hidden:
                    return nn.Sequential(nn.Linear(d, self.mlp_hidden), nn.GELU(), nn.Linear(self.mlp_hidden, 1))
                return nn.Linear(d, 1)

            self.classifiers = nn.ModuleList(make() for _ in self.exit_points)
            # Start near "never confident": an untrained head must not exit everywhere.
            for c in self.classifiers:
                last = c[-1] if isinstance(c, nn.Sequential) else c
                nn.init.zeros_(last.weight)
                nn.init.constant_(last.bias, -4.0)
        self.to(backbone.device)

    @property
    def needs_logits(self) -> bool:
        return self.kind in ("softmax", "margin")

    # ---- confidence ------------------------------------------------------------------------
    def features_of(self, h: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        f = self.norm(h)
        if self.features == "hidden+aux":
            f = torch.cat([f, self.norm(aux)], dim=-1)
        return f

    def classifier_logit(self, j: int, h: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        """Raw logit of exit point j's classifier (training uses it with BCE-with-logits)."""
        return self.classifiers[j](self.features_of(h, aux)).squeeze(-1)

    def confidence(self, j, h, aux=None, prev_h=None, logits=None) -> torch.Tensor:
        """Confidence at the j-th exit point for hidden states h [..., d]; `logits` are the exit
        distribution's logits (softmax/margin), `prev_h` the previous layer's output (saturation)."""
        if self.kind == "classifier":
            return torch.sigmoid(self.classifier_logit(j, h, aux))
        if self.kind == "static":
            return torch.ones(h.shape[:-1], device=h.device)
        if self.kind == "saturation":
            return torch.cosine_similarity(h.float(), prev_h.float(), dim=-1).clamp(0.0, 1.0)
        p = torch.softmax(logits.float(), dim=-1)
        if self.kind == "softmax":
            return p.max(-1).values
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    # ---- persistence -----------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "exit_points": self.exit_points,
            "features": self.features,
            "mlp_hidden": self.mlp_hidden,
            "backbone": self.identity,
        }

    def save(self, folder) -> Path:
        """Write heads.json + heads.safetensors atomically (a temp folder renamed into place)."""
        from safetensors.torch import save

        from meestral.files import remove_stale_temps, temp_name

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder.parent, folder.name)  # of a save that was killed
        tmp, old = temp_name(folder), temp_name(folder, "-old")
        _rmtree(tmp)
        tmp.mkdir()
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            # Bytes written as every other file is (safetensors' save_file makes its file 0600).
            (tmp / "heads.safetensors").write_bytes(save(tensors, metadata={"meestral": json.dumps(self.meta())}))
            meta = dict(self.meta(), sha256=_sha256(tmp / "heads.safetensors"))
            (tmp / "heads.json").write_text(json.dumps(meta, indent=2))
            if folder.exists():
                os.replace(folder, old)
                os.replace(tmp, folder)
                _rmtree(old)
            else:
                os.replace(tmp, folder)
        finally:
            _rmtree(tmp)
        return folder

    @classmethod
    def load(cls, folder, backbone) -> "ExitHeads":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_path, weights = folder / "heads.json", folder / "heads.safetensors"
        if not meta_path.exists():
            raise MeestralError(f"{folder} holds no heads.json: give a folder written by `meestral train` or ExitHeads.save")
        try:
            meta = json.loads(meta_path.read_text())
            kind, points, ident = meta["kind"], meta["exit_points"], meta["backbone"]
            if not isinstance(ident, dict):
                raise TypeError("backbone identity is not an object")
            features, mlp_hidden = meta.get("features", "hidden"), int(meta.get("mlp_hidden", 0))
            version = meta.get("format", FORMAT_VERSION)
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"format {version!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSON/Unicode errors are ValueErrors
            raise MeestralError(f"{meta_path} is corrupted ({type(e).__name__}): re-save or re-train the heads") from None
        if version > FORMAT_VERSION:  # a later MEEstral's layout: reading it as ours would be a guess
            raise MeestralError(f"{meta_path} has format {version}, newer than the {FORMAT_VERSION} this MEEstral reads: "
                                "upgrade MEEstral, or re-train the heads with this one")
        mine = backbone.identity()
        for key in ("arch", "num_layers", "hidden_size", "vocab_size", "fingerprint"):
            if ident.get(key) != mine[key]:
                raise MeestralError(
                    f"the heads of {meta_path} belong to backbone {ident.get('name')!r} ({key}={ident.get(key)}), not to "
                    f"{mine['name']!r} ({key}={mine[key]}): load the backbone they were trained on or train new heads"
                )
        try:
            heads = cls(kind, points, backbone, features=features, mlp_hidden=mlp_hidden)
        except MeestralError as e:  # a kind, exit point or feature heads.json should not hold: name the file
            raise MeestralError(f"{meta_path} is corrupted ({e}): re-save or re-train the heads") from None
        if kind == "classifier":
            if "sha256" in meta and weights.is_file() and _sha256(weights) != meta["sha256"]:
                raise MeestralError(f"{weights} does not match the checksum in {meta_path} (changed or damaged since "
                                    "it was saved): re-save or re-train the heads")
            try:
                state = load_file(str(weights))
                heads.load_state_dict(state, strict=True)
            except Exception as e:
                raise MeestralError(
                    f"{weights} is missing or corrupted ({type(e).__name__}): re-save or re-train the heads"
                ) from None
        heads.source = str(folder)  # where they came from (the report looks for the training log next to it)
        return heads


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rmtree(path: Path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)
