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

from subjax.parallel._distributed import distributed_env, initialize  # noqa: E402


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


def _split_argv(argv: list[str]) -> tuple[list[str], str | None, str | None, list[str]]:
    """Split ``argv`` into launcher options, ``-m module`` / script, and the target's args.

    Everything after the module name or script path belongs to the target, flags
    included (as with ``python -m module --flag``).
    """
    takes_value = {"--local", "--devices-per-process", "--timeout"}
    own: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "-m":
            if i + 1 >= len(argv):
                raise SystemExit("python -m subjax.parallel.launch: -m needs a module name")
            return own, argv[i + 1], None, argv[i + 2:]
        if tok == "--":
            i += 1
            break
        if not tok.startswith("-"):
            return own, None, tok, argv[i + 1:]
        own.append(tok)
        if tok in takes_value:
            if i + 1 < len(argv):
                own.append(argv[i + 1])
            i += 2
        else:
            i += 1
    if i < len(argv):
        return own, None, argv[i], argv[i + 1:]
    return own, None, None, []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m subjax.parallel.launch",
        usage="python -m subjax.parallel.launch [options] (script.py | -m module) [args ...]",
        description="Initialize jax.distributed from SUBJAX_*/JAX_* environment variables "
        "and run a script (or -m module) in this process.",
    )
    parser.add_argument("--local", type=int, default=0, metavar="N",
                        help="start N processes on 127.0.0.1 (CPU, gloo collectives)")
    parser.add_argument("--devices-per-process", type=int, default=1, metavar="K",
                        help="with --local: fake CPU devices per process (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="with --local: kill all processes after this many seconds")
    own, module, script, target_args = _split_argv(argv)
    ns = parser.parse_args(own)
    if module is None and script is None:
        parser.error("give a script path or -m module")
    if ns.local:
        if ns.local < 1:
            parser.error(f"--local must be >= 1, got {ns.local}")
        if ns.devices_per_process < 1:
            parser.error(f"--devices-per-process must be >= 1, got {ns.devices_per_process}")
        rest = ["-m", module] if module else [script]
        return _spawn_local(ns.local, ns.devices_per_process, rest + target_args, ns.timeout)

    initialize()
    try:
        if module is not None:
            sys.argv = [module, *target_args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [script, *target_args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            runpy.run_path(script, run_name="__main__")
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
