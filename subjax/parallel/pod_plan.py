"""Pod plan: compile subjax's parallel programs for a large fake mesh and read the cost.

What cannot be run here (a 64- or 256-chip pod) is checked by lowering and
compiling the same programs for that many fake CPU devices
(``--xla_force_host_platform_device_count``) and reading, from the compiled
per-device SPMD program, the memory XLA plans (``compiled.memory_analysis()``)
and the collectives in the optimized HLO (kind, count, bytes moved per device).

Programs (weak scaling: fixed work per device):

- ``train_step``: :func:`subjax.parallel.data_parallel` of an MLP (Flax NNX) with
  Adam, ``--batch-per-device`` examples per device.
- ``sharded_svd``: :func:`subjax.parallel.sharded_randomized_svd` of a
  ``(rows_per_device * p, n)`` matrix, rank 32, block Krylov with 2 steps.
- ``sharded_sinkhorn``: :func:`subjax.parallel.sharded_sinkhorn` with
  ``rows_per_device * p`` cost rows and 2048 columns (collectives are per sweep:
  they sit in the while loop).
- ``fsdp_adam``, ``fsdp_galore``, ``fsdp_kfac``: :func:`subjax.parallel.fsdp_step`
  of a ~1B-parameter stack of transformer-shaped dense blocks (``--fsdp-depth``
  blocks of width ``--fsdp-width``, feed-forward width 4x) on a ``(data, fsdp)``
  mesh (``--fsdp-size`` devices on ``fsdp``, default all), with Adam, GaLore
  (subspace projector) and K-FAC; besides the compiled memory, the parameter and
  optimizer-state bytes each device holds (from the shardings) are reported.
  ``--fsdp-programs galore_sharded`` compiles GaLore with
  :func:`subjax.parallel.sharded_subspace_projector` (refresh under ``shard_map``).
  ``--fsdp-scan`` adds ``fsdp_adam_scan``: the same blocks stacked and run by a
  rematerialised ``jax.lax.scan`` (one block gathered at a time).

Usage::

    python -m subjax.parallel.pod_plan --devices 64 256 --out results/pod_plan
    python -m subjax.parallel.pod_plan --devices 64 256 --fsdp-only   # FSDP programs only

Each device count runs in its own subprocess (the flag must be set before JAX
starts). Writes ``pod_plan.json`` and ``pod_plan.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

__all__ = ["collectives_from_hlo", "eigh_calls_from_hlo", "main"]

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s64": 8,
                "u64": 8, "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2}
_SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|s64|u64|pred|s8|u8|s16|u16)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> int:
    total = 0
    for dt, dims in _SHAPE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dt]
    return total


_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(
    r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_BRANCH_ONE = re.compile(r"(?:true_computation|false_computation)=%?([\w.\-]+)")


def collectives_from_hlo(hlo: str) -> dict:
    """Count collectives in optimized HLO text and the bytes of their results.

    Returns ``{kind: {"count", "bytes", "cond_count", "cond_bytes"}}`` over
    all-reduce / all-gather / reduce-scatter / collective-permute / all-to-all
    (async ``-start`` forms counted once, ``-done`` ignored). ``count``/``bytes``
    are the ops on the unconditional path; ``cond_*`` those inside a
    ``conditional`` branch (e.g. a numerical fallback that normally does not run).
    Bytes are per-device result sizes; an op in a loop body is counted once.
    """
    comp_of_line = []
    calls: dict[str, set] = {}
    branch_roots: set = set()
    current = None
    for raw in hlo.splitlines():
        line = raw.strip()
        m = _COMP_HEADER.match(line)
        if m and "=" not in line.split("(", 1)[0]:
            current = m.group(1)
            calls.setdefault(current, set())
            continue
        if current is None:
            continue
        for name in _CALLS.findall(line):
            calls[current].add(name)
        for group in _BRANCHES.findall(line):
            for name in group.split(","):
                name = name.strip().lstrip("%")
                if name:
                    calls[current].add(name)
                    branch_roots.add(name)
        for name in _BRANCH_ONE.findall(line):
            branch_roots.add(name)
        comp_of_line.append((current, line))
    conditional = set()
    stack = list(branch_roots)
    while stack:
        c = stack.pop()
        if c in conditional:
            continue
        conditional.add(c)
        stack.extend(calls.get(c, ()))

    out = {k: {"count": 0, "bytes": 0, "cond_count": 0, "cond_bytes": 0}
           for k in _COLLECTIVES}
    for comp, line in comp_of_line:
        if "=" not in line:
            continue
        rhs = line.split("=", 1)[1].strip()
        for kind in _COLLECTIVES:
            m = re.match(r"(\(.*?\)|\S+)\s+" + re.escape(kind) + r"(-start)?\(", rhs)
            if m:
                pre = "cond_" if comp in conditional else ""
                out[kind][pre + "count"] += 1
                out[kind][pre + "bytes"] += _shape_bytes(m.group(1))
                break
    return out


_EIGH = re.compile(
    r'custom_call_target="\w*syevd\w*", operand_layout_constraints=\{\w+\[([0-9,]*)\]')


def eigh_calls_from_hlo(hlo: str) -> dict:
    """``{operand shape "b x n x n" or "n x n": count}`` of the symmetric eigensolver calls.

    Each call is one (batched) LAPACK / cuSOLVER ``syevd`` on one device; a leading
    batch dimension is the number of matrices that device decomposes in the call.
    """
    out: dict[str, int] = {}
    for dims in _EIGH.findall(hlo):
        key = " x ".join(d for d in dims.split(",") if d)
        out[key] = out.get(key, 0) + 1
    return out


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(ma, f, 0) or 0) for f in fields}


def _measure(name, lowered, t0):
    compiled = lowered.compile()
    t1 = time.perf_counter()
    hlo = compiled.as_text()
    return {"program": name, "compile_s": round(t1 - t0, 2), "memory": _memory(compiled),
            "collectives": collectives_from_hlo(hlo), "eigh": eigh_calls_from_hlo(hlo)}


def _worker(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from subjax.parallel import (
        data_parallel,
        sharded_randomized_svd,
        sharded_sinkhorn,
        train_step,
    )

    p = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P("data"))
    results = []
    if not args.data_parallel:
        return [{**r, "devices": p} for r in _fsdp_programs(args, p)]

    # --- data-parallel training step: MLP + Adam
    width, depth, d_in, d_out = args.width, args.depth, 256, 16

    class MLP(nnx.Module):
        def __init__(self, rngs):
            dims = [d_in] + [width] * depth + [d_out]
            self.layers = nnx.List(
                [nnx.Linear(i, o, rngs=rngs) for i, o in zip(dims[:-1], dims[1:], strict=True)]
            )

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jax.nn.gelu(layer(x))
            return self.layers[-1](x)

    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    opt = optax.adam(1e-3)

    def loss_fn(prm, b):
        return jnp.mean(jnp.square(nnx.merge(graphdef, prm)(b["x"]) - b["y"]))

    step = data_parallel(train_step(loss_fn, opt, axis_name="data"), mesh)

    def abstract(tree, sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)

    opt_state = jax.eval_shape(opt.init, params)
    gb = args.batch_per_device * p
    batch = {"x": jax.ShapeDtypeStruct((gb, d_in), jnp.float32, sharding=rows),
             "y": jax.ShapeDtypeStruct((gb, d_out), jnp.float32, sharding=rows)}
    t0 = time.perf_counter()
    lowered = step.lower(abstract(params, rep), abstract(opt_state, rep), batch)
    r = _measure("train_step", lowered, t0)
    r["shape"] = (f"MLP {d_in}-{'x'.join([str(width)] * depth)}-{d_out}, {n_params:,} params, "
                  f"Adam, batch {args.batch_per_device}/device")
    r["param_bytes"] = 4 * n_params
    results.append(r)

    # --- row-sharded randomized SVD
    m, n = args.rows_per_device * p, args.svd_cols
    a = jax.ShapeDtypeStruct((m, n), jnp.float32, sharding=rows)
    key = jax.random.key(0)
    fn = jax.jit(lambda a, k: sharded_randomized_svd(a, 32, key=k, mesh=mesh, oversample=10,
                                                     n_steps=2))
    t0 = time.perf_counter()
    r = _measure("sharded_svd", fn.lower(a, key), t0)
    r["shape"] = f"A {m:,} x {n} ({args.rows_per_device}/device), rank 32+10, block Krylov q=2"
    results.append(r)

    # --- row-sharded Sinkhorn (collectives in the loop body: per sweep)
    nc = args.rows_per_device // 4 * p
    c = jax.ShapeDtypeStruct((nc, 2048), jnp.float32, sharding=rows)
    fn = jax.jit(lambda c: sharded_sinkhorn(c, epsilon=0.05, mesh=mesh, tol=1e-4,
                                            max_iters=1000).f)
    t0 = time.perf_counter()
    r = _measure("sharded_sinkhorn", fn.lower(c), t0)
    r["shape"] = f"C {nc:,} x 2048 ({args.rows_per_device // 4}/device); collectives per sweep"
    results.append(r)
    if args.fsdp_depth > 0:
        results.extend(_fsdp_programs(args, p))
    for r in results:
        r["devices"] = p
    return results


def _fsdp_model(depth: int, d: int, ffn: int):
    """A stack of transformer-shaped dense blocks (no attention scores, no norms).

    Block: ``h = x + ((x Wq) * sigmoid(x Wk) + x Wv) Wo``, then
    ``x = h + gelu(h W1) W2``; every product is ``h @ kernel``, a layer K-FAC's
    capture records. ``4 d^2 + 2 d ffn`` parameters per block.
    """
    import jax
    import jax.numpy as jnp

    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (d, ffn),
              "down": (ffn, d)}
    params = [{name: {"kernel": jax.ShapeDtypeStruct(s, jnp.float32)}
               for name, s in shapes.items()} for _ in range(depth)]

    def apply_fn(prm, x):
        for blk in prm:
            def dense(name, h, blk=blk):
                return h @ blk[name]["kernel"]

            a = dense("q", x) * jax.nn.sigmoid(dense("k", x)) + dense("v", x)
            x = x + dense("o", a)
            x = x + dense("down", jax.nn.gelu(dense("up", x)))
        return x

    return params, apply_fn


def _fsdp_scan_model(depth: int, d: int, ffn: int):
    """The blocks of :func:`_fsdp_model` stacked and run by a rematerialised scan.

    Parameters are ``(depth, ...)`` stacks; ``jax.lax.scan`` over
    ``jax.checkpoint(block)`` keeps one block's gathered weights live at a time.
    (Not K-FAC-tagged, and GaLore projects only 2-D leaves: Adam only.)
    """
    import jax
    import jax.numpy as jnp

    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (d, ffn),
              "down": (ffn, d)}
    params = {name: {"kernel": jax.ShapeDtypeStruct((depth, *s), jnp.float32)}
              for name, s in shapes.items()}

    def block(x, w):
        a = (x @ w["q"]["kernel"]) * jax.nn.sigmoid(x @ w["k"]["kernel"]) + x @ w["v"]["kernel"]
        x = x + a @ w["o"]["kernel"]
        return x + jax.nn.gelu(x @ w["up"]["kernel"]) @ w["down"]["kernel"], None

    def apply_fn(prm, x):
        return jax.lax.scan(jax.checkpoint(block), x, prm)[0]

    return params, apply_fn


def _sharded_bytes(abstract_tree, shardings) -> int:
    import jax
    import numpy as np

    total = 0
    for x, sh in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def _fsdp_programs(args, p: int) -> list[dict]:
    """``fsdp_step`` of the ~1B-parameter block stack with Adam, GaLore and K-FAC."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh

    from subjax import fisher
    from subjax.optim import galore, kfac
    from subjax.parallel import fsdp_shardings, fsdp_step, sharded_subspace_projector

    fsdp = min(p, args.fsdp_size) if args.fsdp_size > 0 else p
    mesh = Mesh(np.array(jax.devices()).reshape(p // fsdp, fsdp), ("data", "fsdp"))
    d, ffn = args.fsdp_width, 4 * args.fsdp_width
    params, apply_fn = _fsdp_model(args.fsdp_depth, d, ffn)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tokens = args.tokens_per_device * p
    batch = {"x": jax.ShapeDtypeStruct((tokens, d), jnp.float32),
             "y": jax.ShapeDtypeStruct((tokens, d), jnp.float32)}

    def loss_fn(prm, b):
        return 0.5 * jnp.mean(jnp.sum(jnp.square(apply_fn(prm, b["x"]) - b["y"]), axis=-1))

    def kfac_grad_fn(prm, b):
        loss, grads, stats = fisher.kfac_grads_and_stats(
            apply_fn, prm, b["x"], b["y"], likelihood="gaussian", fisher="empirical")
        return loss, grads, {"kfac_stats": stats}

    cases = [
        ("fsdp_adam", optax.adam(1e-4), loss_fn, None, "Adam"),
        ("fsdp_galore", galore(1e-4, rank=args.galore_rank, update_proj_gap=200), loss_fn,
         None, f"GaLore rank {args.galore_rank}, subspace projector"),
        ("fsdp_galore_sharded", galore(1e-4, rank=args.galore_rank, update_proj_gap=200,
                                       projector=sharded_subspace_projector(mesh)),
         loss_fn, None, f"GaLore rank {args.galore_rank}, sharded_subspace_projector"),
        ("fsdp_kfac", kfac(1e-4, damping=1e-3, refresh_every=10), None, kfac_grad_fn,
         "K-FAC, eigendecomposition refresh every 10 steps"),
    ]
    if args.fsdp_scan:
        scan_params, scan_apply = _fsdp_scan_model(args.fsdp_depth, d, ffn)

        def scan_loss(prm, b):
            return 0.5 * jnp.mean(jnp.sum(jnp.square(scan_apply(prm, b["x"]) - b["y"]),
                                          axis=-1))

        cases.insert(1, ("fsdp_adam_scan", optax.adam(1e-4), scan_loss, None,
                         "Adam, blocks stacked and run by a rematerialised lax.scan"))
    cases = [c for c in cases if c[0][len("fsdp_"):] in args.fsdp_programs
             or c[0].endswith("_scan")]
    out = []
    for name, opt, lf, gf, label in cases:
        prm = scan_params if name.endswith("_scan") else params
        state = jax.eval_shape(opt.init, prm)
        sh = fsdp_shardings(prm, mesh, opt, state)
        step = fsdp_step(lf, opt, sh, grad_fn=gf)
        t0 = time.perf_counter()
        r = _measure(name, step.lower(prm, state, batch), t0)
        r["param_bytes_per_device"] = _sharded_bytes(prm, sh.params)
        r["state_bytes_per_device"] = _sharded_bytes(state, sh.opt_state)
        r["state_bytes_total"] = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                                     for x in jax.tree.leaves(state))
        r["shape"] = (f"{args.fsdp_depth} blocks, d={d}, ffn={ffn}, {n_params:,} params, "
                      f"{label}, mesh (data, fsdp) = ({p // fsdp}, {fsdp}), "
                      f"{args.tokens_per_device} tokens/device")
        r["param_bytes"] = 4 * n_params
        out.append(r)
    return out


def _fmt_bytes(b: int) -> str:
    for unit, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= s:
            return f"{b / s:.1f} {unit}"
    return f"{b} B"


def markdown(results: list[dict], command: str) -> str:
    lines = [
        "| devices | program | params / device | opt state / device | args / device | "
        "temp / device | output / device | "
        "collectives in the compiled program (count, result bytes / device) | compile s |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        mem = r["memory"]
        coll = ", ".join(f"{k} x{v['count']} ({_fmt_bytes(v['bytes'])})"
                         for k, v in r["collectives"].items() if v["count"])
        fallback = ", ".join(f"{k} x{v['cond_count']} ({_fmt_bytes(v['cond_bytes'])})"
                             for k, v in r["collectives"].items() if v["cond_count"])
        if fallback:
            coll = f"{coll or 'none'}; in conditional branches: {fallback}"
        args_b = _fmt_bytes(mem.get("argument_size_in_bytes", 0))
        held = " | ".join(_fmt_bytes(r[k]) if k in r else "—"
                          for k in ("param_bytes_per_device", "state_bytes_per_device"))
        lines.append(
            f"| {r['devices']} | {r['program']} | {held} | {args_b}"
            f" | {_fmt_bytes(mem.get('temp_size_in_bytes', 0))}"
            f" | {_fmt_bytes(mem.get('output_size_in_bytes', 0))} | {coll or 'none'}"
            f" | {r['compile_s']} |")
    shapes = {}
    for r in results:
        shapes.setdefault(r["program"], r["shape"])
    lines.append("")
    for prog, shape in shapes.items():
        lines.append(f"- `{prog}`: {shape}")
    for r in results:
        if r.get("eigh"):
            calls = ", ".join(f"{c} x [{k}]" for k, c in r["eigh"].items())
            lines.append(f"- `{r['program']}` on {r['devices']} devices: eigensolver calls "
                         f"per device (count x [operand shape]): {calls}")
    lines.append("")
    lines.append("Conditional branches are numerical fallbacks (the SVD's TSQR) or periodic "
                 "refreshes (GaLore's projector, K-FAC's eigendecompositions); an op inside a "
                 "loop body is counted once.")
    lines.append("")
    lines.append(f"Command: `{command}`")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m subjax.parallel.pod_plan",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--out", default="results/pod_plan")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch-per-device", type=int, default=32)
    ap.add_argument("--rows-per-device", type=int, default=4096)
    ap.add_argument("--svd-cols", type=int, default=1024)
    ap.add_argument("--fsdp-only", dest="data_parallel", action="store_false",
                    help="compile only the FSDP programs")
    ap.add_argument("--fsdp-depth", type=int, default=5,
                    help="blocks of the FSDP model (0: skip the FSDP programs)")
    ap.add_argument("--fsdp-width", type=int, default=4096)
    ap.add_argument("--fsdp-programs", nargs="+", default=["adam", "galore", "kfac"],
                    choices=["adam", "galore", "galore_sharded", "kfac"],
                    help="optimizers of the FSDP programs")
    ap.add_argument("--fsdp-scan", action="store_true",
                    help="also compile Adam on the blocks stacked under a rematerialised scan")
    ap.add_argument("--fsdp-size", type=int, default=0,
                    help="size of the fsdp mesh axis (0: every device)")
    ap.add_argument("--tokens-per-device", type=int, default=256)
    ap.add_argument("--galore-rank", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for d in args.devices:
        if d < 1:
            ap.error(f"--devices must be positive, got {d}")

    if args.worker:
        print("POD_PLAN_JSON " + json.dumps(_worker(args)), flush=True)
        return 0

    results = []
    passthrough = ["--width", str(args.width), "--depth", str(args.depth),
                   "--batch-per-device", str(args.batch_per_device),
                   "--rows-per-device", str(args.rows_per_device),
                   "--svd-cols", str(args.svd_cols), "--fsdp-depth", str(args.fsdp_depth),
                   "--fsdp-width", str(args.fsdp_width), "--fsdp-size", str(args.fsdp_size),
                   "--tokens-per-device", str(args.tokens_per_device),
                   "--galore-rank", str(args.galore_rank),
                   *([] if args.data_parallel else ["--fsdp-only"]),
                   *(["--fsdp-scan"] if args.fsdp_scan else []),
                   "--fsdp-programs", *args.fsdp_programs]
    for d in args.devices:
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={d}"])
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "subjax.parallel.pod_plan", "--worker", "--devices",
               str(d), *passthrough]
        print(f"pod_plan: compiling for {d} fake devices ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=args.timeout)
        if proc.returncode != 0:
            print(proc.stderr[-6000:], file=sys.stderr)
            return proc.returncode
        line = [x for x in proc.stdout.splitlines() if x.startswith("POD_PLAN_JSON ")][-1]
        results.extend(json.loads(line[len("POD_PLAN_JSON "):]))
    command = "python -m subjax.parallel.pod_plan " + " ".join(
        ["--devices", *map(str, args.devices), *passthrough])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pod_plan.json"), "w") as fh:
        json.dump({"command": command, "results": results}, fh, indent=1)
    md = markdown(results, command)
    with open(os.path.join(args.out, "pod_plan.md"), "w") as fh:
        fh.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
