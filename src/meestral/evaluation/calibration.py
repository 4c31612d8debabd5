"""Learn-then-Test calibration of one shared exit threshold (CALM, Schuster et al. 2022;
Angelopoulos et al., "Learn then Test", 2021).

Data, per token of held-out text:
  conf   [N, J]    confidence at each of the J exit points, in order of depth
  agree  [N, J+1]  does exiting at exit point j emit the full model's token? Column J is full
                   depth and is always True.

A threshold λ is shared by all exit points: a token leaves at the first j with conf[j] > λ, or runs
to full depth when there is none. Its risk is the fraction of tokens whose emitted token differs
from the full model's, risk(λ) = 1 - agreement(λ).

Goal: the smallest λ (the most exits) such that P(risk(λ) <= ε) >= 1 - δ over the draw of the
calibration data. Fixed-sequence testing: the grid is walked from the most conservative value
(λ = 1: nothing exits, risk 0) downwards; at each λ a valid p-value for H0: risk(λ) > ε is
computed from the empirical risk; H0 is rejected while p <= δ, and the walk stops at the first λ
where it is not. The chosen λ is the last rejected one. Because the order is fixed before looking
at the data, the family-wise error is at most δ with no multiplicity correction, whether or not the
risk is monotone in λ.

p-values
  binomial  exact binomial tail P(Binom(n, ε) <= k) for k errors out of n: valid for a 0/1 loss.
  hb        Hoeffding-Bentkus, min(exp(-n·KL(min(r̂, ε) || ε)), e·P(Binom(n, ε) <= ⌈n·r̂⌉)):
            valid for any loss in [0, 1], a little more conservative than `binomial`.

Units and independence
  Both p-values assume the n losses are independent draws. Tokens of one sequence are not: they
  share a context, so `unit="token"` (losses are the tokens' 0/1 errors) is an approximation whose
  guarantee is optimistic when errors cluster within sequences. `unit="sequence"` treats sequences
  (given by `groups`, one id per token) as the independent units: each sequence's loss is its own
  token error rate, in [0, 1], so only `hb` applies. The guarantee is then on the expected
  per-sequence error rate (each sequence weighs the same, whatever its length), which equals the
  token risk when sequences have equal length, as packed rows do. Use `split` to hold out whole
  sequences, never tokens, so the calibration and test sets share no context.

The grid must be fixed before seeing the data; a grid built from the calibration confidences
themselves would void the guarantee. The default is 1.00, 0.99, ..., 0.00 plus ten log-spaced
points between 0.9999 and 0.99: max-probability confidences crowd near 1, and on SmolLM2 the step
from 1.00 straight to 0.99 already exits a quarter of the tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from meestral.errors import MeestralError

METHODS = ("binomial", "hb")
UNITS = ("token", "sequence")
DEFAULT_GRID = np.unique(np.round(np.concatenate([np.linspace(1.0, 0.0, 101), 1 - np.logspace(-4, -2, 11)]), 10))[::-1]


# ---- p-values ------------------------------------------------------------------------------------
def binom_cdf(k: float, n: int, p: float) -> float:
    """P(Binom(n, p) <= k), summed exactly in log space (no scipy needed)."""
    k = math.floor(k + 1e-9)
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k, dtype=np.float64)
    # log pmf(i+1) - log pmf(i) = log((n-i)/(i+1)) + log(p/(1-p))
    steps = np.log(n - i) - np.log1p(i) + (math.log(p) - math.log1p(-p))
    logpmf = n * math.log1p(-p) + np.concatenate(([0.0], np.cumsum(steps)))
    top = logpmf.max()
    return float(min(1.0, math.exp(top) * np.exp(logpmf - top).sum()))


def _kl_bernoulli(a: float, b: float) -> float:
    """KL(Bernoulli(a) || Bernoulli(b)), with 0·log 0 = 0."""
    out = 0.0
    if a > 0:
        out += a * math.log(a / b)
    if a < 1:
        out += (1 - a) * math.log((1 - a) / (1 - b))
    return out


def pvalue_binomial(loss_sum: float, n: int, epsilon: float) -> float:
    """p-value for H0: risk > ε from k = loss_sum errors (0/1 losses) out of n."""
    return binom_cdf(loss_sum, n, epsilon)


def pvalue_hb(loss_sum: float, n: int, epsilon: float) -> float:
    """Hoeffding-Bentkus p-value for H0: risk > ε from n losses in [0, 1] summing to loss_sum."""
    risk = loss_sum / n
    hoeffding = math.exp(-n * _kl_bernoulli(min(risk, epsilon), epsilon))
    bentkus = math.e * binom_cdf(math.ceil(loss_sum - 1e-9), n, epsilon)
    return float(min(1.0, hoeffding, bentkus))


_PVALUE = {"binomial": pvalue_binomial, "hb": pvalue_hb}


# ---- inputs --------------------------------------------------------------------------------------
def _array(x, name: str, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, wherever it lives
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise MeestralError(f"calibration: {name} is not a numeric array ({e}); pass a numpy array or tensor") from e
    return a


def _check_data(conf, agree):
    conf = _array(conf, "conf", np.float64)
    agree = _array(agree, "agree")
    if conf.ndim != 2 or agree.ndim != 2:
        raise MeestralError(
            f"calibration: conf must be [N, J] and agree [N, J+1], got shapes {conf.shape} and {agree.shape}; "
            "pass one row per token"
        )
    n, j = conf.shape
    if n == 0 or j == 0:
        raise MeestralError(f"calibration: no data (conf has shape {conf.shape}); gather confidences on some tokens first")
    if agree.shape != (n, j + 1):
        raise MeestralError(
            f"calibration: agree has shape {agree.shape} but conf {conf.shape} needs ({n}, {j + 1}) "
            "(one column per exit point plus full depth)"
        )
    if agree.dtype != bool:
        if not np.isin(agree, (0, 1)).all():
            raise MeestralError("calibration: agree must hold booleans (or 0/1); pass exit-vs-final token equality")
        agree = agree.astype(bool)
    if not agree[:, -1].all():
        raise MeestralError(
            "calibration: agree's last column (full depth) must be all True; append a True column for full depth"
        )
    if not np.isfinite(conf).all() or conf.max() > 1.0:
        raise MeestralError("calibration: confidences must be finite and at most 1; pass the exit heads' scores")
    return conf, agree


def _check_level(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 < v < 1.0:
        raise MeestralError(f"calibration: {name} must lie strictly between 0 and 1, got {value!r}")
    return v


def _check_groups(groups, n: int) -> np.ndarray:
    if groups is None:
        raise MeestralError("calibration: unit='sequence' needs groups (a sequence id per token); pass groups=")
    g = _array(groups, "groups").reshape(-1)
    if g.shape[0] != n:
        raise MeestralError(f"calibration: groups has {g.shape[0]} entries for {n} tokens; pass one sequence id per token")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def _check_grid(grid) -> np.ndarray:
    g = DEFAULT_GRID if grid is None else _array(grid, "grid", np.float64).reshape(-1)
    if g.size == 0 or not np.isfinite(g).all():
        raise MeestralError("calibration: the threshold grid must hold finite values; pass e.g. numpy.linspace(1, 0, 101)")
    return np.unique(g)[::-1]  # most conservative (largest) first


# ---- evaluation of one threshold -----------------------------------------------------------------
def exit_indices(conf, lam: float) -> np.ndarray:
    """Per token, the first exit point j with conf[j] > lam; J (full depth) when there is none
    (the exit rule, with one threshold shared by every exit point)."""
    from meestral.decoding.exit_rule import first_exit

    return first_exit(conf, [lam] * conf.shape[1])


def _layer_stats(idx: np.ndarray, layers, num_layers) -> dict:
    if layers is None:
        return {}
    layers = [int(l) for l in layers]
    if num_layers is None:
        raise MeestralError("calibration: layers were given without num_layers; pass both or neither")
    exit_layer = np.asarray(layers + [int(num_layers) - 1])[idx]
    return {"mean_exit_layer": float(exit_layer.mean()), "mean_layers_run": float(exit_layer.mean() + 1)}


def evaluate_threshold(conf, agree, lam: float, layers=None, num_layers: int | None = None) -> dict:
    """Agreement with the full model and exit rate when every exit point uses threshold `lam`.

    Returns dict(agreement, risk, exit_rate, exit_index [N] (J = full depth)); with `layers` (the J
    exit points) and `num_layers`, also mean_exit_layer and mean_layers_run (full depth = L-1).
    """
    conf, agree = _check_data(conf, agree)
    if layers is not None and len(layers) != conf.shape[1]:
        raise MeestralError(f"calibration: {len(layers)} layers for {conf.shape[1]} exit points; pass one per column of conf")
    idx = exit_indices(conf, float(lam))
    ok = agree[np.arange(len(idx)), idx]
    out = {
        "threshold": float(lam),
        "agreement": float(ok.mean()),
        "risk": float(1.0 - ok.mean()),
        "exit_rate": float((idx < conf.shape[1]).mean()),
        "exit_index": idx,
    }
    out.update(_layer_stats(idx, layers, num_layers))
    return out


# ---- calibration ---------------------------------------------------------------------------------
@dataclass
class Calibration:
    """The chosen threshold and the evidence for it."""

    threshold: float  # exit when confidence > threshold; 1.0 (and above) never exits
    epsilon: float
    delta: float
    method: str
    unit: str
    n: int  # independent units the p-values used (tokens or sequences)
    tokens: int
    grid: list = field(default_factory=list)  # [{threshold, risk, exit_rate, p_value, rejected}]
    calib_agreement: float = 1.0  # token-level, at the chosen threshold, on the calibration data
    calib_exit_rate: float = 0.0
    calib_mean_exit_layer: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(conf, agree, epsilon: float, delta: float, grid=None, method: str | None = None,
              unit: str = "token", groups=None, layers=None, num_layers: int | None = None) -> Calibration:
    """Learn-then-Test: the smallest grid threshold whose risk is <= epsilon with probability >= 1-delta.

    method: "binomial" (exact, 0/1 losses: unit="token" only) or "hb" (Hoeffding-Bentkus);
    default: binomial for tokens, hb for sequences. unit="sequence" needs `groups` (a sequence id
    per token). `layers`/`num_layers` add the mean exit layer to the result. Every grid point gets
    its risk and p-value; only those up to the first non-rejection are `rejected`.
    """
    conf, agree = _check_data(conf, agree)
    epsilon = _check_level(epsilon, "epsilon")
    delta = _check_level(delta, "delta")
    if unit not in UNITS:
        raise MeestralError(f"calibration: unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    method = method or ("binomial" if unit == "token" else "hb")
    if method not in METHODS:
        raise MeestralError(f"calibration: unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method == "binomial" and unit == "sequence":
        raise MeestralError(
            "calibration: the binomial p-value needs 0/1 losses but per-sequence risks are fractions; use method='hb'"
        )
    if layers is not None and len(layers) != conf.shape[1]:
        raise MeestralError(f"calibration: {len(layers)} layers for {conf.shape[1]} exit points; pass one per column of conf")
    lams = _check_grid(grid)
    N = conf.shape[0]
    if unit == "sequence":
        gid = _check_groups(groups, N)
        sizes = np.bincount(gid).astype(np.float64)
        n = len(sizes)
    else:
        n = N
    pvalue = _PVALUE[method]

    rows, going, chosen = [], True, None
    for lam in lams:
        idx = exit_indices(conf, lam)
        wrong = ~agree[np.arange(N), idx]
        if unit == "sequence":
            loss_sum = float((np.bincount(gid, weights=wrong, minlength=n) / sizes).sum())
        else:
            loss_sum = float(wrong.sum())
        p = pvalue(loss_sum, n, epsilon)
        rejected = going and p <= delta
        going = rejected
        if rejected:
            chosen = (float(lam), idx)
        rows.append({"threshold": float(lam), "risk": loss_sum / n, "exit_rate": float((idx < conf.shape[1]).mean()),
                     "p_value": p, "rejected": bool(rejected)})

    note = ""
    if chosen is None:
        # λ = 1 never exits because confidences are at most 1: always safe, whatever the data.
        threshold, idx = 1.0, np.full(N, conf.shape[1])
        note = (f"no threshold passed the test (n={n} {unit}s, epsilon={epsilon}, delta={delta}): the model never "
                "exits; give more calibration data or a larger epsilon")
    else:
        threshold, idx = chosen
    ok = agree[np.arange(N), idx]
    stats = _layer_stats(idx, layers, num_layers)
    return Calibration(threshold=threshold, epsilon=epsilon, delta=delta, method=method, unit=unit, n=n, tokens=N,
                       grid=rows, calib_agreement=float(ok.mean()),
                       calib_exit_rate=float((idx < conf.shape[1]).mean()),
                       calib_mean_exit_layer=stats.get("mean_exit_layer"), note=note)


# ---- splits ----------------------------------------------------------------------------------------
def split(n_units: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random calibration / held-out split of `n_units` sequences: (calib_ids, heldout_ids), sorted.

    Split sequences, not tokens, so no context is shared across the two sides; select a side's
    tokens with `numpy.isin(groups, calib_ids)`. `fraction` is the calibration share; both sides
    get at least one unit.
    """
    try:
        n_units = int(n_units)
    except (TypeError, ValueError):
        n_units = -1
    if n_units < 2:
        raise MeestralError(f"calibration split: need at least 2 sequences, got {n_units}; gather more held-out text")
    fraction = _check_level(fraction, "the calibration fraction")
    k = min(n_units - 1, max(1, round(fraction * n_units)))
    perm = np.random.default_rng(seed).permutation(n_units)
    return np.sort(perm[:k]), np.sort(perm[k:])


def calibrate_on_text(bb, heads, rows, epsilon: float, delta: float, calib_fraction: float = 0.5, seed: int = 0,
                      method: str | None = None, unit: str = "token", batch: int = 8) -> dict:
    """Calibrate `heads` on packed held-out text rows split by sequence, then measure the chosen
    threshold on the other part: the result `meestral calibrate` writes and the report reads."""
    from meestral.evaluation.scoring import calibration_data

    if rows.shape[0] < 2:
        raise MeestralError("calibration needs at least 2 held-out sequences: give more held-out tokens")
    conf, agree, groups = calibration_data(bb, heads, rows, batch)
    cal_ids, held_ids = split(rows.shape[0], calib_fraction, seed=seed)
    cal, held = np.isin(groups, cal_ids), np.isin(groups, held_ids)
    result = calibrate(conf[cal], agree[cal], epsilon, delta, method=method, unit=unit, groups=groups[cal],
                       layers=heads.exit_points, num_layers=bb.num_layers)
    ev = evaluate_threshold(conf[held], agree[held], result.threshold, heads.exit_points, bb.num_layers)
    out = result.to_dict()
    out.update({"heldout_agreement": ev["agreement"], "heldout_exit_rate": ev["exit_rate"],
                "heldout_mean_exit_layer": ev.get("mean_exit_layer"), "heldout_n": int(held.sum()),
                "exits": list(heads.exit_points),
                "note_policy": "calibrated on exact (catchup) hidden states; copy/propagate change later "
                               "tokens' states, so the guarantee holds for catchup and verify"})
    return out
