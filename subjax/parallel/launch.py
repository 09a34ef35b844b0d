"""Multi-host launcher: ``jax.distributed.initialize`` from environment variables.

Usage (one command per process; on TPU pods / SLURM / Open MPI the variables may be
omitted and JAX detects the cluster itself)::

    SUBJAX_COORDINATOR_ADDRESS=10.0.0.1:1234 SUBJAX_NUM_PROCESSES=4 SUBJAX_PROCESS_ID=0 \\
        python -m subjax.parallel.launch train.py --my-flag
    python -m subjax.parallel.launch -m my_package.train --my-flag

    # try it on one machine: N processes on 127.0.0.1 with CPU (gloo) collectives
    python -m subjax.parallel.launch --local 2 --devices-per-process 2 train.py

The script then runs as ``__main__`` in the initialized process: ``jax.devices()``
lists the devices of every process, ``jax.local_devices()`` this process's, and
a ``Mesh`` over ``jax.devices()`` spans all hosts — the single-host
:func:`subjax.parallel.data_parallel` code runs unchanged.

Environment variables (``SUBJAX_*`` first, then JAX's own ``JAX_*`` names):

- ``SUBJAX_COORDINATOR_ADDRESS`` / ``JAX_COORDINATOR_ADDRESS``: ``host:port`` of process 0.
- ``SUBJAX_NUM_PROCESSES`` / ``JAX_NUM_PROCESSES``: number of processes.
- ``SUBJAX_PROCESS_ID`` / ``JAX_PROCESS_ID``: this process's rank, ``0..N-1``.
- ``SUBJAX_LOCAL_DEVICE_IDS``: optional comma-separated local device ids.
- ``SUBJAX_INIT_TIMEOUT``: seconds to wait for all processes (default 300).
"""

from __future__ import annotations

import argparse
import os
import runpy
import socket
import subprocess
import sys
import time
import traceback

__all__ = ["initialize", "distributed_env", "main"]

_VARS = {
    "coordinator_address": ("SUBJAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("SUBJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("SUBJAX_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("SUBJAX_LOCAL_DEVICE_IDS",),
}


def distributed_env(environ: dict | None = None) -> dict:
    """Read the ``jax.distributed.initialize`` arguments from environment variables.

    Returns a dict with the keys that are set (``coordinator_address``,
    ``num_processes``, ``process_id``, ``local_device_ids``), converted to the
    types ``jax.distributed.initialize`` expects.

    Raises:
      ValueError: a variable does not parse, or only some of the three required
        ones (address, process count, process id) are set.
    """
    environ = os.environ if environ is None else environ
    out: dict = {}
    for key, names in _VARS.items():
        for name in names:
            if environ.get(name, "") != "":
                raw = environ[name]
                try:
                    if key in ("num_processes", "process_id"):
                        out[key] = int(raw)
                    elif key == "local_device_ids":
                        out[key] = [int(v) for v in raw.split(",") if v.strip()]
                    else:
                        out[key] = raw
                except ValueError:
                    raise ValueError(
                        f"environment variable {name}={raw!r} is not valid for {key}"
                    ) from None
                break
    required = ("coordinator_address", "num_processes", "process_id")
    have = [k for k in required if k in out]
    if have and len(have) != len(required):
        missing = [_VARS[k][0] for k in required if k not in out]
        raise ValueError(
            f"incomplete distributed environment: set {', '.join(missing)} as well "
            f"(or none of them to let JAX auto-detect the cluster)"
        )
    if "num_processes" in out and out["num_processes"] < 1:
        raise ValueError(f"SUBJAX_NUM_PROCESSES must be >= 1, got {out['num_processes']}")
    if "process_id" in out and not 0 <= out["process_id"] < out["num_processes"]:
        raise ValueError(
            f"SUBJAX_PROCESS_ID={out['process_id']} is outside 0..{out['num_processes'] - 1}"
        )
    return out


def initialize(environ: dict | None = None, *, timeout: int | None = None) -> dict:
    """Call ``jax.distributed.initialize`` with arguments from the environment.

    With no ``SUBJAX_*`` / ``JAX_*`` variables set, JAX's own cluster detection
    is used (TPU pods, SLURM, Open MPI, Kubernetes). On CPU, cross-process
    collectives use gloo (``jax_cpu_collectives_implementation``).

    Returns:
      the keyword arguments that were passed.
    """
    import jax

    environ = os.environ if environ is None else environ
    kwargs = distributed_env(environ)
    if timeout is None:
        timeout = int(environ.get("SUBJAX_INIT_TIMEOUT", "300"))
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms == "" or "cpu" in platforms.split(","):
        # jax 0.10's default is gloo already; set it explicitly so that an older
        # default ("none": no cross-process CPU collectives) cannot bite.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
    return kwargs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_local(n: int, devices: int, rest: list[str], timeout: float) -> int:
    """Start ``n`` copies of this launcher on 127.0.0.1 and wait for all of them."""
    port = _free_port()
    procs = []
    for rank in range(n):
        env = dict(os.environ)
        env.update(
            SUBJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            SUBJAX_NUM_PROCESSES=str(n),
            SUBJAX_PROCESS_ID=str(rank),
            JAX_PLATFORMS="cpu",
            SUBJAX_INIT_TIMEOUT=str(int(min(timeout, 300))),
        )
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        flags.append(f"--xla_force_host_platform_device_count={devices}")
        env["XLA_FLAGS"] = " ".join(flags)
        procs.append(subprocess.Popen([sys.executable, "-m", "subjax.parallel.launch", *rest],
                                      env=env))
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * n
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    codes[i] = p.poll()
            if any(c not in (None, 0) for c in codes):
                break  # one failed: the others would wait for it forever
            if time.monotonic() > deadline:
                print(f"subjax.parallel.launch: timed out after {timeout:.0f}s", file=sys.stderr)
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        print(f"subjax.parallel.launch: processes failed (rank, exit code): {bad}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m subjax.parallel.launch",
        description="Initialize jax.distributed from SUBJAX_*/JAX_* environment variables "
        "and run a script (or -m module) in this process.",
    )
    parser.add_argument("--local", type=int, default=0, metavar="N",
                        help="start N processes on 127.0.0.1 (CPU, gloo collectives)")
    parser.add_argument("--devices-per-process", type=int, default=1, metavar="K",
                        help="with --local: fake CPU devices per process (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="with --local: kill all processes after this many seconds")
    parser.add_argument("-m", dest="module", default=None, help="run a module as __main__")
    parser.add_argument("script", nargs="?", help="script to run as __main__")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    ns = parser.parse_args(argv)
    if ns.module is None and ns.script is None:
        parser.error("give a script path or -m module")
    if ns.module is not None and ns.script is not None:
        ns.args = [ns.script, *ns.args]  # with -m, every positional is the module's
        ns.script = None
    if ns.local:
        if ns.local < 1:
            parser.error(f"--local must be >= 1, got {ns.local}")
        if ns.devices_per_process < 1:
            parser.error(f"--devices-per-process must be >= 1, got {ns.devices_per_process}")
        rest = ["-m", ns.module] if ns.module else [ns.script]
        return _spawn_local(ns.local, ns.devices_per_process, rest + ns.args, ns.timeout)

    initialize()
    try:
        if ns.module is not None:
            sys.argv = [ns.module, *ns.args]
            runpy.run_module(ns.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [ns.script, *ns.args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
            runpy.run_path(ns.script, run_name="__main__")
    except BaseException as e:  # noqa: BLE001 - any failure must end this process now
        code = e.code if isinstance(e, SystemExit) else 1
        if code in (0, None):
            return 0
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        # Exit at once: the normal interpreter exit would run jax.distributed's
        # shutdown barrier and wait for peers that may never arrive.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
