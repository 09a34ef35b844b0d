"""``jax.distributed.initialize`` from environment variables (see :mod:`subjax.parallel.launch`)."""

from __future__ import annotations

import os

__all__ = ["initialize", "distributed_env"]

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
