"""The private core every subjax family builds on.

One home for what each family needs once: the compute-dtype rule
(:mod:`.dtypes`), argument checks (:mod:`.checks`), the fixed-point loop
(:mod:`.loop`) and pytree helpers (:mod:`.trees`). Not public API: users import
the families (``subjax.linalg``, ``subjax.ot``, ...), never ``subjax._core``.
"""

from subjax._core.checks import (
    all_finite,
    bound_axis_size,
    check_finite_if_concrete,
    check_key,
    choice,
    floating_array,
    int_scalar,
    is_concrete,
    nonnegative,
    optional_static_int,
    positive,
    scalar,
    static_int,
    unit_interval,
)
from subjax._core.dtypes import (
    as_compute,
    compute_dtype,
    exact_matmul,
    full_precision,
    full_precision_exports,
    result_dtype,
)
from subjax._core.loop import LoopOutput, fixed_point_loop, history_size, record
from subjax._core.trees import leaves_with_names, path_name, value_at

__all__ = [
    "LoopOutput",
    "all_finite",
    "as_compute",
    "bound_axis_size",
    "check_finite_if_concrete",
    "check_key",
    "choice",
    "compute_dtype",
    "exact_matmul",
    "full_precision",
    "full_precision_exports",
    "fixed_point_loop",
    "floating_array",
    "history_size",
    "int_scalar",
    "is_concrete",
    "leaves_with_names",
    "nonnegative",
    "optional_static_int",
    "path_name",
    "positive",
    "record",
    "result_dtype",
    "scalar",
    "static_int",
    "unit_interval",
    "value_at",
]
