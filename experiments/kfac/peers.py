"""kfac-jax on the digits autoencoder (the peer), with the one jax-0.10 workaround.

kfac-jax 0.0.8 calls ``eqn.primitive.get_bind_params(eqn.params)`` and unpacks
``(subfuns, bind_params)``; on jax 0.10 that method returns a single dict, so its
graph matcher fails at the first step with "too many values to unpack".
:func:`patch_kfac_jax` replaces that one function (``tag_graph_matcher.eval_jaxpr_eqn``)
by an equivalent that accepts both return forms. Nothing else is changed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PATCHED = False


def patch_kfac_jax():
    global _PATCHED
    if _PATCHED:
        return
    import jax.extend as jex
    from kfac_jax._src import tag_graph_matcher as tgm

    def eval_jaxpr_eqn(eqn, in_values):
        res = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], dict):
            subfuns, bind_params = res
        else:
            subfuns, bind_params = [], res
        with jex.source_info_util.user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
        return output if isinstance(output, list) else [output]

    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
    _PATCHED = True


def to_dict_params(nnx_params):
    """nnx.State of the autoencoder -> plain {"layers": [{"kernel", "bias"}, ...]} dict."""
    layers = nnx_params["layers"]
    return [
        {"kernel": jnp.array(layers[i]["kernel"][...]), "bias": jnp.array(layers[i]["bias"][...])}
        for i in range(len(layers))
    ]


def mlp_logits(params, x):
    n = len(params)
    for i, p in enumerate(params):
        x = x @ p["kernel"] + p["bias"]
        if i != n - 1:
            x = jnp.tanh(x)
    return x


def make_kfac_jax(initial_damping: float = 1.0):
    import kfac_jax

    patch_kfac_jax()

    def loss_fn(params, batch):
        logits = mlp_logits(params, batch)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
        return jnp.mean(jnp.sum(jax.nn.softplus(logits) - batch * logits, axis=-1))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=initial_damping,
        inverse_update_period=5,
        curvature_ema=0.95,
        num_burnin_steps=0,
        multi_device=False,
    )
    return opt, loss_fn
