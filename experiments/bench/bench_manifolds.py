"""Riemannian optimizer step on a GCR head of ImageNet shape, and retraction variants.

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
    from subjax.optim import riemannian_sgd

    lr, beta = 0.1, 0.9
    gr, st = Grassmann(N, P), Stiefel(N, P)
    x = gr.random_point(jax.random.key(0), (C,))
    g = 1e-2 * jax.random.normal(jax.random.key(1), (C, N, P))
    m0 = gr.proj(x, 1e-2 * jax.random.normal(jax.random.key(2), (C, N, P)))

    def subjax_step(manifold, retraction, refresh_every):
        opt = riemannian_sgd(lr, beta, manifolds=manifold, retraction=retraction,
                             reorthonormalize_every=refresh_every)
        state = opt.init(x)._replace(momentum=m0)

        @jax.jit
        def step(x, g, state):
            u, state = opt.update(g, state, x)
            return optax.apply_updates(x, u), state

        return lambda: step(x, g, state)

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
    return [step_case, retr_case]


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
