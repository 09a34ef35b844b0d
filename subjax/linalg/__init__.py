"""subjax.linalg — public API. Implementation lives in private modules (`_*.py`)."""

__all__: list[str] = []
