"""Build notebooks/05_low_rank.ipynb (outputs stripped).

Run: .venv/bin/python notebooks/05_low_rank_build.py
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# Low-rank training and adaptation with subjax\n\n"
        "What the issue-7 primitives do, on problems small enough to run in seconds:\n\n"
        "1. the four GaLore projectors (exact SVD, warm subspace iteration, DCT, random),\n"
        "2. a warm-started projector following a rotating gradient subspace,\n"
        "3. `subjax.optim.galore` vs Adam: loss and optimizer-state bytes,\n"
        "4. LoRA on Flax's `nnx.LoRALinear`: PiSSA / SC-LoRA init, merge / unmerge,\n"
        "5. spectral tools: stable rank, WeLore ranks, intruder dimensions."
    ),
    new_code_cell(
        "import jax, jax.numpy as jnp, numpy as np, optax\n"
        "import matplotlib.pyplot as plt\n"
        "from flax import nnx\n"
        "import subjax.optim as so, subjax.nn as snn\n"
        "from subjax.linalg import principal_angles\n"
        "key = jax.random.key(0)"
    ),
    new_markdown_cell(
        "## 1. Projectors\n\n"
        "A gradient `G` (200 x 60) with 8 dominant singular values. Each projector "
        "returns an orthonormal `Q` (60 x 8) on the smaller side; we measure the largest "
        "principal angle to the true top-8 right singular subspace. The subspace "
        "projector's first refresh runs `init_iters` steps from a random start."
    ),
    new_code_cell(
        "k1, k2 = jax.random.split(key)\n"
        "u, _ = jnp.linalg.qr(jax.random.normal(k1, (200, 60)))\n"
        "v, _ = jnp.linalg.qr(jax.random.normal(k2, (60, 60)))\n"
        "s = jnp.concatenate([jnp.linspace(10, 5, 8), jnp.linspace(1, 0.05, 52)])\n"
        "g = (u * s) @ v.T\n"
        "angles = {}\n"
        "for name in ['svd', 'subspace', 'dct', 'random']:\n"
        "    p = so.make_projector(name)\n"
        "    st = p.refresh(g, p.init(60, 8), jax.random.key(1), jnp.asarray(True))\n"
        "    q = p.basis(st, jax.random.key(1), 60, 8)\n"
        "    assert np.allclose(q.T @ q, np.eye(8), atol=1e-5)\n"
        "    angles[name] = float(jnp.max(principal_angles(q, v[:, :8])))\n"
        "print({k: round(a, 4) for k, a in angles.items()})\n"
        "plt.figure(figsize=(4, 2.5)); plt.bar(list(angles), list(angles.values()))\n"
        "plt.ylabel('max principal angle (rad)'); plt.title('basis vs top-8 subspace'); plt.show()"
    ),
    new_markdown_cell(
        "## 2. Warm start tracks a rotating subspace\n\n"
        "The gradient's right singular vectors rotate by about 0.02 rad per step. "
        "With `update_gap=1` and one subspace-iteration step per refresh, started from "
        "the previous basis, the error stays small."
    ),
    new_code_cell(
        "a = jax.random.normal(jax.random.key(3), (60, 60)); skew = a - a.T\n"
        "rot = jax.scipy.linalg.expm(0.02 * skew / jnp.linalg.norm(skew, 2))\n"
        "opt = so.projected(optax.identity(), rank=8, update_gap=1, projector='subspace')\n"
        "st = opt.init({'w': g}); step = jax.jit(opt.update); vt = v; err = []\n"
        "for t in range(60):\n"
        "    _, st = step({'w': (u * s) @ vt.T}, st)\n"
        "    err.append(float(jnp.max(principal_angles(st.projector_state['w'], vt[:, :8]))))\n"
        "    vt = rot @ vt\n"
        "print('max angle after step 5:', max(err[5:]))\n"
        "plt.figure(figsize=(4, 2.5)); plt.semilogy(err); plt.xlabel('step')\n"
        "plt.ylabel('max principal angle'); plt.show()"
    ),
    new_markdown_cell(
        "## 3. GaLore vs Adam\n\n"
        "Least squares with a rank-6 target, `W` 96 x 64, rank 8, refresh every 20 "
        "steps. State bytes: Adam keeps two 96 x 64 moments; GaLore a 64 x 8 basis "
        "(for `svd` / `subspace`) and two 96 x 8 moments."
    ),
    new_code_cell(
        "kx, kw = jax.random.split(jax.random.key(4))\n"
        "x = jax.random.normal(kx, (256, 96))\n"
        "y = x @ (jax.random.normal(kw, (96, 6)) @ jax.random.normal(kx, (6, 64)))\n"
        "loss = lambda p: 0.5 * jnp.mean(jnp.sum((x @ p['w'] - y) ** 2, -1))\n"
        "def run(opt, steps=300):\n"
        "    def body(c, _):\n"
        "        p, s = c; l, gr = jax.value_and_grad(loss)(p); up, s = opt.update(gr, s, p)\n"
        "        return (optax.apply_updates(p, up), s), l\n"
        "    p0 = {'w': jnp.zeros((96, 64))}; s0 = opt.init(p0)\n"
        "    nbytes = sum(np.asarray(l).nbytes for l in jax.tree.leaves(s0))\n"
        "    scan = lambda p, s: jax.lax.scan(body, (p, s), None, length=steps)\n"
        "    (_, _), ls = jax.jit(scan)(p0, s0)\n"
        "    return np.asarray(ls), nbytes\n"
        "curves = {'adam': run(optax.adam(3e-2))}\n"
        "for name in ['svd', 'subspace', 'dct', 'random']:\n"
        "    curves[name] = run(so.galore(3e-2, rank=8, update_gap=20, projector=name))\n"
        "plt.figure(figsize=(5, 3))\n"
        "for name, (ls, nb) in curves.items():\n"
        "    plt.semilogy(ls, label=f'{name} ({nb} B state)')\n"
        "    print(f'{name:9s} final loss {ls[-1]:.4g}  state {nb} bytes')\n"
        "plt.legend(fontsize=7); plt.xlabel('step'); plt.ylabel('loss'); plt.show()"
    ),
    new_markdown_cell(
        "## 4. LoRA on `nnx.LoRALinear`\n\n"
        "PiSSA moves the top-`r` singular directions of the kernel into the adapter "
        "and leaves the residual in the base; SC-LoRA picks the adapter's output "
        "subspace from fine-tuning vs preserved-data output covariances. Both leave the "
        "layer's function unchanged. `merge_lora` / `unmerge_lora` convert to and from "
        "a plain `nnx.Linear`."
    ),
    new_code_cell(
        "layer = nnx.LoRALinear(32, 16, lora_rank=4, rngs=nnx.Rngs(0))\n"
        "xs = jax.random.normal(jax.random.key(5), (8, 32)); y0 = layer(xs)\n"
        "snn.pissa_init(layer)\n"
        "print('PiSSA keeps the function:', bool(jnp.allclose(layer(xs), y0, atol=1e-5)))\n"
        "sv = jnp.linalg.svd(layer.lora.lora_a[...] @ layer.lora.lora_b[...], compute_uv=False)\n"
        "print('adapter singular values:', np.round(np.asarray(sv[:4]), 3))\n"
        "merged = snn.merge_lora(layer)\n"
        "back = snn.unmerge_lora(merged, layer.lora.lora_a[...], layer.lora.lora_b[...])\n"
        "dw = jnp.max(jnp.abs(back.kernel[...] - layer.kernel[...]))\n"
        "print('round trip max |dW|:', float(dw))\n"
        "layer2 = nnx.LoRALinear(32, 16, lora_rank=4, rngs=nnx.Rngs(1))\n"
        "x_ft = jax.random.normal(jax.random.key(6), (256, 32))\n"
        "x_keep = jax.random.normal(jax.random.key(7), (256, 32)) * jnp.linspace(2, 0, 32)\n"
        "sub = snn.sclora_init(layer2, x_ft, x_keep, beta=0.5)\n"
        "print('SC-LoRA eigenvalues:', np.round(np.asarray(sub.eigenvalues), 3))"
    ),
    new_markdown_cell(
        "## 5. Spectral tools\n\n"
        "Stable rank and WeLore ranks of low-rank vs flat matrices; an intruder "
        "dimension created by a large rank-one update."
    ),
    new_code_cell(
        "low = (jax.random.normal(jax.random.key(8), (64, 3))\n"
        "       @ jax.random.normal(jax.random.key(9), (3, 48)))\n"
        "flat = jax.random.normal(jax.random.key(10), (64, 48))\n"
        "print('stable rank  low:', float(snn.stable_rank(low)),\n"
        "      ' flat:', float(snn.stable_rank(flat)))\n"
        "print('WeLore ranks:', snn.welore_ranks({'low': low, 'flat': flat}, threshold=0.1))\n"
        "w0 = flat / 8\n"
        "uvec = jax.random.normal(jax.random.key(11), (64,)); uvec = uvec / jnp.linalg.norm(uvec)\n"
        "w1 = w0 + 5 * jnp.outer(uvec, jax.random.normal(jax.random.key(12), (48,)) / 7)\n"
        "res = snn.intruder_dimensions(w0, w1, top_k=5)\n"
        "print('intruders:', int(res.count),\n"
        "      ' max similarity:', np.round(np.asarray(res.max_similarity), 2))\n"
        "plt.figure(figsize=(4, 2.5)); plt.bar(range(5), np.asarray(res.max_similarity))\n"
        "plt.axhline(0.5, color='k', ls='--'); plt.xlabel('top singular vector of W_ft')\n"
        "plt.ylabel('max |cos| with W_0'); plt.show()"
    ),
]

nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3",
                                                        "display_name": "Python 3",
                                                        "language": "python"}})
out = pathlib.Path(__file__).with_name("05_low_rank.ipynb")
nbformat.write(nb, out)
print("wrote", out)
