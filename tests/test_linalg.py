"""loratool.maths on its own, against numpy written here (float64 references, stated tolerances)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loratool.adapter import LoraModule
from loratool.io.tensors import TensorRef
from loratool.maths.combine import disjoint_merge, majority_sign_mask, merge_dense, prune, weighted_concat
from loratool.maths.compare import product_fro_norm
from loratool.maths.delta import delta, factors
from loratool.maths.merge import Workspace, merge_blocked, merge_blocked_many, merged_tensor, realized_delta
from loratool.maths.svd import choose_rank, energy_rank, fro_retained, lowrank_svd, singular_values, truncate_dense


def _module(up: np.ndarray, down: np.ndarray, **kw) -> LoraModule:  # type: ignore[no-untyped-def]
    return LoraModule(name="m", down=TensorRef.from_tensor(torch.from_numpy(down).float()),
                      up=TensorRef.from_tensor(torch.from_numpy(up).float()), **kw)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# deltas


@pytest.mark.parametrize(("kind", "fan_in_fan_out", "rslora"), [
    ("linear", False, False), ("linear", True, False), ("linear", False, True), ("embedding", False, False),
])
def test_delta_layouts_and_scales(kind, fan_in_fan_out, rslora):
    rng = _rng(1)
    up, down = rng.standard_normal((6, 3)), rng.standard_normal((3, 5))
    m = _module(up, down, alpha=6.0, rslora=rslora, kind=kind, fan_in_fan_out=fan_in_fan_out)
    scale = 6.0 / math.sqrt(3) if rslora else 6.0 / 3
    want = scale * up.astype(np.float32).astype(np.float64) @ down.astype(np.float32).astype(np.float64)
    if kind == "embedding" or fan_in_fan_out:
        want = want.T  # stored (in, out): embedding (vocab, dim), GPT-2 Conv1D
    got = delta(m).double().numpy()
    assert got.shape == m.base_shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_conv_delta_is_the_flattened_product_reshaped():
    rng = _rng(2)
    up, down = rng.standard_normal((4, 2, 1, 1)), rng.standard_normal((2, 3, 3, 3))
    m = _module(up, down, alpha=2.0, kind="conv")
    up_f, down_f = factors(m)
    assert tuple(up_f.shape) == (4, 2) and tuple(down_f.shape) == (2, 27)
    want = (up.reshape(4, 2) @ down.reshape(2, 27)).reshape(4, 3, 3, 3)
    np.testing.assert_allclose(delta(m).double().numpy(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# exact low-rank SVD


@pytest.mark.parametrize("ill", [False, True])
def test_lowrank_svd_is_the_svd_of_the_product(ill):
    rng = _rng(3)
    up, down = rng.standard_normal((40, 6)), rng.standard_normal((6, 30))
    if ill:  # rank-deficient up: the Gram route would square the conditioning, so QR is taken
        up[:, 5] = up[:, 4]
    u, s, vh = (t.numpy() for t in lowrank_svd(torch.from_numpy(up), torch.from_numpy(down)))
    ref = np.linalg.svd(up @ down, compute_uv=False)[:6]
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-9 * ref[0])
    np.testing.assert_allclose((u * s) @ vh, up @ down, atol=1e-9 * ref[0])
    k = 5 if ill else 6
    np.testing.assert_allclose(u[:, :k].T @ u[:, :k], np.eye(k), atol=1e-9)
    np.testing.assert_allclose(vh[:k] @ vh[:k].T, np.eye(k), atol=1e-9)


def test_singular_values_include_the_scale():
    rng = _rng(4)
    up, down = rng.standard_normal((8, 2)), rng.standard_normal((2, 8))
    m = _module(up, down, alpha=-1.0)  # a negative alpha flips the delta, not the spectrum
    want = np.linalg.svd(0.5 * up.astype(np.float32).astype(np.float64) @ down.astype(np.float32), compute_uv=False)
    np.testing.assert_allclose(singular_values(m).numpy(), want[:2], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# rank rules

S = [4.0, 2.0, 1.0, 1.0]  # Σσ² = 22, Σσ = 8


@pytest.mark.parametrize(("method", "threshold", "rank"), [
    ("sv_ratio", 2.0, 2),  # keep σ ≥ 4/2
    ("sv_ratio", 1.0, 1),
    ("sv_ratio", 4.0, 4),
    ("sv_fro", 0.85, 1),  # sqrt(16/22) = 0.853
    ("sv_fro", math.sqrt(20 / 22), 2),  # met exactly at k = 2: the smallest k, no "+1"
    ("sv_fro", 1.0, 4),
    ("sv_cumulative", 0.75, 2),  # (4 + 2) / 8
    ("sv_cumulative", 0.76, 3),
    ("max_error", math.sqrt(2 / 22), 2),  # the error of keeping two is sqrt(1 + 1) / sqrt(22)
    ("max_error", 0.0, 4),
])
def test_choose_rank_is_the_smallest_rank_meeting_the_rule(method, threshold, rank):
    assert choose_rank(S, method, threshold) == rank
    assert choose_rank(torch.tensor(S), method, threshold) == rank
    assert choose_rank(S, method, threshold, cap=1) == 1


def test_rank_rule_edges():
    assert choose_rank([0.0, 0.0], "sv_fro", 0.9) == 1
    assert choose_rank([], "sv_fro", 0.9) == 1
    with pytest.raises(ValueError, match="unknown rank method"):
        choose_rank(S, "sv_magic", 0.9)
    assert fro_retained(S, 2) == pytest.approx(math.sqrt(20 / 22))
    assert fro_retained([0.0], 1) == 1.0
    assert energy_rank(S, 0.9) == 2  # 20/22 ≥ 0.9 > 16/22


# ---------------------------------------------------------------------------------------------
# combine maths


def test_weighted_concat_is_the_exact_weighted_sum():
    rng = _rng(5)
    terms = [(rng.standard_normal((7, r)), rng.standard_normal((r, 9)), c) for r, c in ((2, 0.5), (3, -2.0))]
    up, down = weighted_concat([(torch.from_numpy(u), torch.from_numpy(d), c) for u, d, c in terms])
    assert tuple(up.shape) == (7, 5) and tuple(down.shape) == (5, 9)
    want = sum(c * u @ d for u, d, c in terms)
    np.testing.assert_allclose((up @ down).numpy(), want, rtol=1e-12, atol=1e-12)
    assert product_fro_norm(up, down) == pytest.approx(np.linalg.norm(want), rel=1e-7)


def test_truncate_dense_is_the_best_rank_k_approximation():
    rng = _rng(6)
    m = rng.standard_normal((12, 10))
    up, down, s = truncate_dense(torch.from_numpy(m), 3)
    ref = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(s.double().numpy(), ref, rtol=1e-5)
    err = np.linalg.norm(m - (up @ down).double().numpy())
    assert err == pytest.approx(math.sqrt((ref[3:] ** 2).sum()), rel=1e-4)  # Eckart-Young


def test_prune():
    t = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    kept = prune(t, 0.5, "magnitude")
    assert torch.equal(kept, torch.tensor([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))
    assert prune(t, 1.0, "random") is t
    gen, ref_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    mask = torch.bernoulli(torch.full(t.shape, 0.5), generator=ref_gen)
    assert torch.equal(prune(t, 0.5, "random", rescale=True, generator=gen), t * mask / 0.5)


def test_sign_election_and_disjoint_mean():
    stacked = torch.tensor([[1.0, -3.0, 2.0], [-2.0, 1.0, 0.0], [-0.5, 1.0, 4.0]])
    total = majority_sign_mask(stacked, "total")  # column sums -1.5, -1, 6
    assert total.tolist() == [[False, True, True], [True, False, False], [True, False, True]]
    freq = majority_sign_mask(stacked, "frequency")  # sign sums -1, 1, 2
    assert freq.tolist() == [[False, False, True], [True, True, False], [True, True, True]]
    merged = disjoint_merge(stacked, total)
    np.testing.assert_allclose(merged.numpy(), [(-2.0 - 0.5) / 2, -3.0, (2.0 + 4.0) / 2])


def test_merge_dense_ties_against_numpy():
    rng = _rng(8)
    deltas = [rng.standard_normal((5, 6)) for _ in range(3)]
    weights = [0.7, -0.4, 1.3]
    got = merge_dense([torch.from_numpy(d) for d in deltas], weights, "ties", density=1.0).numpy()
    stacked = np.stack(deltas)
    elected = np.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == elected
    weighted = stacked * np.array(weights)[:, None, None]
    want = (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    linear = merge_dense([torch.from_numpy(d) for d in deltas], weights, "magnitude_prune", density=1.0)
    np.testing.assert_allclose(linear.numpy(), sum(w * d for w, d in zip(weights, deltas)), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown dense merge"):
        merge_dense([torch.zeros(1)], [1.0], "average", density=1.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape,block", [((37, 29), 64), ((64, 48), 48 * 64), ((9, 4, 3, 3), 50), ((300, 7), 1 << 18)])
@pytest.mark.parametrize("factor,threads", [(1.0, 1), (-0.5, 3)])
def test_merge_blocked_against_the_whole_tensor_path_and_float64(dtype, shape, block, factor, threads):
    """The cache-blocked merge (one pass per row block: its rows of B @ A, scale, widen, add, cast,
    measure) against merged_tensor + a cast + realized_delta on whole tensors, and against a float64
    numpy reference. One block holding every row forms the same product as the whole path: identical
    stored bits. Shorter blocks may have their rows of B @ A summed in another order by the BLAS (it
    did here for 1 and 3 rows): within one float32 rounding of the product, hence within one step of
    the stored dtype of the exact result, and the same realized-delta figures to float32 tolerance.
    Blocks that do not divide the rows check the tail block."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f = shape[0], math.prod(shape[1:])
    kind = "conv" if len(shape) == 4 else "linear"
    down = torch.randn(3, *shape[1:], generator=g) if kind == "conv" else torch.randn(3, in_f, generator=g)
    up = torch.randn(out_f, 3, *([1, 1] if kind == "conv" else []), generator=g)
    m = LoraModule("m", TensorRef.from_tensor(down), TensorRef.from_tensor(up), alpha=6.0, kind=kind)
    stored = (torch.randn(shape, generator=g) * 3).to(getattr(torch, dtype))
    w, new, _ = merged_tensor(stored, [(m, abs(factor))], device="cpu", unmerge=factor < 0)
    want = new.to(getattr(torch, dtype))
    w_norm = float(w.norm())
    dd_root, de_sum, err_norm, worst = realized_delta(w, new.clone(), want)
    out = torch.empty(shape, dtype=getattr(torch, dtype))
    r = merge_blocked(stored, m, factor, out, work=Workspace(), block=block, threads=threads)
    one_block = block >= stored.numel()
    if one_block:
        assert torch.equal(out.view(torch.uint8) if dtype != "float32" else out.view(torch.int32),
                           want.view(torch.uint8) if dtype != "float32" else want.view(torch.int32))
        assert r.worst == worst  # a maximum does not depend on the order
        assert (r.lo, r.hi) == tuple(float(v) for v in torch.aminmax(new))
    # float64 reference: W + factor · (alpha / r) · B @ A, then one rounding to the stored dtype
    ref = stored.double().numpy().reshape(out_f, -1) + factor * 2.0 * (
        up.double().numpy().reshape(out_f, 3) @ down.double().numpy().reshape(3, -1))
    step = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -23}[dtype]
    got = out.double().numpy().reshape(out_f, -1)
    assert np.all(np.abs(got - ref) <= step * np.abs(ref) + 1e-6 * np.abs(ref).max())
    assert r.dd_root == pytest.approx(dd_root, rel=1e-5)
    assert r.de_sum == pytest.approx(de_sum, rel=1e-4, abs=1e-6 * dd_root ** 2)
    assert r.err_norm == pytest.approx(err_norm, rel=1e-3 if not one_block and dtype == "float32" else 1e-4,
                                       abs=1e-9 + 1e-6 * dd_root)
    assert r.worst <= 2 * worst + 1e-6 * dd_root  # the largest storage rounding stays a rounding
    assert r.w_norm == pytest.approx(w_norm, rel=1e-5)
    assert (r.lo, r.hi) == pytest.approx(tuple(float(v) for v in torch.aminmax(new)), rel=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_merge_blocked_many_is_merge_blocked_of_each(threads):
    """Many jobs queued at once (the experts of a fused tensor) give each job's merge_blocked bits and
    figures, in job order, and never write outside each job's output; a failure while the jobs are
    made comes up as it is."""
    g = torch.Generator().manual_seed(1)
    stored = torch.randn(6, 40, 24, generator=g).to(torch.bfloat16)
    jobs = []
    for e in range(6):
        m = LoraModule(f"e{e}", TensorRef.from_tensor(torch.randn(2 + e % 3, 24, generator=g)),
                       TensorRef.from_tensor(torch.randn(40, 2 + e % 3, generator=g)), alpha=4.0)
        jobs.append((stored[e], m, 1.0 if e % 2 else -0.5))
    out = torch.zeros(7, 40, 24, dtype=torch.bfloat16)  # row 6: never a job's
    got = merge_blocked_many([(w, m, f, out[e]) for e, (w, m, f) in enumerate(jobs)], work=Workspace(), block=200,
                             threads=threads)
    for e, (w, m, f) in enumerate(jobs):
        one = torch.empty(40, 24, dtype=torch.bfloat16)
        want = merge_blocked(w, m, f, one, work=Workspace(), block=200, threads=threads)
        assert torch.equal(out[e].view(torch.int16), one.view(torch.int16))
        assert got[e] == want
    assert not out[6].any()

    def failing():  # type: ignore[no-untyped-def]
        yield stored[0], jobs[0][1], 1.0, out[0]
        raise RuntimeError("factors unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        merge_blocked_many(failing(), work=Workspace(), block=200, threads=threads)


def test_merge_blocked_stops_at_nan():
    m = LoraModule("m", TensorRef.from_tensor(torch.ones(1, 4)), TensorRef.from_tensor(torch.ones(8, 1)), alpha=1.0)
    stored = torch.zeros(8, 4)
    stored[5, 2] = float("nan")
    for threads in (1, 2):  # one range, or several ranges whose partial results are combined
        r = merge_blocked(stored, m, 1.0, torch.empty(8, 4), work=Workspace(), block=8,
                          threads=threads)
        assert math.isnan(r.lo) and math.isnan(r.hi)
    stored[5, 2] = float("inf")
    for threads in (1, 2):
        r = merge_blocked(stored, m, 1.0, torch.empty(8, 4), work=Workspace(), block=8,
                          threads=threads)
        assert r.hi == math.inf and r.lo == 1.0
