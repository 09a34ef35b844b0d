"""The pod plan's HLO reading: collectives and memory of compiled data-parallel programs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from subjax.parallel import data_parallel, train_step
from subjax.parallel.pod_plan import collectives_from_hlo

pytestmark = pytest.mark.multidevice

SYNTHETIC = """
HloModule m

%fallback (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ag = f32[4]{0} all-gather(f32[1]{0} %p), dimensions={0}
}

%fast (p: f32[4]) -> f32[4] {
  ROOT %p = f32[4]{0} parameter(0)
}

ENTRY %main (x: f32[8,2], ok: pred[]) -> f32[4] {
  %x = f32[8,2]{1,0} parameter(0)
  %ar = f32[8,2]{1,0} all-reduce(f32[8,2]{1,0} %x), replica_groups={}, to_apply=%add
  %t = (f32[3]{0}, s32[2]{0}) all-reduce(f32[3]{0} %a, s32[2]{0} %b), to_apply=%add
  ROOT %c = f32[4]{0} conditional(pred[] %ok, f32[4]{0} %y, f32[4]{0} %y), \
true_computation=%fast, false_computation=%fallback
}
""".replace("\\\n", "")


def test_collectives_parser_on_synthetic_hlo():
    out = collectives_from_hlo(SYNTHETIC)
    assert out["all-reduce"]["count"] == 2
    assert out["all-reduce"]["bytes"] == 8 * 2 * 4 + 3 * 4 + 2 * 4
    assert out["all-gather"]["count"] == 0  # only inside the fallback branch
    assert out["all-gather"]["cond_count"] == 1 and out["all-gather"]["cond_bytes"] == 16


@pytest.mark.standard_promotion  # optax.adam is not strict-promotion clean
def test_train_step_all_reduces_exactly_the_gradient():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros((32,))}
    n_bytes = 4 * (64 * 32 + 32)
    opt = optax.adam(1e-3)
    loss = lambda p, b: jnp.mean((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2)
    step = data_parallel(train_step(loss, opt, axis_name="data"), mesh)
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    abstract = lambda t, s: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t)
    batch = {"x": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=rows),
             "y": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=rows)}
    compiled = step.lower(abstract(params, rep), abstract(jax.eval_shape(opt.init, params), rep),
                          batch).compile()
    coll = collectives_from_hlo(compiled.as_text())
    # the gradient (plus the scalar loss) crosses the axis, nothing else does
    assert n_bytes <= coll["all-reduce"]["bytes"] <= n_bytes + 16
    assert all(v["count"] == 0 for k, v in coll.items() if k != "all-reduce")
    mem = compiled.memory_analysis()
    # per device: params + two Adam moments + the local eighth of the batch (+ count)
    local_batch = 4 * (64 // 8) * (64 + 32)
    assert mem.argument_size_in_bytes >= 3 * n_bytes + local_batch
    assert mem.argument_size_in_bytes <= 3 * n_bytes + local_batch + 64


@pytest.mark.standard_promotion  # optax.adam is not strict-promotion clean
def test_fsdp_step_gathers_each_weight_once():
    from subjax.parallel import fsdp_shardings, fsdp_step
    from subjax.parallel.pod_plan import _fsdp_model, _sharded_bytes

    mesh = Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "fsdp"))
    params, apply_fn = _fsdp_model(1, 64, 256)
    n_bytes = 4 * (4 * 64 * 64 + 2 * 64 * 256)
    batch = {"x": jax.ShapeDtypeStruct((64, 64), jnp.float32),
             "y": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    opt = optax.adam(1e-3)
    state = jax.eval_shape(opt.init, params)
    sh = fsdp_shardings(params, mesh, opt, state, min_size=0)
    loss = lambda p, b: jnp.mean((apply_fn(p, b["x"]) - b["y"]) ** 2)
    compiled = fsdp_step(loss, opt, sh).lower(params, state, batch).compile()
    # every weight and both Adam moments are held in eighths
    assert _sharded_bytes(params, sh.params) == n_bytes // 8
    assert _sharded_bytes(state, sh.opt_state) == 2 * n_bytes // 8 + 4
    coll = collectives_from_hlo(compiled.as_text())
    # the forward gathers each weight at most once (the backward reuses what it
    # gathered, or XLA moves activations instead)
    assert 0 < coll["all-gather"]["bytes"] <= n_bytes


def test_eigh_calls_parser():
    from subjax.parallel.pod_plan import eigh_calls_from_hlo

    line = ('%c = (f32[1,64,64]{1,2,0}, f32[1,64]{1,0}, s32[1]{0}) custom-call(%x), '
            'custom_call_target="lapack_ssyevd_ffi", operand_layout_constraints='
            '{f32[1,64,64]{1,2,0}}, api_version=API_VERSION_TYPED_FFI')
    plain = line.replace("[1,64,64]", "[32,32]").replace("ssyevd", "dsyevd")
    assert eigh_calls_from_hlo("\n".join([line, line, plain, "%y = f32[2] add(%a, %b)"])) == {
        "1 x 64 x 64": 2, "32 x 32": 1}
