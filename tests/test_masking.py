"""Masking against the specification: counts, covers, exact AMT / uniform distributions, maps.

The references here are written from the specification in plain numpy (exact enumeration of
sequential draws without replacement, `Generator.choice`, `scipy.ndimage.map_coordinates`), not
from the implementation. Statistical tests use fixed seeds and thresholds that the wrong models
checked alongside them fail by many orders of magnitude.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats

from mvmae_jax import masking

P_MIN = 1e-3  # chi-square p-value a correct sampler must exceed (fixed seeds: deterministic)


# --------------------------------------------------------------------------------------------
# Helpers (independent numpy references).


def _assert_cover(masks: masking.Masks, batch: int, num_patches: int, n_mask: int,
                  n_throw: int) -> None:
    """Exact shapes, int32, and each row of visible | masked | thrown a permutation of 0..N-1."""
    n_vis = num_patches - n_mask - n_throw
    assert masks.visible.shape == (batch, n_vis)
    assert masks.masked.shape == (batch, n_mask)
    assert masks.thrown.shape == (batch, n_throw)
    for field in masks:
        assert field.dtype == jnp.int32
    rows = np.concatenate([np.asarray(m) for m in masks], axis=1)
    np.testing.assert_array_equal(np.sort(rows, axis=1),
                                  np.broadcast_to(np.arange(num_patches), rows.shape))


def _outcome_codes(masked: np.ndarray, thrown: np.ndarray, num_patches: int) -> np.ndarray:
    """One integer per row for the pair (masked set, thrown set): two bit sets side by side."""
    masked = np.asarray(masked, np.int64)
    thrown = np.asarray(thrown, np.int64)
    return (1 << masked).sum(axis=1) + ((1 << thrown).sum(axis=1) << num_patches)


def _exact_outcome_probs(weights: np.ndarray, eps: float, n_mask: int,
                         n_throw: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact P(masked set, thrown set) for sequential draws without replacement, p ∝ w + eps.

    Enumerates every ordered sequence of the first n_mask + n_throw draws; returns the sorted
    outcome codes (as `_outcome_codes`) and their probabilities.
    """
    p = (np.asarray(weights, np.float64) + eps)
    p = p / p.sum()
    num_patches = len(p)
    probs: dict[int, float] = {}
    for seq in itertools.permutations(range(num_patches), n_mask + n_throw):
        prob, left = 1.0, 1.0
        for d in seq:
            prob *= p[d] / left
            left -= p[d]
        code = int(_outcome_codes(np.array([seq[:n_mask]]), np.array([seq[n_mask:]]),
                                  num_patches)[0])
        probs[code] = probs.get(code, 0.0) + prob
    codes = np.array(sorted(probs), np.int64)
    return codes, np.array([probs[c] for c in codes])


def _chi2_pvalue(codes: np.ndarray, exact_codes: np.ndarray, exact_probs: np.ndarray) -> float:
    """Chi-square goodness of fit of observed outcome codes to exact probabilities.

    Cells whose expected count is below 5 are pooled into one cell (an outcome the exact model
    gives ~0 probability to therefore still blows up the statistic if it is observed). An outcome
    the exact model does not know at all fails outright.
    """
    idx = np.searchsorted(exact_codes, codes)
    idx = np.minimum(idx, len(exact_codes) - 1)
    assert np.all(exact_codes[idx] == codes), "an outcome outside the model's support"
    counts = np.bincount(idx, minlength=len(exact_codes))
    expected = exact_probs / exact_probs.sum() * len(codes)
    small = expected < 5
    f_obs = np.append(counts[~small], counts[small].sum())
    f_exp = np.append(expected[~small], expected[small].sum())
    if not small.any():
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    return float(stats.chisquare(f_obs, f_exp).pvalue)


@functools.cache
def _jit_amt(n_mask: int, n_throw: int, **kwargs):
    return jax.jit(functools.partial(masking.amt_masking, num_masked=n_mask,
                                     num_thrown=n_throw, **kwargs))


@functools.cache
def _jit_random(batch: int, num_patches: int, n_mask: int):
    return jax.jit(functools.partial(masking.random_masking, batch_size=batch,
                                     num_patches=num_patches, num_masked=n_mask))


# --------------------------------------------------------------------------------------------
# mask_counts.


@pytest.mark.parametrize("n, mask_ratio, throw_ratio, expected", [
    (196, 0.45, 0.40, (88, 78, 30)),
    (196, 0.8, 0.0, (156, 0, 40)),
    (196, 0.75, 0.0, (147, 0, 49)),
    (196, 0.75, None, (147, 0, 49)),  # throw_ratio defaults to 0
    (16, 0.5, 0.25, (8, 4, 4)),
    (10, 0.0, 0.0, (0, 0, 10)),
    (49, 0.6, 0.1, (29, 5, 15)),  # int(29.4) = 29, int(34.3) - 29 = 5
])
def test_mask_counts_known_values(n, mask_ratio, throw_ratio, expected):
    """The AMT rounding convention gives the known (n_mask, n_throw, n_vis) counts."""
    args = (n, mask_ratio) if throw_ratio is None else (n, mask_ratio, throw_ratio)
    assert masking.mask_counts(*args) == expected
    n_mask, n_throw, n_vis = expected
    assert n_mask + n_throw + n_vis == n


@pytest.mark.parametrize("n, mask_ratio, throw_ratio", [
    (196, 0.9, 0.1),  # 176 + 20 = 196: nothing visible
    (4, 0.75, 0.25),
    (10, 0.5, 0.6),  # masked + thrown would exceed N
])
def test_mask_counts_rejects_no_visible_patch(n, mask_ratio, throw_ratio):
    """Ratios that leave no visible patch raise ValueError."""
    with pytest.raises(ValueError):
        masking.mask_counts(n, mask_ratio, throw_ratio)


# --------------------------------------------------------------------------------------------
# Covers.


def test_random_masking_cover_under_jit():
    """Jitted random masking (static keyword counts): exact shapes, int32, a cover per row."""
    batch, num_patches, n_mask = 8, 16, 12
    fn = _jit_random(batch, num_patches, n_mask)
    masks = fn(jax.random.key(0))
    _assert_cover(masks, batch, num_patches, n_mask, 0)
    # Rows are not all the same, a new key gives a new mask and the same key the same one.
    masked = np.asarray(masks.masked)
    assert len({tuple(sorted(r)) for r in masked}) > 1
    again = fn(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again.masked), masked)
    other = fn(jax.random.key(1))
    assert not np.array_equal(np.asarray(other.masked), masked)


@pytest.mark.parametrize("n_mask, n_throw", [(8, 4), (11, 0)])
def test_amt_masking_cover_under_jit(n_mask, n_throw):
    """Jitted AMT masking (static keyword counts, thrown empty or not): shapes, int32, cover.

    The weights include an all-zero row, a row that is ~90 % zeros and one that is half zeros.
    """
    batch, num_patches = 8, 16
    rng = np.random.default_rng(5)
    weights = rng.random((batch, num_patches)).astype(np.float32)
    weights[0] = 0.0
    weights[1] *= np.arange(num_patches) == 3
    weights[2, ::2] = 0.0
    masks = _jit_amt(n_mask, n_throw)(jax.random.key(4), jnp.asarray(weights))
    _assert_cover(masks, batch, num_patches, n_mask, n_throw)


# --------------------------------------------------------------------------------------------
# AMT distribution.

# Non-uniform weights with a zero; the second row is a permutation of the first, so that each
# row must follow its own weights.
_AMT_WEIGHTS = np.array([0.9, 0.5, 0.3, 0.15, 0.05, 0.0])
_AMT_PERM = np.array([3, 5, 0, 4, 1, 2])
_AMT_ROWS = 16000  # samples per weight row
_NUMPY_ROWS = 6000  # numpy `choice` is slow (~0.1 ms a call)


@functools.cache
def _numpy_choice_orders() -> np.ndarray:
    """(6000, N) draw orders of _AMT_WEIGHTS by numpy's choice(replace=False, p=(w+eps)/sum)."""
    p = (_AMT_WEIGHTS + 1e-6) / (_AMT_WEIGHTS + 1e-6).sum()
    rng = np.random.default_rng(0)
    n = len(p)
    return np.stack([rng.choice(n, size=n, replace=False, p=p) for _ in range(_NUMPY_ROWS)])


def test_amt_exact_reference_and_power():
    """The exact enumeration fits numpy's own sampler, and rejects plausible wrong samplers.

    Proves the chi-square test used on `amt_masking` is both right (numpy's
    choice(replace=False) passes) and strong: uniform masking, sorting (w + eps) * U, masking
    sets with P ∝ prod(p), or throwing uniformly among the rest are each rejected at
    p < 1e-10 with as many samples as `amt_masking` gets.
    """
    eps, n_mask, n_throw, n = 1e-6, 2, 1, _AMT_ROWS
    num_patches = len(_AMT_WEIGHTS)
    codes, probs = _exact_outcome_probs(_AMT_WEIGHTS, eps, n_mask, n_throw)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)
    p = (_AMT_WEIGHTS + eps) / (_AMT_WEIGHTS + eps).sum()
    rng = np.random.default_rng(1)

    def pvalue(order):
        return _chi2_pvalue(_outcome_codes(order[:, :n_mask], order[:, n_mask:n_mask + n_throw],
                                           num_patches), codes, probs)

    assert pvalue(_numpy_choice_orders()) > P_MIN

    def gumbel_order(log_p):
        return np.argsort(-(log_p + rng.gumbel(size=(n, num_patches))), axis=1)

    wrong = {}
    wrong["uniform"] = np.argsort(rng.random((n, num_patches)), axis=1)
    wrong["scaled_uniform"] = np.argsort(-(_AMT_WEIGHTS + eps) * rng.random((n, num_patches)),
                                         axis=1)
    order = gumbel_order(np.log(p))
    rest = order[:, n_mask:]
    shuffled = np.take_along_axis(rest, np.argsort(rng.random(rest.shape), axis=1), axis=1)
    wrong["thrown_uniform"] = np.concatenate([order[:, :n_mask], shuffled], axis=1)
    # Masked set with P ∝ product of p (conditional Poisson), then the rest drawn as AMT.
    sets = np.array(list(itertools.combinations(range(num_patches), n_mask)))
    set_probs = np.prod(p[sets], axis=1)
    picked = sets[rng.choice(len(sets), size=n, p=set_probs / set_probs.sum())]
    in_set = np.zeros((n, num_patches), bool)
    np.put_along_axis(in_set, picked, True, axis=1)
    rest = gumbel_order(np.where(in_set, -np.inf, np.log(p)))[:, :num_patches - n_mask]
    wrong["product"] = np.concatenate([picked, rest], axis=1)
    for name, order in wrong.items():
        assert pvalue(order) < 1e-10, name


def test_amt_masking_matches_exact_distribution():
    """amt_masking's (masked set, thrown set) follows the exact without-replacement law.

    One jitted call over 2 x 16000 rows (alternating two weight rows, one a permutation of the
    other); each half passes a chi-square test against the exact enumerated probabilities, and
    the per-patch masked / thrown frequencies match a numpy `choice(replace=False)` Monte Carlo.
    """
    eps, n_mask, n_throw, n = 1e-6, 2, 1, _AMT_ROWS
    num_patches = len(_AMT_WEIGHTS)
    rows = np.stack([_AMT_WEIGHTS, _AMT_WEIGHTS[_AMT_PERM]]).astype(np.float32)
    weights = np.tile(rows, (n, 1))
    masks = _jit_amt(n_mask, n_throw)(jax.random.key(42), jnp.asarray(weights))
    _assert_cover(masks, 2 * n, num_patches, n_mask, n_throw)
    masked, thrown = np.asarray(masks.masked), np.asarray(masks.thrown)
    for r in range(2):
        codes, probs = _exact_outcome_probs(rows[r].astype(np.float64), eps, n_mask, n_throw)
        observed = _outcome_codes(masked[r::2], thrown[r::2], num_patches)
        assert _chi2_pvalue(observed, codes, probs) > P_MIN, f"weight row {r}"

    # Per-patch marginals against numpy's sampler without replacement (two-sample, 5 sigma).
    ref = _numpy_choice_orders()
    for name, got, want in [
        ("masked", masked[0::2], ref[:, :n_mask]),
        ("thrown", thrown[0::2], ref[:, n_mask:n_mask + n_throw]),
    ]:
        f_got = np.bincount(got.ravel(), minlength=num_patches) / len(got)
        f_want = np.bincount(want.ravel(), minlength=num_patches) / len(want)
        pq = np.maximum(f_want * (1 - f_want), 1e-4)
        sigma = np.sqrt(pq * (1 / len(got) + 1 / len(want)))
        assert np.all(np.abs(f_got - f_want) < 5 * sigma), (name, f_got, f_want)
    # The zero-weight patch (index 5 in row 0) is essentially never masked or thrown.
    assert np.sum(masked[0::2] == 5) + np.sum(thrown[0::2] == 5) <= 2


def test_amt_masking_uses_eps():
    """With a large eps the zero-weight patch gets drawn with probability ∝ eps, exactly."""
    eps, n_mask, n_throw, n = 0.2, 2, 1, 12000
    num_patches = len(_AMT_WEIGHTS)
    weights = jnp.tile(jnp.asarray(_AMT_WEIGHTS, jnp.float32), (n, 1))
    masks = _jit_amt(n_mask, n_throw, eps=eps)(jax.random.key(7), weights)
    observed = _outcome_codes(np.asarray(masks.masked), np.asarray(masks.thrown), num_patches)
    codes, probs = _exact_outcome_probs(_AMT_WEIGHTS, eps, n_mask, n_throw)
    assert _chi2_pvalue(observed, codes, probs) > P_MIN
    # The same samples against the default eps model are rejected (the test can tell them apart).
    codes0, probs0 = _exact_outcome_probs(_AMT_WEIGHTS, 1e-6, n_mask, n_throw)
    assert _chi2_pvalue(observed, codes0, probs0) < 1e-10


# --------------------------------------------------------------------------------------------
# Zero weights.


def test_amt_masking_all_zero_rows_are_uniform():
    """All-zero rows: valid covers and every (masked, thrown) outcome equally likely.

    A NaN or -inf score would give a fixed or degenerate order and fail the chi-square test.
    """
    n, num_patches = 2 * _AMT_ROWS, 6  # the shape of the distribution test: no new compile
    masks = _jit_amt(2, 1)(jax.random.key(1), jnp.zeros((n, num_patches), jnp.float32))
    _assert_cover(masks, n, num_patches, 2, 1)
    codes, probs = _exact_outcome_probs(np.zeros(num_patches), 1e-6, 2, 1)
    np.testing.assert_allclose(probs, 1 / len(probs))
    observed = _outcome_codes(np.asarray(masks.masked), np.asarray(masks.thrown), num_patches)
    assert _chi2_pvalue(observed, codes, probs) > P_MIN


def test_amt_masking_positive_weights_are_masked():
    """Weights [1, 1, 0, ...], num_masked=2: patches 0 and 1 are masked in (nearly) every row.

    The thrown ones are then uniform over the zero-weight patches.
    """
    n, num_patches = 4000, 16
    weights = np.zeros((n, num_patches), np.float32)
    weights[:, :2] = 1.0
    masks = _jit_amt(2, 3)(jax.random.key(2), jnp.asarray(weights))
    _assert_cover(masks, n, num_patches, 2, 3)
    hits = np.all(np.sort(np.asarray(masks.masked), axis=1) == [0, 1], axis=1)
    assert hits.mean() >= 0.999
    thrown_counts = np.bincount(np.asarray(masks.thrown).ravel(), minlength=num_patches)
    assert thrown_counts[:2].sum() <= 2
    assert stats.chisquare(thrown_counts[2:]).pvalue > P_MIN


# --------------------------------------------------------------------------------------------
# Random masking distribution.


def test_random_masking_uniform():
    """Masked sets are uniform over the C(N, k) subsets, and consecutive rows are independent.

    The test's power is checked too: a sampler mildly biased towards low indices is rejected.
    """
    n, num_patches, n_mask = 12000, 6, 2
    masks = _jit_random(n, num_patches, n_mask)(jax.random.key(11))
    _assert_cover(masks, n, num_patches, n_mask, 0)
    subsets = np.array(list(itertools.combinations(range(num_patches), n_mask)))
    subset_codes = (1 << subsets).sum(axis=1)
    order = np.argsort(subset_codes)

    def cells(masked):
        codes = (1 << np.asarray(masked, np.int64)).sum(axis=1)
        found = order[np.searchsorted(subset_codes[order], codes)]
        assert np.all(subset_codes[found] == codes)
        return found

    got = cells(masks.masked)
    assert stats.chisquare(np.bincount(got, minlength=len(subsets))).pvalue > P_MIN
    # Independence between rows: the joint of (row 2i, row 2i + 1) is uniform over 15 x 15.
    pairs = got[0::2] * len(subsets) + got[1::2]
    assert stats.chisquare(np.bincount(pairs, minlength=len(subsets) ** 2)).pvalue > P_MIN
    # Power: a mildly biased sampler (weights 1.3 .. 0.8) fails the same subset test.
    rng = np.random.default_rng(0)
    log_bias = np.log(np.linspace(1.3, 0.8, num_patches))
    biased = np.argsort(-(log_bias + rng.gumbel(size=(n, num_patches))), axis=1)[:, :n_mask]
    assert stats.chisquare(np.bincount(cells(biased), minlength=len(subsets))).pvalue < 1e-10


# --------------------------------------------------------------------------------------------
# cls_attention_map.


def test_cls_attention_map_hand_example():
    """Per-head min-max normalisation (a constant head gives zeros), then the mean over heads."""
    attention = np.array([[[0.1, 0.3, 0.5, 0.2],
                           [0.25, 0.25, 0.25, 0.25],  # constant head
                           [4.0, 0.0, 2.0, 1.0]]], np.float32)
    # head 0 → [0, .5, 1, .25]; head 1 → 0; head 2 → [1, 0, .5, .25].
    expected = np.array([[1 / 3, 1 / 6, 1 / 2, 1 / 6]])
    got = np.asarray(jax.jit(masking.cls_attention_map)(jnp.asarray(attention)))
    assert got.shape == (1, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_cls_attention_map_random_and_range():
    """Matches a numpy reference on random input; values lie in [0, 1] with no NaN."""
    rng = np.random.default_rng(0)
    attention = rng.gamma(0.5, size=(3, 4, 10)).astype(np.float32)
    attention[1, 2] = 0.7  # a constant head
    low = attention.min(-1, keepdims=True)
    span = attention.max(-1, keepdims=True) - low
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(span > 0, (attention - low) / span, 0.0)
    expected = normalised.mean(axis=1)
    got = np.asarray(jax.jit(masking.cls_attention_map)(jnp.asarray(attention)))
    assert got.shape == (3, 10)
    assert np.all(np.isfinite(got)) and got.min() >= 0.0 and got.max() <= 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_cls_attention_map_no_gradient():
    """No gradient flows through the map: d(weighted sum of the output)/d(input) is all zero."""
    rng = np.random.default_rng(1)
    attention = jnp.asarray(rng.random((2, 3, 8)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(masking.cls_attention_map(a) * cotangent)))(
        attention)
    assert grad.shape == attention.shape
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # The same function without the map has a non-zero gradient (the check can fail).
    grad_plain = jax.jit(jax.grad(lambda a: jnp.sum(a.mean(axis=1) * cotangent)))(attention)
    assert np.abs(np.asarray(grad_plain)).max() > 0


# --------------------------------------------------------------------------------------------
# align_bank_maps.

_GRID = (4, 6)  # non-square, so that a swapped y / x fails
_BOXES = np.array([
    [0.0, 0.0, 1.0, 1.0],  # the whole image
    [0.25, 0.1, 0.5, 0.6],  # inside, no clamping
    [0.0, 0.0, 0.3, 0.3],  # top-left corner: clamped on both axes
    [0.7, 0.75, 0.3, 0.25],  # bottom-right corner: clamped on both axes
    [0.1, 0.3, 0.9, 0.7],  # touches bottom and right edges
    [0.4, 0.4, 0.1, 0.1],  # tiny crop
], np.float32)


def _view_source_positions(box, flip, grid_size):
    """(gh*gw, 2) source (y, x) fractions of a view's patch centres, row-major (the spec)."""
    gh, gw = grid_size
    top, left, height, width = (float(b) for b in box)
    out = []
    for i in range(gh):
        for j in range(gw):
            v, u = (i + 0.5) / gh, (j + 0.5) / gw
            if flip:
                u = 1.0 - u
            out.append((top + v * height, left + u * width))
    return np.array(out)


# One compiled function and one shape, (B, V) = (2, 12), for all the align tests.
_align = jax.jit(masking.align_bank_maps, static_argnums=3)


def _boxes_and_flips():
    """(2, 12, 4) boxes and (2, 12) flips: every box with both flip values, per example."""
    boxes = np.concatenate([_BOXES, _BOXES])
    flips = np.repeat([0, 1], len(_BOXES)).astype(np.int32)
    boxes = np.stack([boxes, boxes[::-1]])
    flips = np.stack([flips, flips[::-1]])
    return boxes, flips


def test_align_bank_maps_linear_map():
    """A linear map a*y + b*x + c resamples to its clamped analytic value at each view centre."""
    gh, gw = _GRID
    coeffs = np.array([[2.0, -3.0, 0.5], [-1.0, 4.0, 1.0]])
    cy = (np.arange(gh) + 0.5) / gh
    cx = (np.arange(gw) + 0.5) / gw
    bank = np.stack([a * cy[:, None] + b * cx[None, :] + c for a, b, c in coeffs])
    bank = bank.reshape(2, gh * gw).astype(np.float32)
    boxes, flips = _boxes_and_flips()
    got = np.asarray(_align(jnp.asarray(bank), jnp.asarray(boxes), jnp.asarray(flips), _GRID))
    assert got.shape == (2, boxes.shape[1], gh * gw)
    for b in range(2):
        a_, b_, c_ = coeffs[b]
        for v in range(boxes.shape[1]):
            pos = _view_source_positions(boxes[b, v], flips[b, v], _GRID)
            y = np.clip(pos[:, 0], 0.5 / gh, 1 - 0.5 / gh)
            x = np.clip(pos[:, 1], 0.5 / gw, 1 - 0.5 / gw)
            np.testing.assert_allclose(got[b, v], a_ * y + b_ * x + c_, atol=2e-5,
                                       err_msg=f"example {b} view {v}")


def test_align_bank_maps_full_box_identity_and_mirror():
    """The full-image box gives back the map itself, and its left-right mirror when flipped."""
    gh, gw = _GRID
    rng = np.random.default_rng(3)
    bank = rng.random((2, gh * gw)).astype(np.float32)
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0], np.float32), (2, 12, 1))
    flips = np.tile(np.array([0, 1], np.int32), (2, 6))
    got = np.asarray(_align(jnp.asarray(bank), jnp.asarray(boxes), jnp.asarray(flips), _GRID))
    mirror = bank.reshape(2, gh, gw)[:, :, ::-1].reshape(2, gh * gw)
    for v in range(12):
        np.testing.assert_allclose(got[:, v], mirror if v % 2 else bank, atol=1e-6)


def test_align_bank_maps_random_map_vs_scipy():
    """Random maps and boxes match scipy's order-1 map_coordinates with edge replication."""
    gh, gw = _GRID
    rng = np.random.default_rng(4)
    batch, views = 2, 12
    bank = rng.random((batch, gh * gw)).astype(np.float32)
    height = rng.uniform(0.1, 1.0, (batch, views))
    width = rng.uniform(0.1, 1.0, (batch, views))
    top = rng.uniform(0, 1, (batch, views)) * (1 - height)
    left = rng.uniform(0, 1, (batch, views)) * (1 - width)
    boxes = np.stack([top, left, height, width], axis=-1).astype(np.float32)
    flips = rng.integers(0, 2, (batch, views)).astype(np.int32)
    got = np.asarray(_align(jnp.asarray(bank), jnp.asarray(boxes), jnp.asarray(flips), _GRID))
    for b in range(batch):
        grid = bank[b].reshape(gh, gw).astype(np.float64)
        for v in range(views):
            pos = _view_source_positions(boxes[b, v], flips[b, v], _GRID)
            coords = np.stack([pos[:, 0] * gh - 0.5, pos[:, 1] * gw - 0.5])
            want = ndimage.map_coordinates(grid, coords, order=1, mode="nearest")
            np.testing.assert_allclose(got[b, v], want, atol=2e-5,
                                       err_msg=f"example {b} view {v}")
