"""Original vs early-exit-adapted backbone on the same held-out text: per-layer top-1 agreement
with the final layer, the strict oracle bound (every layer an exit point) and perplexity, plus
the figure the README shows (agreement by layer, both backbones, bounds in the legend).

The adapted backbone is the original with the adapter merged (what `--backbone smollm2-ee`
loads), measured with the very rows and code (`adapt.measure`) the original is.

`drift` is how far the adapted full model moved from the original on some text: the mean
KL(original || adapted) of the final distributions per token, and how often both rank the same
token first. Perplexity alone can hide a move (smollm2-ee: 1% better perplexity on held-out
Shakespeare, yet 0.18 nats a token of drift there and on every task's text, and 4 points less
on ARC-Easy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from meestral.files import write_json
from meestral.training.run_log import figure


def compare(backbone: str, adapter, out, corpus: str = "embedded", tokens: int = 4096, seq_len: int = 256,
            batch: int = 8, device: str = "cpu", dtype=None) -> dict:
    from meestral.training.adapt import measure
    from meestral.backbones.loading import load_backbone
    from meestral.data import heldout_rows
    from meestral.backbones.lora import check_base, load_adapter, read_adapter
    from meestral.validation import check_context, check_output

    out = check_output(Path(out).expanduser(), "--out", folder=True)
    meta, _ = read_adapter(adapter)  # a bad file fails before the first measurement
    bb = load_backbone(backbone, dtype=dtype, device=device)
    check_base(meta, bb, adapter)
    check_context(bb, seq_len, f"--seq-len {seq_len}", "lower --seq-len")
    rows = heldout_rows(corpus, bb.tokenizer, tokens, seq_len)
    res = {"backbone": bb.name, "adapter": str(adapter), "adapter_step": meta.get("step"),
           "num_layers": bb.num_layers, "corpus": corpus, "seq_len": seq_len,
           "original": measure(bb, rows, batch=batch)}
    lora = load_adapter(bb, adapter)  # unmerged first: both models from one copy of the weights
    res["drift"] = drift(bb, lora, rows, batch=batch)
    lora.merge()
    bb.name = f"{bb.name}+adapter"
    res["adapted"] = measure(bb, rows, batch=batch)
    res["ppl_ratio"] = res["adapted"]["heldout_ppl"] / res["original"]["heldout_ppl"]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", res, indent=1)
    agreement_figure(res, out / "agreement.png")
    return res


@torch.no_grad()
def drift(bb, lora, seqs, batch: int = 8) -> dict:
    """KL(original || adapted) per token and top-1 agreement of the two full models on `seqs`
    (a [N, T] tensor of rows, or token-id lists of any lengths), the original being the same
    weights with the adapter's hooks off (`lora` attached, not merged)."""
    import torch.nn.functional as F

    from meestral.data import right_padded

    seqs = list(seqs)
    kl = agree = n = 0.0
    for i in range(0, len(seqs), batch):
        ids, lengths = right_padded(seqs[i:i + batch], bb.device)
        valid = torch.arange(ids.shape[1], device=ids.device) < lengths.to(ids.device)[:, None]
        with lora.disabled():
            lp = F.log_softmax(bb.model(ids).logits.float(), -1)[valid]
        lq = F.log_softmax(bb.model(ids).logits.float(), -1)[valid]
        kl += (lp.exp() * (lp - lq)).sum().item()
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        n += lp.shape[0]
    return {"tokens": int(n), "kl_per_token": kl / n, "top1_agreement": agree / n}


def agreement_figure(res: dict, png) -> None:
    with figure(png, size=(7, 4), dpi=120) as (ax,):
        for key, style in (("original", "o-"), ("adapted", "s-")):
            m = res[key]
            layers = [int(k) for k in m["agreement"]]
            ax.plot(layers, list(m["agreement"].values()), style, ms=3,
                    label=f"{key}: oracle {m['mean_layers_run']:.1f}/{res['num_layers']} layers, "
                          f"bound {m['bound_speedup_layers']:.2f}x, ppl {m['heldout_ppl']:.1f}")
        ax.set(xlabel="exit layer", ylabel="top-1 agreement with the final layer", ylim=(0, 1),
               title=f"{res['backbone']}: original vs early-exit adapted ({res['original']['tokens']} held-out tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
