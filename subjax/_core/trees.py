"""Pytree helpers: key-path names and values that may be schedules."""

from __future__ import annotations

from typing import Any

import jax
import optax


def path_name(path, sep: str = "/") -> str:
    """A readable name for a ``jax.tree_util`` key path: ``"layers/0/kernel"``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return sep.join(parts)


def leaves_with_names(tree, is_leaf=None) -> list[tuple[str, Any]]:
    """``[(path_name, leaf), ...]`` in ``tree_leaves`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_name(p), x) for p, x in flat]


def value_at(value: optax.ScalarOrSchedule, count) -> Any:
    """``value(count)`` when ``value`` is a schedule, else ``value``."""
    return value(count) if callable(value) else value
