"""Riemannian optimizer step on a GCR head of ImageNet shape, retraction variants, and
manifold Muon against Riemannian SGD and optax's Muon.

Shape: 1000 classes x 2048 features x subspace_dim 8 (a (C, n, p) stack of
Grassmann / Stiefel points), float32, momentum 0.9.

Contenders for the step (reference = subjax Grassmann, polar):
- subjax ``riemannian_sgd`` (fused Gram kernel) on Grassmann and on Stiefel,
  polar and Cholesky-QR retractions;
- geoopt ``RiemannianSGD`` on ``EuclideanStiefel`` (its fastest Stiefel
  configuration: projection + QR retraction, batched over the classes);
- pymanopt: its Grassmann (``k=1000``) Riemannian gradient + QR retraction in
  numpy — pymanopt has no stochastic optimizer, so this is the step's work only;
- the matmul floor: the two batched products no step can avoid, ``x^T g`` and
  ``x (x^T g)``, in JAX and in torch (into preallocated outputs).

Accuracy column: orthonormality error ``max_c ||x_c^T x_c - I||_F`` of the new point.
The step's cost over the matmul floor is the ratio of their medians (both in the
table), printed by ``python -m experiments.bench manifolds``.

Manifold Muon (spectral-norm steepest descent restricted to the manifold,
``subjax.optim.manifold_muon``) is timed on the same GCR head step, next to
``optax.contrib.muon`` (unconstrained, Newton–Schulz), and compared in training
on an orthogonality-constrained MLP: the hidden weight lives on ``Stiefel(64, 32)``
and the accuracy column is the training loss after the steps (with the
orthonormality error of the hidden weight in the note).
"""

from __future__ import annotations

import numpy as np

from experiments.bench import Case, Contender

C, N, P = 1000, 2048, 8
QUICK_REPEATS = 5


def _orth_err(x) -> float:
    x = np.asarray(x, np.float64) if not hasattr(x, "detach") else x.detach().double().numpy()
    g = np.swapaxes(x, -1, -2) @ x
    return float(np.max(np.linalg.norm(g - np.eye(x.shape[-1]), axis=(-2, -1))))


def cases(quick: bool):
    import jax
    import jax.numpy as jnp
    import optax

    from subjax.manifolds import Grassmann, Stiefel
    from subjax.optim import manifold_muon, riemannian_sgd

    lr, beta = 0.1, 0.9
    gr, st = Grassmann(N, P), Stiefel(N, P)
    x = gr.random_point(jax.random.key(0), (C,))
    g = 1e-2 * jax.random.normal(jax.random.key(1), (C, N, P))
    m0 = gr.proj(x, 1e-2 * jax.random.normal(jax.random.key(2), (C, N, P)))

    def subjax_step(manifold, retraction, refresh_every):
        opt = riemannian_sgd(lr, beta, manifolds=manifold, retraction=retraction,
                             refresh_every=refresh_every)
        state = opt.init(x)._replace(momentum=m0)

        @jax.jit
        def step(x, g, state):
            u, state = opt.update(g, state, x)
            return optax.apply_updates(x, u), state

        return lambda: step(x, g, state)

    def transform_step(opt):
        state = opt.init(x)

        @jax.jit
        def step(x, g, state):
            u, state = opt.update(g, state, x)
            return optax.apply_updates(x, u), state

        return lambda: step(x, g, state)

    muon_dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    floor = jax.jit(lambda x, g: x @ (jnp.swapaxes(x, -1, -2) @ g))
    step_contenders = [
        Contender("subjax", subjax_step(gr, "polar", 100),
                  accuracy=lambda o: _orth_err(o[0]),
                  note="Grassmann, polar (8x8 Gram eigh), fused"),
        Contender("subjax cholesky-QR", subjax_step(gr, "cholesky_qr", 100),
                  accuracy=lambda o: _orth_err(o[0]), note="Grassmann, fused"),
        Contender("subjax Stiefel polar", subjax_step(st, "polar", 100),
                  accuracy=lambda o: _orth_err(o[0]), note="same shape, Stiefel projection"),
        Contender("matmul floor (jax)", lambda: floor(x, g), note="x (x^T g), two batched dots"),
        Contender("subjax manifold_muon", transform_step(manifold_muon(lr, beta, manifolds=gr)),
                  accuracy=lambda o: _orth_err(o[0]),
                  note="Grassmann: msign((I - x x^T) m) by batched SVD, polar retraction"),
        Contender("optax.contrib.muon", transform_step(optax.contrib.muon(
            lr, beta=beta, muon_weight_dimension_numbers=muon_dims)),
                  accuracy=lambda o: _orth_err(o[0]),
                  note="unconstrained Newton-Schulz step: leaves the manifold"),
    ]
    try:
        step_contenders += _torch_contenders(np.asarray(x), np.asarray(g), np.asarray(m0), lr,
                                             beta)
    except ImportError:  # geoopt / torch not installed
        pass
    if not quick:  # one pymanopt step takes ~5-20 s here: full mode only
        try:
            step_contenders.append(_pymanopt_contender(np.asarray(x), np.asarray(g), lr))
        except ImportError:
            pass

    step_case = Case(
        name=f"GCR head optimizer step ({C} x {N} x {P}, f32, momentum {beta})",
        params={"classes": C, "features": N, "subspace_dim": P, "lr": lr, "momentum": beta},
        contenders=step_contenders,
        reference="subjax",
        accuracy_label="orthonormality error of the new point",
        repeats=QUICK_REPEATS if quick else 15,
        max_seconds=30.0 if quick else 60.0,
        note=("The step's cost over the matmul floor (step time / floor time, medians) is "
              "the `subjax / this` entry of the `matmul floor (jax)` row."),
    )

    u = -lr * gr.proj(x, g)
    retr_contenders = []
    for name, man, method in [("polar (Gram eigh)", gr, "polar"),
                              ("Cholesky-QR", gr, "cholesky_qr"),
                              ("Householder QR", gr, "qr"),
                              ("Grassmann geodesic (exp)", gr, "exp"),
                              ("Cayley (low rank)", st, "cayley")]:
        f = jax.jit(lambda x, u, man=man, method=method: man.retract(x, u, method))
        retr_contenders.append(Contender("subjax" if method == "polar" else f"subjax {name}",
                                         lambda f=f: f(x, u), accuracy=_orth_err, note=name))
    retr_case = Case(
        name=f"retraction R_x(u) ({C} x {N} x {P}, f32)",
        params={"classes": C, "features": N, "subspace_dim": P},
        contenders=retr_contenders,
        reference="subjax",
        accuracy_label="orthonormality error",
        repeats=QUICK_REPEATS if quick else 15,
        max_seconds=20.0 if quick else 60.0,
    )
    return [step_case, retr_case, _gcr_training_case(quick), _mlp_case(quick)]


LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _digits_standardised():
    """Digits train / validation / test splits, pixels centred and scaled on the train split."""
    from experiments.data import digits

    d = digits(0)
    mean, std = d.train.x.mean(0), d.train.x.std(0) + 0.1
    return [(np.asarray((s.x - mean) / std, np.float32), np.asarray(s.y, np.int32))
            for s in (d.train, d.val, d.test)]


def _tuned_case(name: str, loss_fn, params0, methods: dict, steps: int, quick: bool,
                note: str, constraint):
    """Each method trained for ``steps`` full-batch steps at every learning rate of
    ``LR_GRID`` (cosine decay to 0, the same budget for all); the rate with the lowest
    validation loss is kept and the test accuracy at that rate is reported.
    ``constraint(params)`` is the orthonormality error shown in the note."""
    import jax
    import jax.numpy as jnp
    import optax

    (xtr, ytr), (xva, yva), (xte, yte) = _digits_standardised()

    def train_fn(make):
        def run(lr):
            opt = make(optax.cosine_decay_schedule(lr, steps))

            def body(c, _):
                p, s = c
                u, s = opt.update(jax.grad(loss_fn)(p, xtr, ytr), s, p)
                return (optax.apply_updates(p, u), s), None

            (p, _), _ = jax.lax.scan(body, (params0, opt.init(params0)), None, length=steps)
            return p

        return run

    def accuracy(p, x, y):
        return float(jnp.mean(jnp.argmax(loss_fn(p, x, y, logits=True), -1) == y))

    contenders = []
    grid = jnp.asarray(LR_GRID, jnp.float32)
    for label, make in methods.items():
        run = train_fn(make)
        def tune(lr, run=run):
            p = run(lr)
            return loss_fn(p, xva, yva), constraint(p)

        val, err = jax.jit(jax.vmap(tune))(grid)
        val = np.where(np.isfinite(np.asarray(val)), np.asarray(val), np.inf)
        best = int(np.argmin(val))
        lr = float(LR_GRID[best])
        fit = jax.jit(lambda run=run, lr=lr: run(jnp.float32(lr)))
        edge = " (grid edge)" if best in (0, len(LR_GRID) - 1) else ""
        contenders.append(Contender(
            label, fit, accuracy=lambda p: accuracy(p, xte, yte),
            note=f"lr {lr:g}{edge} chosen on validation (val loss {val[best]:.3f}, "
                 f"orthonormality error {float(err[best]):.2g}); "
                 + note + ("; " + make.note if getattr(make, "note", "") else "")))
    return Case(
        name=name,
        params={"steps": steps, "lr_grid": list(LR_GRID), "train": len(ytr),
                "val": len(yva), "test": len(yte)},
        contenders=contenders,
        reference="subjax",
        accuracy_label="test accuracy at the validation-chosen lr (higher is better)",
        repeats=3 if quick else 7,
        max_seconds=30.0 if quick else 60.0,
        note=("Every method gets the same budget: the same steps, the same learning-rate "
              "grid and schedule, the rate chosen by validation loss; the time column is "
              "one training run at the chosen rate."),
    )


class _Maker:
    """``make(schedule) -> optimizer`` with a note for the table."""

    def __init__(self, fn, note=""):
        self.fn, self.note = fn, note

    def __call__(self, lr):
        return self.fn(lr)


def _gcr_training_case(quick: bool):
    """A GCR head (each digit class a subspace of R^64) trained on fixed pixel features."""
    import jax
    import jax.numpy as jnp
    import optax

    from subjax.manifolds import Grassmann
    from subjax.optim import manifold_muon, riemannian_sgd

    n_classes, d, p, scale = 10, 64, 4, 10.0
    gr = Grassmann(d, p)
    w0 = gr.random_point(jax.random.key(0), (n_classes,))

    def loss(w, x, y, logits=False):
        xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        z = scale * jnp.linalg.norm(jnp.einsum("bd,cdp->bcp", xn, w), axis=-1)
        if logits:
            return z
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))

    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    methods = {
        "subjax": _Maker(lambda lr: manifold_muon(lr, 0.9, nesterov=True, manifolds=gr),
                         "manifold Muon (Grassmann, closed form)"),
        "subjax riemannian_sgd": _Maker(
            lambda lr: riemannian_sgd(lr, 0.9, nesterov=True, manifolds=gr),
            "Riemannian SGD (Grassmann, polar)"),
        "optax.contrib.muon": _Maker(
            lambda lr: optax.contrib.muon(lr, beta=0.9, muon_weight_dimension_numbers=dims),
            "unconstrained (the head leaves the manifold)"),
    }
    steps = 150 if quick else 400
    return _tuned_case(f"GCR head on digits ({n_classes} x {d} x {p}), {steps} steps, "
                       "manifold Muon vs peers, lr tuned on validation",
                       loss, w0, methods, steps, quick, "momentum 0.9, Nesterov",
                       lambda w: jnp.max(gr.check(w)))


def _mlp_case(quick: bool):
    """An MLP on digits whose hidden weight is constrained to Stiefel(64, 32)."""
    import jax
    import jax.numpy as jnp
    import optax

    from subjax.manifolds import Stiefel
    from subjax.optim import manifold_muon, riemannian_sgd

    d_in, d_h, n_out = 64, 32, 10
    st = Stiefel(d_in, d_h)
    kw, ko = jax.random.split(jax.random.key(0))
    params0 = {"hidden": st.random_point(kw), "out": 0.1 * jax.random.normal(ko, (d_h, n_out)),
               "bias": jnp.zeros(n_out)}
    labels = {"hidden": "stiefel", "out": "free", "bias": "free"}

    def loss(p, x, y, logits=False):
        z = jnp.tanh(x @ p["hidden"]) @ p["out"] + p["bias"]
        if logits:
            return z
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))

    def partition(hidden):
        return optax.partition({"stiefel": hidden, "free": optax.adam(1e-2)}, labels)

    methods = {
        "subjax": _Maker(lambda lr: partition(manifold_muon(lr, 0.9, nesterov=True,
                                                            manifolds=st)),
                         "manifold Muon (Stiefel, dual ascent)"),
        "subjax riemannian_sgd": _Maker(
            lambda lr: partition(riemannian_sgd(lr, 0.9, nesterov=True, manifolds=st)),
            "Riemannian SGD (Stiefel, polar)"),
        "optax.contrib.muon": _Maker(
            lambda lr: partition(optax.contrib.muon(lr, beta=0.9)),
            "unconstrained hidden weight"),
    }
    steps = 150 if quick else 400
    return _tuned_case(f"orthogonality-constrained MLP on digits (hidden on Stiefel({d_in}, "
                       f"{d_h})), {steps} steps, manifold Muon vs peers, lr tuned on validation",
                       loss, params0, methods, steps, quick,
                       "momentum 0.9, Nesterov; Adam(1e-2) on the output layer",
                       lambda p: st.check(p["hidden"]))


def _torch_contenders(x, g, m0, lr, beta):
    import geoopt
    import torch

    torch.manual_seed(0)
    w = geoopt.ManifoldParameter(torch.from_numpy(x.copy()), manifold=geoopt.EuclideanStiefel())
    opt = geoopt.optim.RiemannianSGD([w], lr=lr, momentum=beta, stabilize=None)
    gt = torch.from_numpy(g.copy())
    w.grad = gt
    opt.step()  # creates the momentum buffer
    with torch.no_grad():
        opt.state[w]["momentum_buffer"].copy_(torch.from_numpy(m0.copy()))
    def geoopt_step():  # successive steps from the current point (stays on the manifold)
        w.grad = gt
        opt.step()
        return w

    xt = torch.from_numpy(x.copy())
    a_buf = torch.empty(x.shape[0], x.shape[2], x.shape[2])
    o_buf = torch.empty_like(xt)

    def torch_floor():
        torch.bmm(xt.transpose(1, 2), gt, out=a_buf)
        torch.bmm(xt, a_buf, out=o_buf)
        return o_buf

    return [
        Contender("geoopt EuclideanStiefel", geoopt_step, accuracy=_orth_err,
                  note=f"RiemannianSGD, batched, torch {torch.__version__} CPU, "
                       f"{torch.get_num_threads()} threads"),
        Contender("matmul floor (torch, out=)", torch_floor, note="bmm into preallocated"),
    ]


def _pymanopt_contender(x, g, lr):
    from pymanopt.manifolds import Grassmann as PGrassmann

    man = PGrassmann(N, P, k=C)

    def step():
        rg = man.euclidean_to_riemannian_gradient(x, g)
        return man.retraction(x, -lr * rg)

    return Contender("pymanopt Grassmann", step, accuracy=_orth_err,
                     note="numpy: rgrad + QR retraction, no momentum (no stochastic optimizer)")
