"""Kernel paths a run can turn off from its environment, without a code change: MEESTRAL_<NAME>=0
(e.g. MEESTRAL_FUSED_MIXER=0 for `backbones.ssd.FUSED_MIXER`) where a fused path fails or loses on
some machine, for a command that has no flag for it (a training run on a GPU box). The modules
keep them as plain module flags, read once at import; tests and probes set those directly."""

from __future__ import annotations

import os


def on(name: str) -> bool:
    """Whether switch `name` is on: yes unless MEESTRAL_<name> is "0"."""
    return os.environ.get(f"MEESTRAL_{name}", "1").strip() != "0"
