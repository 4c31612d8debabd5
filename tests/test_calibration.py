"""Learn-then-Test threshold calibration: exit logic, p-values, the guarantee itself (Monte Carlo),
fixed-sequence stopping and input checks."""

import json
import math

import numpy as np
import pytest

from meestral.errors import MeestralError
from meestral.evaluation import calibration as C

# ---- a synthetic world with a known risk curve ------------------------------------------------------
# J = 3 exit points; each exit point's confidence is drawn independently and uniformly from VALUES;
# exiting at exit point j with confidence c disagrees with the full model with probability
# (1 - c) * SLOPE[j]. The risk of a shared threshold λ is then, in closed form,
#   risk(λ) = sum_j F(λ)^j * sum_{v > λ} (1/10) (1 - v) SLOPE[j],   F(λ) = P(c <= λ).
VALUES = np.round(0.05 + 0.1 * np.arange(10), 10)
SLOPE = np.array([0.8, 0.5, 0.3])
GRID = np.round(np.linspace(1.0, 0.0, 11), 10)  # grid points fall between the confidence values


def true_risk(lam):
    F = (VALUES <= lam).mean()
    above = VALUES[VALUES > lam]
    return float(sum(F**j * ((1 - above) * s).sum() / len(VALUES) for j, s in enumerate(SLOPE)))


def draw(rng, n):
    conf = rng.choice(VALUES, size=(n, len(SLOPE)))
    wrong = rng.random((n, len(SLOPE))) < (1 - conf) * SLOPE
    agree = np.concatenate([~wrong, np.ones((n, 1), bool)], axis=1)
    return conf, agree


def oracle(eps, grid=GRID):
    """What fixed-sequence testing finds with infinite data: the last grid point (walking down from
    the top) before the first one whose true risk exceeds eps."""
    best = 1.0
    for lam in sorted(grid, reverse=True):
        if true_risk(lam) > eps:
            break
        best = lam
    return best


def test_true_risk_formula_matches_simulation():
    conf, agree = draw(np.random.default_rng(1), 400_000)
    for lam in GRID:
        got = C.evaluate_threshold(conf, agree, lam)["risk"]
        assert abs(got - true_risk(lam)) < 4e-3, lam


# ---- exit logic -------------------------------------------------------------------------------------
def test_evaluate_threshold_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    conf = rng.random((200, 4))
    agree = np.concatenate([rng.random((200, 4)) < 0.6, np.ones((200, 1), bool)], axis=1)
    layers, L = [1, 3, 5, 7], 10
    for lam in (0.0, 0.3, 0.75, 0.99, 1.0):
        idx, ok, depth = [], [], []
        for c, a in zip(conf, agree):
            j = next((j for j in range(4) if c[j] > lam), 4)
            idx.append(j)
            ok.append(a[j])
            depth.append(layers[j] if j < 4 else L - 1)
        out = C.evaluate_threshold(conf, agree, lam, layers=layers, num_layers=L)
        assert out["exit_index"].tolist() == idx
        assert out["agreement"] == pytest.approx(np.mean(ok))
        assert out["risk"] == pytest.approx(1 - np.mean(ok))
        assert out["exit_rate"] == pytest.approx(np.mean(np.array(idx) < 4))
        assert out["mean_exit_layer"] == pytest.approx(np.mean(depth))
        assert out["mean_layers_run"] == pytest.approx(np.mean(depth) + 1)


def test_threshold_is_strict():
    conf = np.array([[0.5, 0.5]])
    agree = np.array([[True, True, True]])
    assert C.evaluate_threshold(conf, agree, 0.5)["exit_index"].tolist() == [2]  # 0.5 > 0.5 is false
    assert C.evaluate_threshold(conf, agree, 0.49)["exit_index"].tolist() == [0]


# ---- p-values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,p", [(0, 10, 0.1), (3, 10, 0.1), (9, 10, 0.5), (10, 10, 0.3), (-1, 5, 0.2),
                                   (7, 60, 0.05), (40, 300, 0.2), (150, 300, 0.5)])
def test_binom_cdf_exact(k, n, p):
    ref = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, max(k, -1) + 1))
    assert C.binom_cdf(k, n, p) == pytest.approx(min(ref, 1.0), rel=1e-9, abs=1e-300)


def test_binom_cdf_large_n_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in [(900, 10_000, 0.1), (1000, 10_000, 0.1), (49_000, 500_000, 0.1), (12, 100_000, 1e-3)]:
        assert C.binom_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-7, abs=1e-300)


def test_hb_is_valid_and_no_sharper_than_the_exact_binomial():
    # For 0/1 losses the exact binomial tail is the sharpest valid p-value; HB bounds it from above.
    for n in (50, 1000):
        for k in range(0, n // 4, max(1, n // 100)):
            assert C.pvalue_hb(k, n, 0.1) >= C.pvalue_binomial(k, n, 0.1) * (1 - 1e-9)
    assert C.pvalue_hb(0.0, 10, 0.1) == pytest.approx(0.9**10)  # Hoeffding term at zero risk
    assert C.pvalue_hb(5.0, 10, 0.1) == 1.0


# ---- the known answer and the guarantee --------------------------------------------------------------
def test_large_sample_finds_the_oracle_threshold():
    risks = [true_risk(l) for l in GRID]
    assert all(b >= a for a, b in zip(risks, risks[1:]))  # monotone in this world
    k = next(i for i, r in enumerate(risks) if r > 0.1)
    eps = (risks[k - 1] + risks[k]) / 2  # between two grid points' risks
    best = oracle(eps)
    assert best == GRID[k - 1]
    conf, agree = draw(np.random.default_rng(2), 200_000)
    for method in ("binomial", "hb"):
        cal = C.calibrate(conf, agree, epsilon=eps, delta=0.1, grid=GRID, method=method)
        assert true_risk(cal.threshold) <= eps
        assert best <= cal.threshold <= best + 0.1 + 1e-9, (method, cal.threshold, best)
        assert cal.calib_exit_rate > 0.3


def _fail_rate(rng, draws, n, eps, delta, rule):
    fails = 0
    for _ in range(draws):
        conf, agree = draw(rng, n)
        fails += true_risk(rule(conf, agree, eps, delta)) > eps
    return fails / draws


def _ltt(conf, agree, eps, delta):
    return C.calibrate(conf, agree, epsilon=eps, delta=delta, grid=GRID).threshold


def _naive(conf, agree, eps, delta):
    """What the p-value guards against: walk down while the *empirical* risk is <= eps."""
    best = 1.0
    for lam in GRID:
        if C.evaluate_threshold(conf, agree, lam)["risk"] > eps:
            break
        best = lam
    return best


def test_guarantee_holds_over_many_calibration_sets():
    """P(risk(chosen λ) > ε) <= δ over repeated draws of the calibration set. ε sits just below
    one grid point's true risk, so any rule that trusts the empirical risk picks that point about
    half the time; the test is sharp there (the binomial p-value is exact)."""
    delta, n, draws = 0.1, 2000, 1000
    risks = [true_risk(l) for l in GRID]
    eps = next(r for r in risks if r > 0.08) - 0.001
    slack = 3 * math.sqrt(delta * (1 - delta) / draws)
    ltt = _fail_rate(np.random.default_rng(3), draws, n, eps, delta, _ltt)
    assert ltt <= delta + slack, ltt
    # The same check on the naive rule fails: the Monte Carlo has the power to see a broken p-value.
    naive = _fail_rate(np.random.default_rng(3), 300, n, eps, delta, _naive)
    assert naive > delta + 0.15, naive


def test_sequence_unit_guarantee_with_correlated_tokens():
    """Tokens of one sequence share a difficulty (errors cluster); per-sequence risks with the HB
    p-value keep the guarantee on the expected per-sequence risk."""
    delta, seqs, length, draws = 0.1, 100, 20, 400
    mults = np.array([0.2, 1.8])  # per-sequence difficulty, mean 1: expected risk = true_risk
    risks = [true_risk(l) for l in GRID]
    eps = next(r for r in risks if r > 0.08) - 0.001
    rng = np.random.default_rng(4)
    fails, exits = 0, 0
    for _ in range(draws):
        m = np.repeat(rng.choice(mults, size=seqs), length)
        conf = rng.choice(VALUES, size=(seqs * length, len(SLOPE)))
        wrong = rng.random(conf.shape) < np.minimum(1, (1 - conf) * SLOPE * m[:, None])
        agree = np.concatenate([~wrong, np.ones((len(conf), 1), bool)], axis=1)
        groups = np.repeat(np.arange(seqs), length)
        cal = C.calibrate(conf, agree, epsilon=eps, delta=delta, grid=GRID, unit="sequence", groups=groups)
        assert cal.method == "hb" and cal.n == seqs and cal.tokens == seqs * length
        fails += true_risk(cal.threshold) > eps
        exits += cal.threshold < 1.0
    assert fails / draws <= delta + 3 * math.sqrt(delta * (1 - delta) / draws)
    assert exits / draws > 0.5  # not vacuous: it usually does choose an exiting threshold


def test_fixed_sequence_stops_at_first_non_rejection():
    # Two exit points. Type A tokens: confidences (0.5, 0.7), right at exit 0, wrong at exit 1.
    # Type B: (0.9, 0.9), always right. Risk: λ=1.0: 0, 0.8: 0, 0.6: share of A, 0.4: 0 again.
    a, b = 300, 700
    conf = np.array([[0.5, 0.7]] * a + [[0.9, 0.9]] * b)
    agree = np.array([[True, False, True]] * a + [[True, True, True]] * b)
    cal = C.calibrate(conf, agree, epsilon=0.05, delta=0.1, grid=[0.4, 1.0, 0.6, 0.8])
    rows = {r["threshold"]: r for r in cal.grid}
    assert [r["threshold"] for r in cal.grid] == [1.0, 0.8, 0.6, 0.4]  # walked from the top
    assert rows[0.6]["risk"] == pytest.approx(0.3) and not rows[0.6]["rejected"]
    assert rows[0.4]["risk"] == 0.0 and rows[0.4]["p_value"] <= 0.1  # would pass alone...
    assert not rows[0.4]["rejected"]  # ...but the walk stopped at 0.6
    assert cal.threshold == 0.8
    assert cal.calib_agreement == 1.0 and cal.calib_exit_rate == pytest.approx(0.7)


def test_too_little_data_never_exits():
    conf, agree = draw(np.random.default_rng(5), 10)  # 0.9**10 = 0.35 > delta even at zero risk
    cal = C.calibrate(conf, agree, epsilon=0.1, delta=0.1, grid=GRID)
    assert cal.threshold == 1.0 and not any(g["rejected"] for g in cal.grid) and "never exits" in cal.note
    assert cal.calib_exit_rate == 0.0 and cal.calib_agreement == 1.0


def test_result_serialises_and_reports_layers():
    conf, agree = draw(np.random.default_rng(6), 5000)
    cal = C.calibrate(conf, agree, epsilon=0.1, delta=0.1, layers=[2, 4, 6], num_layers=8)
    d = json.loads(json.dumps(cal.to_dict()))
    assert d["threshold"] == cal.threshold < 1.0 and d["method"] == "binomial" and d["unit"] == "token"
    assert len(d["grid"]) == len(C.DEFAULT_GRID) == 111 and set(d["grid"][0]) == {"threshold", "risk", "exit_rate", "p_value", "rejected"}
    ev = C.evaluate_threshold(conf, agree, cal.threshold, layers=[2, 4, 6], num_layers=8)
    assert d["calib_mean_exit_layer"] == pytest.approx(ev["mean_exit_layer"])
    assert d["calib_agreement"] == pytest.approx(ev["agreement"])
    assert 2 <= d["calib_mean_exit_layer"] < 7


# ---- splits -------------------------------------------------------------------------------------------
def test_split_by_unit():
    cal, held = C.split(100, 0.3, seed=1)
    assert len(cal) == 30 and len(held) == 70
    assert not set(cal) & set(held) and sorted(set(cal) | set(held)) == list(range(100))
    assert np.array_equal(C.split(100, 0.3, seed=1)[0], cal)
    assert not np.array_equal(C.split(100, 0.3, seed=2)[0], cal)
    assert [len(s) for s in C.split(2, 0.01)] == [1, 1]  # both sides keep one unit


# ---- bad inputs ---------------------------------------------------------------------------------------
GOOD_CONF = np.full((4, 2), 0.5)
GOOD_AGREE = np.ones((4, 3), bool)


@pytest.mark.parametrize("kw", [
    dict(epsilon=0.0), dict(epsilon=1.0), dict(epsilon=-0.1), dict(epsilon=float("nan")), dict(epsilon="x"),
    dict(delta=0.0), dict(delta=1.5),
    dict(conf=np.zeros((0, 2)), agree=np.ones((0, 3), bool)),
    dict(conf=np.zeros(4)),
    dict(agree=np.ones((4, 2), bool)), dict(agree=np.ones((5, 3), bool)),
    dict(agree=np.array([[1, 1, 0]] * 4, bool)),  # full depth must agree
    dict(agree=np.full((4, 3), 2)),
    dict(conf=np.full((4, 2), np.nan)), dict(conf=np.full((4, 2), 1.5)),
    dict(method="bonferroni"), dict(unit="word"),
    dict(unit="sequence", method="binomial", groups=[0, 0, 1, 1]),
    dict(unit="sequence"), dict(unit="sequence", groups=[0, 1]),
    dict(grid=[]), dict(grid=[0.5, np.inf]),
    dict(layers=[1, 2, 3], num_layers=5), dict(layers=[1, 2]),
])
def test_bad_inputs_raise(kw):
    args = dict(conf=GOOD_CONF, agree=GOOD_AGREE, epsilon=0.1, delta=0.1) | kw
    with pytest.raises(MeestralError) as e:
        C.calibrate(**args)
    assert "\n" not in str(e.value)


def test_bad_evaluate_and_split_inputs_raise():
    with pytest.raises(MeestralError):
        C.evaluate_threshold(GOOD_CONF, np.ones((4, 2), bool), 0.5)
    for args in [(1, 0.5), (0, 0.5), (10, 0.0), (10, 1.0), ("many", 0.5)]:
        with pytest.raises(MeestralError):
            C.split(*args)
