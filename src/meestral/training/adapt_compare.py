"""Original vs early-exit-adapted backbone on the same held-out text: per-layer top-1 agreement
with the final layer, the strict oracle bound (every layer an exit point) and perplexity, plus
the figure the README shows (agreement by layer, both backbones, bounds in the legend).

The adapted backbone is the original with the adapter merged (what `--backbone smollm2-ee`
loads), measured with the very rows and code (`adapt.measure`) the original is.
"""

from __future__ import annotations

from pathlib import Path

from meestral.files import write_json
from meestral.training.run_log import figure


def compare(backbone: str, adapter, out, corpus: str = "embedded", tokens: int = 4096, seq_len: int = 256,
            batch: int = 8, device: str = "cpu", dtype=None) -> dict:
    from meestral.training.adapt import measure
    from meestral.backbones.loading import load_backbone
    from meestral.data import heldout_rows
    from meestral.backbones.lora import apply_adapter, check_base, read_adapter
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
    apply_adapter(bb, adapter, name=f"{bb.name}+adapter")
    res["adapted"] = measure(bb, rows, batch=batch)
    res["ppl_ratio"] = res["adapted"]["heldout_ppl"] / res["original"]["heldout_ppl"]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", res, indent=1)
    agreement_figure(res, out / "agreement.png")
    return res


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
