"""MEEstral as an lm-evaluation-harness model: `--model meestral`.

lm-eval's contract is three methods (`loglikelihood`, `loglikelihood_rolling`, `generate_until`);
tokenisation of (context, continuation) pairs and empty contexts is lm-eval's own (`TemplateLM`),
and truncation follows its `hf` model, so with exits that never fire the scores equal `hf`'s.

Log-likelihoods are teacher-forced with per-token exits (see `scoring.py`): one parallel pass
under `catchup` / `verify` (exact deep states) or the full model, a token-by-token pass under
`copy` / `propagate`. Every request's accounting is kept in `self.records`; `accounting()`
summarises it. Tables of the exact path are cached per request, so re-running the same tasks at
other thresholds (`configure(...)`, what sweeps do) costs no model time for log-likelihoods, except
under `verify`: the drafts generation would make after a rejected one are run through the model
(once per branch: the table keeps them).

model_args (comma-separated, as lm-eval passes them; lists use ':'):
  backbone=smollm2  heads=DIR | head=softmax|margin|saturation|static  exits=7:15:22
  threshold=0.9 or 0.9:0.8:0.7 (default 1: never exit; 0 under speculate)
  policy=copy|propagate|catchup|verify|speculate  max_backlog=8  (verify=true: the same as policy=verify)
  draft_tokens=auto|K (speculate: the controller, or K drafts a cycle; exits=auto: calibrated exit point)
  draft_vocab=N (speculate: drafts read the LM head's first N rows; 0: all)
  exit_output=hidden|through_last_layer  layer_drop=N (baseline: drop the N blocks before the last)
  dtype=float32|bfloat16  device=cpu|cuda  batch_size=8  max_length=2048  max_gen_toks=256
"""

from __future__ import annotations

import time

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

# lm-eval fills its model registry with its own models (hf, vllm, ...) lazily, only while the registry
# is empty: registering ours first would hide them (`--model hf` beside ours, simple_evaluate("hf")).
import lm_eval.models  # noqa: F401,E402
from tqdm import tqdm

from meestral.decoding.decoder import EarlyExitDecoder
from meestral.errors import MeestralError
from meestral.evaluation.scoring import build_tables, decide, score_sequential
from meestral.validation import check_context, context_length
from meestral.decoding.config import ExitConfig
from meestral.decoding.sampling import SamplingOptions

ARGS = ("backbone", "heads", "head", "exits", "threshold", "policy", "verify", "max_backlog", "exit_output",
        "layer_drop", "draft_tokens", "draft_vocab", "dtype", "device", "batch_size", "max_batch_size", "max_length", "max_gen_toks")


@register_model("meestral")
class MeestralLM(TemplateLM):
    def __init__(self, backbone="smollm2", heads=None, head="softmax", exits=None, threshold=None,
                 policy="copy", verify=False, max_backlog=8, exit_output="hidden", layer_drop=0,
                 draft_tokens="auto", draft_vocab=0, dtype=None, device="cpu", batch_size=8, max_batch_size=None, max_length=None,
                 max_gen_toks=256, **unknown):
        super().__init__()
        if unknown:
            raise MeestralError(f"unknown model_args {', '.join(sorted(unknown))}: use {', '.join(ARGS)}")
        if not backbone:
            raise MeestralError("model_args needs backbone=... (smollm2, random:<shape>, a folder or hub id)")
        from meestral.backbones.loading import load_backbone

        if isinstance(backbone, str):
            self.bb = load_backbone(backbone, dtype=dtype, device=str(device or "cpu"))
        else:  # an already loaded Backbone (Python use)
            self.bb = backbone
        self.spec = backbone if isinstance(backbone, str) else self.bb.name
        self._batch = self._int(batch_size if batch_size not in (None, "auto") else 8, "batch_size")
        self._max_length = self._int(max_length, "max_length") if max_length is not None else None
        if self._max_length is not None:  # one full window must fit (positions, and memory on any backbone)
            check_context(self.bb, self._max_length, f"max_length {self._max_length}",
                          "lower --max-length (max_length=), or leave it out for the model's context")
        self._max_gen_toks = self._int(max_gen_toks, "max_gen_toks")
        self.records: list[dict] = []
        self._tables: dict = {}
        # (context, continuation) -> the full model's top-1 per scored token: what agreement is
        # measured against, whatever the configuration; the copy/propagate path would otherwise pay
        # a whole-sequence full-depth pass per configuration for it.
        self._full_top: dict = {}
        self.progress = True  # per-request bars (a sweep turns them off and shows its own)
        self.configure(ExitConfig.from_options(self.bb, heads=heads, head=head, exits=exits, threshold=threshold,
                                               policy=policy, verify=verify, max_backlog=max_backlog,
                                               exit_output=exit_output, layer_drop=layer_drop,
                                               draft_tokens=draft_tokens, draft_vocab=draft_vocab))

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """As lm-eval's, except that model_args win over the CLI's defaults (batch_size, device)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @staticmethod
    def _int(v, what):
        try:
            out = int(v)
            if out != float(v):  # lm-eval parses max_length=1.5 as a float: refused, not cut to 1
                raise ValueError
        except (TypeError, ValueError):
            raise MeestralError(f"model_args {what}={v!r} must be a whole number") from None
        if out < 1:
            raise MeestralError(f"model_args {what}={v!r} must be at least 1")
        return out

    # ---- configuration (sweeps change it between runs; the backbone stays loaded) ------------
    def configure(self, config: ExitConfig):
        """Score with `config` from now on (model_args become one through ExitConfig.from_options)."""
        self.dec = EarlyExitDecoder(self.bb, config)
        self.heads = self.dec.config.heads
        return self

    @property
    def exact(self) -> bool:
        """Scored from one parallel pass (every layer's state is the full model's)."""
        return self.dec.config.exact

    @property
    def layer_drop(self) -> int:
        return len(self.dec.config.skip_layers)

    def config(self) -> dict:
        return {"backbone": self.spec, "fingerprint": self.bb.fingerprint(), **self.dec.config.to_dict(),
                "layer_drop": self.layer_drop}

    def accounting(self, reset: bool = False) -> dict:
        """Summary of every request scored since the last reset."""
        from meestral.decoding.accounting import summarize

        recs = self.records
        stats = [s for r in recs for s in r["stats"]]
        agree = [a for r in recs for a in r["agree"]]
        discarded = [s for r in recs for s in r.get("discarded", ())]
        out = summarize(stats, self.dec.cost, self.bb.num_layers, discarded)
        out["agreement"] = sum(agree) / len(agree) if agree else float("nan")
        out["requests"] = len(recs)
        hist: dict[str, int] = {}
        for s in stats:
            if not s.prefill:
                hist[str(s.exit_layer)] = hist.get(str(s.exit_layer), 0) + 1
        out["exit_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        out["wall_s"] = sum(r["wall_s"] for r in recs)
        base = sum(r["full_flops"] for r in recs)
        if "flops_per_token" in out and base > 0:
            spent = sum(s.flops for s in stats if not s.prefill) + sum(s.flops for s in discarded)
            out["flops_ratio"] = spent / base
        if reset:
            self.records = []
        return out

    # ---- lm-eval's tokenisation hooks ---------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.bb.tokenizer.name

    @property
    def eot_token_id(self):
        eos = self.bb.tokenizer.eos_ids
        return min(eos) if eos else 0

    @property
    def prefix_token_id(self):
        bos = self.bb.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """The token window (the context-length rule: meestral.validation)."""
        if self._max_length:
            return self._max_length
        n = context_length(self.bb)
        return min(n, 1 << 20) if n else 2048  # Mamba has no positional limit; lm-eval's `hf` default

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def device(self):
        return self.bb.device

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs):
        ids = self.bb.tokenizer.encode(string, add_bos=True if add_special_tokens is None else bool(add_special_tokens))
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, ids, **kwargs) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self.bb.tokenizer.decode(list(ids))

    # ---- log-likelihoods ----------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # lm-eval's tokenisation (its own bar too, silenced with ours during sweeps)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [((context, continuation), context_enc, continuation_enc)] (lm-eval's form)."""
        items = []
        for _, ctx, cont in requests:
            n = len(cont)
            if n > self.max_length:  # no context token would be left to predict the first one from
                raise MeestralError(f"a task's continuation of {n:,} tokens does not fit the {self.max_length:,}-token "
                                    "window (the context is cut from the left, the continuation never is): raise "
                                    "--max-length (max_length=), or leave it out for the model's context")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]  # as lm-eval's `hf` truncates
            items.append((whole[:-n], whole[-n:]))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]) - len(items[i][1]))
        results = [None] * len(items)
        bar = tqdm(total=len(items), desc="meestral loglikelihood", disable=disable_tqdm or not self.progress)
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size]
            for i, r in zip(idx, self._score([items[i] for i in idx])):
                results[i] = r
                ctx = len(items[i][0])
                base = full_flops(self.dec.cost, self.bb.num_layers, range(ctx + 1, ctx + len(r.stats)))
                self.records.append({"kind": "loglikelihood", "stats": r.stats, "discarded": r.discarded,
                                     "agree": r.agree, "wall_s": r.wall_s, "full_flops": base})
            bar.update(len(idx))
        bar.close()
        return [(r.logprob, r.greedy) for r in results]

    def _score(self, batch):
        """Scored results for [(context, continuation)] token lists, by the path the policy needs."""
        if not self.exact:
            return score_sequential(self.dec, batch, self._full_top)
        heads = self.heads
        key_h = heads  # the heads object itself: tables hold its confidences, and keeping it in the
        # key keeps it alive, so a new heads object can never reuse an old one's id
        keys = [(key_h, tuple(c), tuple(x)) for c, x in batch]
        todo = [i for i, k in enumerate(keys) if k not in self._tables]
        if todo:
            rows = []
            for i in todo:
                c, x = batch[i]
                fed = (list(c) + list(x))[:-1]
                rows.append((fed, list(x)))
            for i, tab in zip(todo, build_tables(self.bb, heads, rows)):
                tab.start = len(batch[i][0]) - 1
                self._tables[keys[i]] = tab
                self._full_top[keys[i][1:]] = tab.top[:, -1].tolist()
        return [decide(self._tables[k], self.dec.config, self.dec.cost, self.bb.num_layers, self.bb) for k in keys]

    def clear_cache(self):
        self._tables.clear()
        self._full_top.clear()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], desc="meestral rolling", disable=disable_tqdm or not self.progress):
            windows = [(None,) + w for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    # ---- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False):
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        args = [r.args for r in requests]
        order = sorted(range(len(args)), key=lambda i: -len(self.tok_encode(args[i][0])))
        out = [None] * len(args)
        eos = self.tok_decode(self.eot_token_id)
        bar = tqdm(total=len(args), desc="meestral generate_until", disable=disable_tqdm or not self.progress)
        # Batch requests that share generation settings (lm-eval groups them the same way).
        groups: dict[str, list[int]] = {}
        for i in order:
            groups.setdefault(repr(sorted(args[i][1].items(), key=lambda kv: kv[0])), []).append(i)
        for idx in groups.values():
            kw = normalize_gen_kwargs(args[idx[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_new = int(kw.pop("max_gen_toks"))
            opts = SamplingOptions(max_new_tokens=max_new, temperature=float(kw.get("temperature", 0.0) or 0.0),
                                   top_p=float(kw.get("top_p", 1.0) or 1.0), top_k=int(kw.get("top_k", 0) or 0),
                                   stop=tuple(s for s in until if s))
            if not kw.get("do_sample", False):
                opts.temperature = 0.0
            if max_new >= self.max_length:
                raise MeestralError(f"the task asks for {max_new} new tokens, which leaves no room for a prompt in "
                                    f"the {self.max_length}-token window: raise max_length or lower max_gen_toks")
            ctx_len = self.max_length - max_new
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                prompts = [self.tok_encode(args[i][0], left_truncate_len=ctx_len) or [self.prefix_token_id]
                           for i in chunk]
                t0 = time.perf_counter()
                gens = self.dec.generate(prompts, opts)
                wall = time.perf_counter() - t0
                for i, g in zip(chunk, gens):
                    text = g.text
                    for s in until:  # lm-eval's rule: cut at the first stop sequence
                        if s and s in text:
                            text = text.split(s)[0]
                    out[i] = text
                    n = len(g.prompt_ids)
                    base = full_flops(self.dec.cost, self.bb.num_layers, range(n + 1, n + len(g.stats)))
                    self.records.append({"kind": "generate_until", "stats": g.stats, "discarded": g.discarded, "agree": [],
                                         "wall_s": wall / len(chunk), "full_flops": base})
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(chunk))
        bar.close()
        return out


def full_flops(cost, num_layers: int, contexts) -> float:
    """FLOPs the full model spends on tokens at these context lengths (the FLOPs ratio's base)."""
    return sum(cost.token(range(num_layers), [], 0, c, True)[0] for c in contexts)
