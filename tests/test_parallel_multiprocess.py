"""A real multi-process run: 2 JAX processes on 127.0.0.1 with CPU (gloo) collectives.

The test starts ``python -m subjax.parallel.launch --local 2 --devices-per-process 2
<this file>``; each process runs :func:`worker` (the ``__main__`` block below) on a
4-device mesh spanning both processes and checks the distributed results against
a single-process computation on its own local device: the data-parallel step, the
row-sharded SVD and the fully sharded (FSDP) step with parameters split across the
two processes.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.multidevice


def worker():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh

    from subjax.parallel import data_parallel, replicate, shard_batch, train_step

    rank, nproc = jax.process_index(), jax.process_count()
    assert nproc == 2, nproc
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = Mesh(np.array(jax.devices()), ("data",))
    # the mesh really spans both processes
    assert {d.process_index for d in mesh.devices.flat} == {0, 1}

    # --- data-parallel training step (Adam) vs the single-process full-batch step
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"w1": 0.3 * jax.random.normal(k1, (6, 16)),
                "w2": 0.3 * jax.random.normal(k2, (16, 2))}

    def loss_fn(p, b):
        pred = jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]
        return jnp.mean(jnp.sum((pred - b["y"]) ** 2, axis=-1))

    params = init(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    full = {"x": np.asarray(jax.random.normal(kx, (32, 6))),
            "y": np.asarray(jax.random.normal(ky, (32, 2)))}
    opt = optax.adam(3e-2)
    steps = 4

    ref_step = jax.jit(train_step(loss_fn, opt))
    p_ref, s_ref = params, opt.init(params)
    ref_losses = []
    for _ in range(steps):
        p_ref, s_ref, lval = ref_step(p_ref, s_ref, full)
        ref_losses.append(float(lval))

    # each process feeds only its own half of the batch
    half = 32 // nproc
    local = jax.tree.map(lambda a: a[rank * half:(rank + 1) * half], full)
    batch = shard_batch(local, mesh)
    assert batch["x"].shape == (32, 6) and not batch["x"].is_fully_addressable
    step = data_parallel(train_step(loss_fn, opt, axis_name="data"), mesh)
    p_dp, s_dp = replicate((params, opt.init(params)), mesh)
    dp_losses = []
    for _ in range(steps):
        p_dp, s_dp, lval = step(p_dp, s_dp, batch)
        dp_losses.append(float(lval))
    np.testing.assert_allclose(dp_losses, ref_losses, rtol=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    for a, b in zip(jax.tree.leaves(p_dp), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print(f"rank {rank}: data_parallel OK losses={dp_losses}", flush=True)

    # --- row-sharded randomized SVD across the two processes vs single-process SVD
    from subjax.linalg import randomized_svd
    from subjax.parallel import sharded_randomized_svd

    ka, kb, kk = jax.random.split(jax.random.key(2), 3)
    u0, _ = jnp.linalg.qr(jax.random.normal(ka, (64, 24)))
    v0, _ = jnp.linalg.qr(jax.random.normal(kb, (24, 24)))
    a = np.asarray((u0 * 0.7 ** jnp.arange(24.0)) @ v0.T)
    ref = randomized_svd(a, 4, key=kk, oversample=4, n_steps=1, method="subspace")
    a_sharded = shard_batch(a[rank * 32:(rank + 1) * 32], mesh)  # each process: its rows
    res = sharded_randomized_svd(a_sharded, 4, key=kk, mesh=mesh, oversample=4, n_steps=1,
                                 method="subspace")
    s, vt = np.asarray(res.s), np.asarray(res.vt)
    np.testing.assert_allclose(s, np.asarray(ref.s), rtol=1e-5)
    sgn = np.sign(np.sum(vt * np.asarray(ref.vt), axis=1))
    np.testing.assert_allclose(vt * sgn[:, None], np.asarray(ref.vt), atol=2e-5)
    assert not res.u.is_fully_addressable
    for shard in res.u.addressable_shards:  # this process's rows of u
        np.testing.assert_allclose(np.asarray(shard.data) * sgn,
                                   np.asarray(ref.u)[shard.index], atol=2e-5)
    print(f"rank {rank}: sharded_svd OK s={s.round(4).tolist()}", flush=True)

    # --- fully sharded (FSDP) Adam step: parameters and moments split over an fsdp
    # axis that spans both processes, equal to the single-process step
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from subjax.parallel import fsdp_shardings, fsdp_step

    mesh2 = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "fsdp"))
    sh = fsdp_shardings(params, mesh2, opt, min_size=0)
    assert sh.params["w1"].spec == P(None, "fsdp") and sh.params["w2"].spec == P("fsdp", None)

    def place(x, sharding: NamedSharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    p_fs = jax.tree.map(place, params, sh.params)
    s_fs = jax.jit(opt.init, out_shardings=sh.opt_state)(p_fs)
    fstep = fsdp_step(loss_fn, opt, sh)
    fbatch = shard_batch(local, mesh2, ("data", "fsdp"))
    fs_losses = []
    for _ in range(steps):
        p_fs, s_fs, lval = fstep(p_fs, s_fs, fbatch)
        fs_losses.append(float(lval))
    np.testing.assert_allclose(fs_losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p_fs), jax.tree.leaves(p_ref), strict=True):
        assert not a.is_fully_addressable
        for shard in a.addressable_shards:  # this process's columns / rows
            assert shard.data.size == a.size // 4
            np.testing.assert_allclose(np.asarray(shard.data), np.asarray(b)[shard.index],
                                       rtol=1e-5, atol=1e-6)
    print(f"rank {rank}: fsdp OK losses={fs_losses}", flush=True)


def test_two_processes_on_localhost():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "subjax.parallel.launch", "--local", "2",
           "--devices-per-process", "2", "--timeout", "240", os.path.abspath(__file__)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=270, env=env, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    for rank in (0, 1):
        assert f"rank {rank}: data_parallel OK" in out, out
        assert f"rank {rank}: sharded_svd OK" in out, out
        assert f"rank {rank}: fsdp OK" in out, out


def test_launch_env_validation():
    from subjax.parallel.launch import distributed_env

    assert distributed_env({}) == {}
    env = {"SUBJAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "SUBJAX_NUM_PROCESSES": "2",
           "SUBJAX_PROCESS_ID": "1", "SUBJAX_LOCAL_DEVICE_IDS": "0,1"}
    assert distributed_env(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                                    "process_id": 1, "local_device_ids": [0, 1]}
    # JAX's own names are accepted as a fallback
    jenv = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_env(jenv)["process_id"] == 3
    with pytest.raises(ValueError, match="SUBJAX_NUM_PROCESSES"):
        distributed_env({"SUBJAX_COORDINATOR_ADDRESS": "h:1", "SUBJAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="SUBJAX_PROCESS_ID=2 is outside 0..1"):
        distributed_env({**env, "SUBJAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="SUBJAX_NUM_PROCESSES='two'"):
        distributed_env({**env, "SUBJAX_NUM_PROCESSES": "two"})


def test_launch_argv_split():
    from subjax.parallel.launch import _split_argv

    assert _split_argv(["--local", "2", "-m", "pkg.mod", "--flag", "x"]) == (
        ["--local", "2"], "pkg.mod", None, ["--flag", "x"])
    assert _split_argv(["--timeout", "5", "train.py", "--lr", "0.1"]) == (
        ["--timeout", "5"], None, "train.py", ["--lr", "0.1"])
    assert _split_argv(["--", "-weird.py"]) == ([], None, "-weird.py", [])


def test_launch_reports_a_failing_process(tmp_path):
    script = tmp_path / "fail.py"
    # rank 1 fails, rank 0 would wait forever: the launcher must stop it and report
    script.write_text(
        "import jax, sys, time\n"
        "if jax.process_index() == 1:\n    sys.exit(3)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "subjax.parallel.launch", "--local", "2", "--timeout", "60",
         str(script)],
        capture_output=True, text=True, timeout=90, env=env, cwd=ROOT)
    assert proc.returncode == 1
    assert "(1, 3)" in proc.stderr


if __name__ == "__main__":
    worker()
