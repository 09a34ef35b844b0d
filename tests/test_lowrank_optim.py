"""Tests for subjax.optim.projected / galore."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.fft
from optax.contrib import GaLoreDimensionNumbers

import subjax.optim as so


def _nbytes(tree) -> int:
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))


def _grads_seq(key, shapes, n):
    out = []
    for i in range(n):
        ks = jax.random.split(jax.random.fold_in(key, i), len(shapes))
        out.append({name: jax.random.normal(k, s) for (name, s), k in zip(shapes.items(), ks,
                                                                          strict=True)})
    return out


# --- exactness at full rank -----------------------------------------------------


@pytest.mark.standard_promotion
@pytest.mark.parametrize(
    "projector", ["svd", pytest.param("subspace", marks=pytest.mark.slow)]
)
def test_full_rank_exact_projector_matches_adam(key, projector):
    # rank = the smaller side of both matrices; the refreshed basis spans
    # everything and the Procrustes alignment maps it back to the identity, so
    # Adam in the projected coordinates is Adam.
    shapes = {"tall": (9, 5), "wide": (5, 9), "bias": (7,)}
    grads = _grads_seq(key, shapes, 7)
    params = jax.tree.map(jnp.zeros_like, grads[0])
    ref = optax.adam(1e-2)
    opt = optax.chain(
        so.projected(optax.scale_by_adam(), rank=5, refresh_every=3, projector=projector,
                     init_steps=30),
        optax.scale_by_learning_rate(1e-2),
    )
    s_ref, s = ref.init(params), opt.init(params)
    for g in grads:
        u_ref, s_ref = ref.update(g, s_ref, params)
        u, s = opt.update(g, s, params)
        for name in shapes:
            np.testing.assert_allclose(u[name], u_ref[name], rtol=2e-4, atol=1e-7)


@pytest.mark.standard_promotion
def test_low_rank_is_not_adam(key):
    # the previous test is not vacuous: at rank < side the update differs.
    grads = _grads_seq(key, {"w": (9, 5)}, 2)
    params = jax.tree.map(jnp.zeros_like, grads[0])
    u_ref, _ = optax.scale_by_adam().update(grads[0], optax.scale_by_adam().init(params))
    opt = so.projected(rank=2, refresh_every=1, projector="svd")
    u, _ = opt.update(grads[0], opt.init(params))
    assert float(jnp.max(jnp.abs(u["w"] - u_ref["w"]))) > 1e-2
    assert int(jnp.linalg.matrix_rank(u["w"])) == 2


# --- projector bases --------------------------------------------------------------


@pytest.mark.parametrize("projector", ["svd", "subspace", "dct", "random"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_projector_bases_orthonormal(key, projector, shape):
    g = jax.random.normal(key, shape)
    proj = so.make_projector(projector)
    n = min(shape)
    gt = g if shape[0] >= shape[1] else g.T
    st = proj.refresh(gt, proj.init(n, 6), jax.random.key(3), jnp.asarray(True))
    q = proj.basis(st, jax.random.key(3), n, 6)
    assert q.shape == (n, 6)
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=2e-5)


def test_svd_and_subspace_find_top_singular_subspace(key):
    k1, k2, k3 = jax.random.split(key, 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (60, 30)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (30, 30)))
    s = jnp.concatenate([jnp.linspace(10.0, 6.0, 4), jnp.linspace(1.0, 0.1, 26)])
    g = (u * s) @ v.T
    top = v[:, :4]
    for name in ["svd", "subspace"]:
        proj = so.make_projector(name)
        q = proj.basis(proj.refresh(g, proj.init(30, 4), k3, jnp.asarray(True)), k3, 30, 4)
        sines = jnp.linalg.svd(q - top @ (top.T @ q), compute_uv=False)
        assert float(jnp.max(sines)) < 1e-3, name


def test_dct_basis_matches_scipy_and_selection():
    n = 16
    idx = jnp.arange(n)
    c = np.asarray(so.dct_basis(n, idx))
    # scipy's orthonormal DCT-II matrix has the basis vectors as rows
    ref = scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    np.testing.assert_allclose(c, ref.T, atol=1e-5)
    # a gradient made of columns {2, 5, 11} selects exactly those
    coef = np.random.default_rng(0).normal(size=(20, 3)) * np.array([3.0, 2.0, 1.0])
    g = jnp.asarray(coef @ ref[[2, 5, 11], :], jnp.float32)
    proj = so.make_projector("dct")
    sel = proj.refresh(g, proj.init(n, 3), jax.random.key(0), jnp.asarray(True))
    assert sel.tolist() == [2, 5, 11]


def test_random_projector_regenerated_per_refresh(key):
    opt = so.projected(optax.identity(), rank=3, refresh_every=2, projector="random")
    g = {"w": jax.random.normal(key, (12, 8))}
    st = opt.init(g)
    assert isinstance(st.projector_state["w"], optax.MaskedNode)  # nothing stored
    outs = []
    for _ in range(4):
        u, st = opt.update(g, st)
        outs.append(u["w"])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)  # same refresh period
    assert float(jnp.max(jnp.abs(outs[1] - outs[2]))) > 1e-3  # new basis after refresh


# --- state size -------------------------------------------------------------------


@pytest.mark.standard_promotion
@pytest.mark.parametrize("projector", ["subspace", "svd", "dct", "random"])
def test_state_bytes_linear_in_rank_times_sides(projector):
    def state_bytes(m, n, r):
        opt = so.projected(optax.scale_by_adam(), rank=r, refresh_every=10, projector=projector)
        return _nbytes(opt.init({"w": jnp.zeros((m, n), jnp.float32)}))

    r = 8
    for m, n in [(256, 64), (64, 256), (512, 128)]:
        big, small = max(m, n), min(m, n)
        basis = {"subspace": small * r * 4, "svd": small * r * 4, "dct": r * 4,
                 "random": 0}[projector]
        # counts: projected's int32 + adam's int32; Adam moments: 2 x (big x r) float32
        expected = 4 + 4 + basis + 2 * big * r * 4
        assert state_bytes(m, n, r) == expected
        # vs Adam's 2 m n floats: the ratio is about r / min(m, n) = 1/8 here
        assert expected < 0.15 * 2 * m * n * 4
    # doubling both sides doubles the state (O(r (m + n))), doubling r doubles it too
    b1, b2, b3 = state_bytes(256, 64, r), state_bytes(512, 128, r), state_bytes(256, 64, 2 * r)
    assert abs(b2 / b1 - 2.0) < 0.01
    assert abs(b3 / b1 - 2.0) < 0.01


def test_natural_history_state_and_woodbury_matches_dense(x64, key):
    from subjax.optim._projected import _woodbury_natural

    hist = jax.random.normal(key, (4, 7, 3), jnp.float64)
    r = jax.random.normal(jax.random.fold_in(key, 1), (7, 3), jnp.float64)
    h = hist.reshape(4, -1)
    delta = 0.1 * jnp.sum(h * h) / 4
    fisher = delta * jnp.eye(21, dtype=jnp.float64) + h.T @ h / 4
    dense = jnp.linalg.solve(fisher, r.reshape(-1)).reshape(7, 3)
    np.testing.assert_allclose(_woodbury_natural(hist, r, 0.1), dense, rtol=1e-9)
    opt = so.projected(optax.identity(), rank=3, refresh_every=5, natural_history=4)
    st = opt.init({"w": jnp.zeros((7, 5))})
    assert st.fisher_history["w"].shape == (4, 7, 3)


# --- warm start tracks a rotating subspace ------------------------------------------


def test_warm_subspace_iteration_tracks_rotating_subspace(key):
    m, n, r = 80, 40, 4
    k1, k2, k3 = jax.random.split(key, 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, n)))
    v0, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n)))
    a = jax.random.normal(k3, (n, n))
    skew = 0.02 * (a - a.T) / jnp.linalg.norm(a - a.T, 2)  # ~0.02 rad per step
    rot = jax.scipy.linalg.expm(skew)
    s = jnp.concatenate([jnp.array([10.0, 9.0, 8.0, 7.0]), 0.5 * jnp.ones(n - r)])
    opt = so.projected(optax.identity(), rank=r, refresh_every=1, projector="subspace",
                       subspace_steps=1)
    st = opt.init({"w": jnp.zeros((m, n))})
    @jax.jit
    def step(st, v):
        _, st = opt.update({"w": (u * s) @ v.T}, st)
        top, q = v[:, :r], st.projector_state["w"]
        sin_max = jnp.max(jnp.linalg.svd(q - top @ (top.T @ q), compute_uv=False))
        return st, rot @ v, sin_max

    v = v0
    worst = 0.0
    for t in range(60):
        st, v, sin_max = step(st, v)
        if t >= 5:
            worst = max(worst, float(sin_max))
    top0, top_end = v0[:, :r], v[:, :r]
    total_rotation = float(jnp.max(jnp.linalg.svd(top_end - top0 @ (top0.T @ top_end),
                                                  compute_uv=False)))
    assert total_rotation > 0.5  # the subspace moved a lot over the run ...
    assert worst < 0.05  # ... and one warm iteration per step kept up with it


def test_rotation_alignment_keeps_basis_coordinates(key):
    # two refreshes on slightly different gradients: the aligned basis keeps its
    # coordinates (Q_new^T Q_old close to I); without alignment, SVD sign/rotation
    # freedom scrambles them.
    k1, k2 = jax.random.split(key)
    g0 = jax.random.normal(k1, (30, 12))
    g1 = -(g0 + 0.01 * jax.random.normal(k2, (30, 12)))
    for align, close in [("rotation", True), ("sign", True), (None, False)]:
        proj = so.make_projector("svd", align=align)
        q0 = proj.refresh(g0, proj.init(12, 4), key, jnp.asarray(True))
        q1 = proj.refresh(g1, q0, key, jnp.asarray(False))
        dev = float(jnp.max(jnp.abs(q1.T @ q0 - jnp.eye(4))))
        assert (dev < 0.05) == close, (align, dev)


# --- training, jit, vmap, strictness ---------------------------------------------------


def _regression(key, m=24, n=16):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (128, m))
    w_true = jax.random.normal(k2, (m, 3)) @ jax.random.normal(k1, (3, n))
    y = x @ w_true
    return lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


@pytest.mark.standard_promotion
def test_galore_projectors_train(key):
    loss = _regression(key)
    finals = {}
    for projector in ["svd", "subspace", "dct", "random"]:
        opt = so.galore(1e-1, rank=4, update_proj_gap=10, projector=projector)
        p = {"w": jnp.zeros((24, 16)), "b": jnp.zeros((16,))}
        s = opt.init(p)

        @jax.jit
        def step(p, s, opt=opt):
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        for _ in range(150):
            p, s = step(p, s)
        finals[projector] = float(loss(p))
    l0 = float(loss({"w": jnp.zeros((24, 16)), "b": jnp.zeros((16,))}))
    # gradient-aligned subspaces (exact or one warm iteration per refresh) train
    # this rank-3 regression to < 1% of the initial loss; the DCT and random
    # projectors, which do not follow the singular subspace, make less progress
    assert finals["svd"] < 0.01 * l0 and finals["subspace"] < 0.01 * l0, finals
    assert finals["dct"] < 0.3 * l0 and finals["random"] < 0.5 * l0, finals
    assert finals["random"] > finals["subspace"], finals


@pytest.mark.parametrize(
    "projector", ["dct", "svd", pytest.param("subspace", marks=pytest.mark.slow)]
)
def test_projected_is_strict_promotion_clean_and_vmaps(key, projector):
    # runs under the autouse strict dtype promotion; identity inner is strict-clean
    opt = so.projected(optax.identity(), rank=3, refresh_every=2, projector=projector)
    g = {"w": jax.random.normal(key, (5, 10, 6)), "b": jnp.ones((5, 6))}
    # vmap over a batch of 5 independent (10, 6) problems
    st = jax.vmap(lambda gi: opt.init(gi))(g)
    u, st = jax.jit(jax.vmap(opt.update))(g, st)
    assert u["w"].shape == (5, 10, 6)
    for i in range(5):
        ui, _ = opt.update({"w": g["w"][i], "b": g["b"][i]}, opt.init({"w": g["w"][i],
                                                                       "b": g["b"][i]}))
        np.testing.assert_allclose(u["w"][i], ui["w"], atol=1e-4)
    np.testing.assert_allclose(u["b"], g["b"])


def test_weight_dimension_numbers_exclude_and_bf16(key):
    opt = so.projected(optax.identity(), rank=2, refresh_every=2,
                       weight_dimension_numbers={"w": None, "v": GaLoreDimensionNumbers()})
    p = {"w": jnp.ones((4, 3), jnp.bfloat16), "v": jnp.ones((8, 6), jnp.bfloat16)}
    st = opt.init(p)
    assert isinstance(st.projector_state["w"], optax.MaskedNode)
    g = jax.tree.map(lambda x: jax.random.normal(key, x.shape, jnp.bfloat16), p)
    u, _ = jax.jit(opt.update)(g, st)
    assert u["w"].dtype == jnp.bfloat16 and u["v"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(u["w"], g["w"])  # masked out: passes through
    sv = jnp.linalg.svd(u["v"].astype(jnp.float32), compute_uv=False)
    assert float(sv[2]) < 2e-2 * float(sv[0]) < float(sv[1])  # rank 2 up to bf16 rounding


# --- bad input --------------------------------------------------------------------


def test_bad_inputs():
    p = {"w": jnp.zeros((6, 4))}
    with pytest.raises(ValueError, match="refresh_every"):
        so.projected(rank=2, refresh_every=0)
    with pytest.raises(TypeError, match="refresh_every"):
        so.projected(rank=2, refresh_every=2.0)
    with pytest.raises(ValueError, match="projector"):
        so.projected(rank=2, refresh_every=1, projector="qr")
    with pytest.raises(TypeError, match="rank"):
        so.galore(1e-3, rank=2.5)
    with pytest.raises(ValueError, match="rank"):
        so.galore(1e-3, rank=0)
    with pytest.raises(ValueError, match="align"):
        so.projected(rank=2, refresh_every=1, align="polar")
    with pytest.raises(ValueError, match="subspace_steps"):
        so.projected(rank=2, refresh_every=1, subspace_steps=0)
    with pytest.raises(ValueError, match="natural_damping"):
        so.projected(rank=2, refresh_every=1, natural_history=2, natural_damping=0.0)
    with pytest.raises(ValueError, match="weight_dimension_numbers"):
        so.projected(rank=2, refresh_every=1,
                     weight_dimension_numbers={"w": None, "b": None}).init(p)


# --- optax / Flax citizenship ------------------------------------------------------


def _wb_params():
    return {"w": jnp.linspace(-1.0, 1.0, 24).reshape(6, 4), "b": jnp.ones((4,))}


def _run_updates(opt, params, grads, steps, update=None):
    update = opt.update if update is None else update
    state = opt.init(params)
    for _ in range(steps):
        u, state = update(grads, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.standard_promotion  # optax.inject_hyperparams casts hyperparameters
def test_galore_inject_hyperparams_rank_static_rest_traced_under_jit(key):
    params = _wb_params()
    grads = {"w": jax.random.normal(key, (6, 4)), "b": jnp.ones((4,))}
    # rank fixes shapes: without static_args the jitted update names it
    bare = optax.inject_hyperparams(so.galore)(learning_rate=1e-2, rank=2)
    with pytest.raises(TypeError, match="`rank`.*static_args"):
        jax.jit(bare.update)(grads, bare.init(params), params)
    # natural_damping, update_proj_gap, scale, weight_decay, seed are traced
    kw = dict(rank=2, update_proj_gap=2, natural_history=3, natural_damping=0.2,
              weight_decay=1e-3)
    injected = optax.inject_hyperparams(so.galore, static_args=("rank", "natural_history"))(
        learning_rate=1e-2, **kw)
    assert {"update_proj_gap", "natural_damping", "scale"} <= set(
        injected.init(params).hyperparams)
    pi, _ = _run_updates(injected, params, grads, 5, jax.jit(injected.update))
    pd, _ = _run_updates(so.galore(1e-2, **kw), params, grads, 5)
    for a, b in zip(jax.tree.leaves(pi), jax.tree.leaves(pd), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_promotion
@pytest.mark.parametrize("kw", [{}, {"projector": "random"}, {"natural_history": 2}],
                         ids=["subspace", "random", "natural"])
def test_galore_state_has_no_zero_size_arrays_and_round_trips_orbax(kw, tmp_path):
    import orbax.checkpoint as ocp

    params = _wb_params()
    opt = so.galore(1e-2, rank=2, update_proj_gap=2, **kw)
    _, state = _run_updates(opt, params, params, 1)
    assert all(np.size(x) > 0 for x in jax.tree.leaves(state))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state",
                            jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    same = optax.tree_map_params(opt, lambda p: p, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)


@pytest.mark.standard_promotion
def test_galore_complex_leaf_rejected_or_left_to_adam():
    # a 2x2 complex quadratic: projection of a complex matrix is refused with the leaf's
    # name; excluded from projection, the leaf reaches the optimum like optax.adam
    target = jnp.array([[1 + 2j, -1j], [0.5, 2 - 1j]], jnp.complex64)
    params = {"z": jnp.zeros((2, 2), jnp.complex64)}

    def loss(p):
        return jnp.sum(jnp.abs(p["z"] - target) ** 2)

    with pytest.raises(TypeError, match=r"params\['z'\].*complex"):
        so.galore(1e-1, rank=1).init(params)
    opt = so.galore(1e-1, rank=1, weight_dimension_numbers={"z": None})
    state = opt.init(params)
    for _ in range(300):
        g = jax.tree.map(jnp.conj, jax.grad(loss)(params))
        u, state = opt.update(g, state, params)
        params = optax.apply_updates(params, u)
    assert float(loss(params)) < 1e-3


@pytest.mark.standard_promotion
def test_galore_is_a_drop_in_for_optax_contrib_galore(key):
    import inspect

    ours = list(inspect.signature(so.galore).parameters)
    theirs = list(inspect.signature(optax.contrib.galore).parameters)
    assert ours[: len(theirs)] == theirs
    # `mask` is the weight-decay mask, as in optax: with zero gradients only the
    # decayed leaves move, by exactly -lr * wd * p, in both implementations
    params = _wb_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    mask = {"w": False, "b": True}
    for opt in (so.galore(0.1, 2, 5, 1.0, None, 0.5, mask),
                optax.contrib.galore(0.1, 2, 5, 1.0, None, 0.5, mask)):
        u, _ = opt.update(zeros, opt.init(params), params)
        np.testing.assert_array_equal(u["w"], 0.0)
        np.testing.assert_allclose(u["b"], -0.05 * params["b"], rtol=1e-6)
    # rank is clipped to min(m, n) per matrix, as in optax
    state = so.galore(0.1, rank=10).init(params)
    assert state[0].projector_state["w"].shape == (4, 4)


@pytest.mark.standard_promotion
def test_weight_dimension_numbers_project_a_3d_leaf_as_its_matrix(key):
    # a (6, 2, 3) leaf with output axes (1, 2) is the (6, 6) matrix of its reshape
    g3 = jax.random.normal(key, (6, 2, 3))
    dn = GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    opt3 = so.projected(optax.identity(), rank=2, projector="svd",
                        weight_dimension_numbers={"a": dn})
    opt2 = so.projected(optax.identity(), rank=2, projector="svd")
    u3, _ = opt3.update({"a": g3}, opt3.init({"a": g3}))
    u2, _ = opt2.update({"a": g3.reshape(6, 6)}, opt2.init({"a": g3.reshape(6, 6)}))
    np.testing.assert_allclose(u3["a"], u2["a"].reshape(6, 2, 3), rtol=1e-5, atol=1e-6)
    # axes in another order: the (2*3, 6) matrix of the transposed leaf
    dn_t = GaLoreDimensionNumbers(reduction_axis=(1, 2), output_axis=0)
    opt_t = so.projected(optax.identity(), rank=2, projector="svd",
                         weight_dimension_numbers={"a": dn_t})
    ut, _ = opt_t.update({"a": g3}, opt_t.init({"a": g3}))
    np.testing.assert_allclose(ut["a"], u3["a"], rtol=1e-5, atol=1e-6)
