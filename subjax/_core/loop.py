"""The fixed-point loop every tolerance-driven solver runs on.

A solver is a ``step(state) -> (state, error)`` on a ``NamedTuple`` state.
:func:`fixed_point_loop` runs it under ``lax.while_loop`` until ``stop(state,
error)`` holds, the error is not finite, or ``max_iters`` steps have run. It
keeps the iteration count and a fixed-size error history padded with ``-1`` (a
slot every ``record_every`` steps), so results have static shapes under ``jit``
and ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class LoopOutput(NamedTuple):
    """What :func:`fixed_point_loop` returns.

    Attributes:
      state: the solver's state after the last step.
      n_iters: ``int32`` scalar, steps run.
      error: the error of the last step (``inf`` when no step ran).
      errors: ``(history,)`` errors, slot ``t`` holding step ``t * record_every``;
        ``-1`` where no step was recorded.
    """

    state: Any
    n_iters: jax.Array
    error: jax.Array
    errors: jax.Array


def record(errors: jax.Array, it, err, every: int = 1) -> jax.Array:
    """``errors`` with ``err`` written at slot ``it // every`` when ``it % every == 0``."""
    k = it // every
    ok = (it % every == 0) & (k < errors.shape[0])
    return errors.at[jnp.where(ok, k, errors.shape[0])].set(err, mode="drop")


def history_size(max_iters: int, record_every: int = 1) -> int:
    """Slots needed to record every ``record_every``-th of ``max_iters`` steps."""
    return max(1, -(-max_iters // record_every))


def fixed_point_loop(
    step: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
    state: Any,
    *,
    max_iters: int,
    stop: Callable[[Any, jax.Array], jax.Array] | None = None,
    dtype=jnp.float32,
    record_every: int = 1,
    history: int | None = None,
    stop_on_nonfinite: bool = True,
) -> LoopOutput:
    """Run ``state, err = step(state, it)`` until ``stop`` holds or ``max_iters``.

    Args:
      step: ``(state, it) -> (new_state, error)``; ``it`` is the ``int32`` step index.
      state: the initial state (any pytree; a ``NamedTuple`` reads best).
      max_iters: the cap (static Python int).
      stop: ``(state, error) -> bool``, checked after each step; ``None`` runs all
        ``max_iters`` steps.
      dtype: dtype of the error history.
      record_every: record the error every this many steps.
      history: length of the error history (default: enough for ``max_iters``).
      stop_on_nonfinite: also stop once the error is NaN or inf (the solver
        then reports ``converged=False``).

    Returns:
      :class:`LoopOutput`.
    """
    if history is None:
        history = history_size(max_iters, record_every)
    errors0 = -jnp.ones((history,), dtype)

    def cond(c):
        it, s, err, done, _ = c
        return (it < max_iters) & ~done

    def body(c):
        it, s, _, _, errors = c
        s, err = step(s, it)
        err = jnp.asarray(err, dtype)
        done = jnp.array(False)
        if stop is not None:
            done = done | stop(s, err)
        if stop_on_nonfinite:
            done = done | ~jnp.isfinite(err)
        return it + 1, s, err, done, record(errors, it, err, record_every)

    init = (jnp.zeros((), jnp.int32), state, jnp.array(jnp.inf, dtype), jnp.array(False), errors0)
    it, state, err, _, errors = lax.while_loop(cond, body, init)
    return LoopOutput(state, it, err, errors)
