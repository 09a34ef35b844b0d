"""The statistics standard of the reproductions (see ``docs/reproductions.md``).

Every reproduction reports what it compares the same way:

- a quantity measured over independent seeds is reported as its mean with a
  two-sided 95% **Student-t confidence interval** (:func:`mean_ci`): ``mean ±
  t_{n-1, 0.975} * sd / sqrt(n)`` with ``sd`` the sample standard deviation
  (``ddof=1``). The interval is exact for normally distributed seed-to-seed
  variation and a good approximation for the bounded, roughly symmetric metrics
  used here (accuracies, losses, AUROCs);
- a comparison of two methods is a **paired difference**: both methods run on
  the same seeds (same data split, same initialisation), and the interval is the
  t-interval of the per-seed differences (:func:`paired_difference`). Pairing
  removes the seed-to-seed variation the two methods share;
- the **verdict** on a claim is computed from the interval of the claimed
  difference (:func:`verdict`), never written by hand: *held* when the whole
  interval lies on the claimed side of zero, *did not hold* when the whole
  interval lies below the smallest difference that would count (``margin``;
  zero by default, i.e. the opposite effect is established), *inconclusive*
  otherwise. A verdict from fewer than :data:`MIN_SEEDS` seeds, or from quick
  mode, is marked *indicative*;
- hyperparameters are chosen on a **validation split** with the **same budget**
  of evaluations for every method (:func:`tune`, :func:`tune_methods`); when the
  best value sits at an edge of its grid the grid is extended on that side
  (:func:`grid_edge`, :func:`extend_grid`) until the best value is interior or
  the budget is spent, and a best value still at the edge is flagged.

Nothing here uses a test split; experiments evaluate the test split only at the
hyperparameters :func:`tune` returns.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as _sps

from subjax._core.checks import choice, nonnegative, static_int, unit_interval

LEVEL = 0.95
MIN_SEEDS = 5
HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"
OUTCOMES = (HELD, NOT_HELD, INCONCLUSIVE)


# --------------------------------------------------------------------------- estimates


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds with its confidence interval ``[lo, hi]``.

    With one seed the interval is unbounded (``lo = -inf``, ``hi = inf``): a
    single run says nothing about seed-to-seed variation.
    """

    mean: float
    lo: float
    hi: float
    n: int
    sd: float
    level: float = LEVEL

    @property
    def half_width(self) -> float:
        return 0.5 * (self.hi - self.lo)

    def format(self, fmt: str = ".3f") -> str:
        """``"0.930 ± 0.008"`` (the half-width of the interval), or ``"0.930 (n=1)"``."""
        if not math.isfinite(self.half_width):
            return f"{format(self.mean, fmt)} (n={self.n})"
        return f"{format(self.mean, fmt)} ± {format(self.half_width, fmt)}"

    def to_dict(self) -> dict:
        """JSON-able form; an unbounded end is written as ``None``."""
        return {"mean": self.mean, "lo": self.lo if math.isfinite(self.lo) else None,
                "hi": self.hi if math.isfinite(self.hi) else None, "n": self.n,
                "sd": self.sd, "level": self.level}

    @classmethod
    def from_dict(cls, d: Mapping) -> Estimate:
        lo = -math.inf if d.get("lo") is None else float(d["lo"])
        hi = math.inf if d.get("hi") is None else float(d["hi"])
        return cls(float(d["mean"]), lo, hi, int(d["n"]), float(d["sd"]),
                   float(d.get("level", LEVEL)))


def _values(values, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence of per-seed values, got shape {v.shape}")
    if v.size == 0:
        raise ValueError(f"`{name}` is empty: at least one seed is needed")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"`{name}` contains NaN or inf: a diverged run must be reported, "
                         "not averaged")
    return v


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """Mean of per-seed ``values`` with its two-sided Student-t interval at ``level``."""
    unit_interval(level, "level")
    v = _values(values, "values")
    n = int(v.size)
    mean = float(v.mean())
    if n == 1:
        return Estimate(mean, -math.inf, math.inf, 1, 0.0, float(level))
    sd = float(v.std(ddof=1))
    half = float(_sps.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, sd, float(level))


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Estimate:
    """Interval of ``a - b`` from per-seed pairs (``a[i]`` and ``b[i]`` share seed ``i``)."""
    va, vb = _values(a, "a"), _values(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"`a` and `b` must hold one value per shared seed; got {va.size} and "
                         f"{vb.size} values")
    return mean_ci(va - vb, level)


# --------------------------------------------------------------------------- verdicts


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of a claim (one of :data:`OUTCOMES`) and whether it is only indicative."""

    outcome: str
    indicative: bool

    def __str__(self) -> str:
        return self.outcome + (" (indicative)" if self.indicative else "")


def verdict(diff: Estimate, *, claim: str = "greater", margin: float = 0.0,
            quick: bool = False, min_seeds: int = MIN_SEEDS) -> Verdict:
    """The verdict on a claimed difference from its confidence interval.

    Args:
      diff: the interval of the difference the claim is about (usually from
        :func:`paired_difference`, claimed method minus its foil).
      claim: ``"greater"`` (the claim is ``diff > 0``) or ``"less"`` (``diff < 0``).
      margin: smallest difference, in the claimed direction, that would count as
        the claimed effect (``>= 0``). With the default 0, *did not hold* needs
        the opposite effect established; with a positive margin it also covers
        an interval that rules out every effect of at least ``margin``.
      quick: the run used the quick protocol; the verdict is then indicative.
      min_seeds: fewer seeds than this make the verdict indicative.

    Returns:
      *held* when the interval lies strictly on the claimed side of zero, else
      *did not hold* when it lies strictly below ``margin`` on the claimed axis,
      else *inconclusive*.
    """
    choice(claim, "claim", ("greater", "less"))
    nonnegative(margin, "margin")
    static_int(min_seeds, "min_seeds", minimum=2)
    sign = 1.0 if claim == "greater" else -1.0
    lo, hi = sorted((sign * diff.lo, sign * diff.hi))
    if lo > 0.0:
        outcome = HELD
    elif hi < margin:
        outcome = NOT_HELD
    else:
        outcome = INCONCLUSIVE
    return Verdict(outcome, bool(quick) or diff.n < min_seeds)


def compare(claimed: Sequence[float], foil: Sequence[float], *, claim: str = "greater",
            margin: float = 0.0, quick: bool = False, level: float = LEVEL) -> dict:
    """Intervals of both methods, the paired difference ``claimed - foil``, its verdict."""
    diff = paired_difference(claimed, foil, level)
    v = verdict(diff, claim=claim, margin=margin, quick=quick)
    return {"claimed": mean_ci(claimed, level).to_dict(), "foil": mean_ci(foil, level).to_dict(),
            "difference": diff.to_dict(), "claim": claim, "margin": float(margin),
            "verdict": str(v), "outcome": v.outcome, "indicative": v.indicative}


# --------------------------------------------------------------------------- grids


def grid_edge(grid: Sequence[float], scores: Sequence[float], maximize: bool = True) -> str | None:
    """``"low"`` / ``"high"`` when the best score is at that end of ``grid`` (sorted), else None.

    Ties go to the smallest value. A one-point grid is at both edges (``"both"``).
    """
    g = np.asarray(grid, np.float64)
    s = _values(scores, "scores")
    if g.shape != s.shape:
        raise ValueError(f"`grid` and `scores` differ in length ({g.size} vs {s.size})")
    if g.size == 1:
        return "both"
    order = np.argsort(g, kind="stable")
    ranked = s[order] if maximize else -s[order]
    best = int(np.argmax(ranked))
    if best == 0:
        return "low"
    if best == g.size - 1:
        return "high"
    return None


def extend_grid(grid: Sequence[float], side: str, spacing: str = "auto",
                bounds: tuple[float | None, float | None] = (None, None)) -> float | None:
    """The next grid value beyond ``side`` (``"low"`` / ``"high"``) of ``grid``, or None.

    ``spacing="log"`` continues the ratio of the two outermost values on that side,
    ``"linear"`` their difference; ``"auto"`` is log when every value is positive.
    Integer grids stay integer. ``None`` when the new value would leave
    ``bounds`` (inclusive) or not differ from the grid's end.
    """
    choice(side, "side", ("low", "high"))
    choice(spacing, "spacing", ("auto", "log", "linear"))
    g = sorted(float(x) for x in grid)
    if len(g) < 2:
        raise ValueError("`grid` needs at least two values to be extended")
    integer = all(float(x).is_integer() for x in grid) and all(
        isinstance(x, (int, np.integer)) for x in grid)
    if spacing == "auto":
        spacing = "log" if g[0] > 0 else "linear"
    end, nxt = (g[0], g[1]) if side == "low" else (g[-1], g[-2])
    if spacing == "log":
        if end <= 0 or nxt <= 0:
            raise ValueError("a log-spaced grid must be positive")
        new = end * (end / nxt)
    else:
        new = end + (end - nxt)
    if integer:
        new = float(round(new))
        if new == end:
            new = end - 1.0 if side == "low" else end + 1.0
    lo, hi = bounds
    if (lo is not None and new < lo) or (hi is not None and new > hi) or new == end:
        return None
    return int(new) if integer else new


def _evaluate_grid(evaluate, grid, budget) -> dict[float, float]:
    """``{value: score}`` over the distinct values of ``grid`` (at least two, within
    ``budget``)."""
    values = list(dict.fromkeys(grid))
    if len(values) < 2:
        raise ValueError("`grid` needs at least two distinct values")
    static_int(budget, "budget", minimum=len(values))
    return {v: float(evaluate(v)) for v in values}


def _extend_past(evaluate, tried: dict, edge, budget, spacing, bounds) -> None:
    """Evaluate one new value beyond ``edge(tried)`` (``"low"``, ``"high"`` or None to
    stop) at a time, while the budget lasts and the grid can grow."""
    while len(tried) < budget:
        side = edge(tried)
        if side is None:
            return
        new = extend_grid(sorted(tried), side, spacing, bounds)
        if new is None or new in tried:
            return
        tried[new] = float(evaluate(new))


@dataclasses.dataclass(frozen=True)
class Tuned:
    """Outcome of :func:`tune`: the chosen value, every value tried with its score."""

    best: float
    score: float
    tried: tuple[tuple[float, float], ...]
    at_edge: bool  # best still at an edge of the tried grid when the search stopped

    def to_dict(self) -> dict:
        return {"best": self.best, "score": self.score, "at_edge": self.at_edge,
                "tried": [list(t) for t in self.tried]}


def tune(evaluate: Callable[[float], float], grid: Sequence[float], *, budget: int,
         maximize: bool = True, spacing: str = "auto",
         bounds: tuple[float | None, float | None] = (None, None)) -> Tuned:
    """Choose a hyperparameter on validation, extending the grid past an edge optimum.

    Args:
      evaluate: value -> validation score (never a test score).
      grid: the starting values (at least two, distinct).
      budget: the most evaluations allowed; give every compared method the same.
      maximize: higher scores are better.
      spacing, bounds: how the grid is extended (:func:`extend_grid`).

    Every value is evaluated once. After the starting grid, while the best value
    is at an edge and the budget allows, the grid grows by one value on that side.
    ``at_edge`` is True when the search stopped with the best value still at an
    edge (out of budget, or at a bound): the report must say so.
    """
    tried = _evaluate_grid(evaluate, grid, budget)

    def edge(tried):
        keys = sorted(tried)
        return grid_edge(keys, [tried[k] for k in keys], maximize)

    _extend_past(evaluate, tried, edge, budget, spacing, bounds)
    keys = sorted(tried)
    scores = np.array([tried[k] for k in keys])
    best = keys[int(np.argmax(scores if maximize else -scores))]
    side = grid_edge(keys, scores, maximize)
    return Tuned(best, tried[best], tuple((k, tried[k]) for k in keys), side is not None)


def tune_methods(evaluators: Mapping[str, Callable[[float], float]],
                 grids: Mapping[str, Sequence[float]], *, budget: int, maximize: bool = True,
                 spacing: str = "auto") -> dict[str, Tuned]:
    """:func:`tune` each method on its own grid with one shared ``budget``."""
    missing = sorted(set(evaluators) - set(grids))
    if missing:
        raise ValueError(f"`grids` lacks a grid for method(s) {', '.join(missing)}")
    return {m: tune(f, grids[m], budget=budget, maximize=maximize, spacing=spacing)
            for m, f in evaluators.items()}


def claim(text: str, paper: str, comparison: Mapping, *, names: tuple[str, str],
          fmt: str = ".3f") -> dict:
    """A row of the claims table: the claim, the paper's figure, ours with its interval.

    Args:
      text: the claim in one line (e.g. ``"Fisher merging beats averaging"``).
      paper: the paper's own figure for it, in words and numbers.
      comparison: the output of :func:`compare` (claimed method first).
      names: labels of the claimed method and its foil.
      fmt: number format.
    """
    a, b = (Estimate.from_dict(comparison[k]) for k in ("claimed", "foil"))
    d = Estimate.from_dict(comparison["difference"])
    sign = "+" if d.mean >= 0 else "-"
    diff = Estimate(abs(d.mean), d.lo, d.hi, d.n, d.sd, d.level).format(fmt)
    ours = (f"{names[0]} − {names[1]} = {sign}{diff} ({names[0]} {a.format(fmt)}, "
            f"{names[1]} {b.format(fmt)}; {d.n} seeds, {round(100 * d.level)}% CI)")
    return {"claim": text, "paper": paper, "ours": ours, "verdict": comparison["verdict"],
            **{k: comparison[k] for k in ("claimed", "foil", "difference", "outcome",
                                          "indicative")}}


def smallest_reaching(evaluate: Callable[[float], float], grid: Sequence[float], target: float,
                      *, budget: int, spacing: str = "auto",
                      bounds: tuple[float | None, float | None] = (None, None)) -> Tuned:
    """The smallest value whose validation score reaches ``target`` (matched-score selection).

    For comparisons at matched quality: e.g. each method's smallest learning rate
    that reaches a given validation accuracy. When the smallest value tried already
    reaches ``target`` the grid is extended downwards, and when none does it is
    extended upwards, while the budget lasts. ``at_edge`` is True when the search
    stopped without a bracketing pair (then ``best`` is the smallest value reaching
    the target, or the best-scoring value when none does).
    """
    tried = _evaluate_grid(evaluate, grid, budget)

    def state(tried):
        keys = sorted(tried)
        hits = [k for k in keys if tried[k] >= target]
        if not hits:
            return keys, None, "high"
        return keys, hits[0], "low" if hits[0] == keys[0] else None

    _extend_past(evaluate, tried, lambda t: state(t)[2], budget, spacing, bounds)
    keys, hit, side = state(tried)
    best = hit if hit is not None else max(keys, key=lambda k: tried[k])
    return Tuned(best, tried[best], tuple((k, tried[k]) for k in keys), side is not None)
