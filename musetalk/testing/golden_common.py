"""Shared pieces of the golden verifier: one result row per stage and the error measures.

Every golden set is verified by a function ``verify(set_dir) -> list[StageResult]`` living next to
the code it checks (see ``musetalk.testing.golden`` for the registry). Expected arrays are only ever
*compared*; they never feed the computation of an output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class StageResult:
    """One verified stage: its name, the measured error, the tolerance and the verdict."""

    stage: str
    measure: str  # what `value` is, e.g. "max abs err" or "% px within 2"
    value: float
    tolerance: str  # human-readable rule, e.g. "<= 1e-4"
    passed: bool | None  # None = not covered (never counts as PASS)
    detail: str = ""

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "NOT COVERED"}[self.passed]

    def line(self) -> str:
        value = "-" if self.passed is None and np.isnan(self.value) else f"{self.value:.6g}"
        extra = f"  ({self.detail})" if self.detail else ""
        return f"{self.verdict:<11} {self.stage:<34} {self.measure} = {value} (tolerance {self.tolerance}){extra}"


def max_abs(stage: str, actual: ArrayLike, expected: ArrayLike, tol: float) -> StageResult:
    """Max absolute error; shapes must match (a shape mismatch is a FAIL, not an exception)."""
    got, want = np.asarray(actual), np.asarray(expected)
    if got.shape != want.shape:
        return StageResult(stage, "max abs err", float("inf"), f"<= {tol:g}", False,
                           f"shape {got.shape} != expected {want.shape}")
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    return StageResult(stage, "max abs err", err, f"<= {tol:g}", bool(err <= tol))


def frac_within(stage: str, actual: np.ndarray, expected: np.ndarray, levels: float, min_fraction: float) -> StageResult:
    """Fraction of elements within ``levels`` of the expected value (``levels=0``: exactly equal)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    rule = f">= {min_fraction * 100:g} % within {levels:g}"
    if actual.shape != expected.shape:
        return StageResult(stage, "% within", 0.0, rule, False, f"shape {actual.shape} != expected {expected.shape}")
    close = np.abs(actual.astype(np.int64 if actual.dtype.kind in "iub" else np.float64)
                   - expected.astype(np.int64 if expected.dtype.kind in "iub" else np.float64)) <= levels
    frac = float(close.mean()) if close.size else 1.0
    return StageResult(stage, "% within", frac * 100.0, rule, bool(frac >= min_fraction))


def exact(stage: str, actual: ArrayLike, expected: ArrayLike) -> StageResult:
    """Exact equality (integer tracks, offsets, frame indices)."""
    got, want = np.asarray(actual), np.asarray(expected)
    if got.shape != want.shape:
        return StageResult(stage, "mismatches", float("inf"), "== 0", False,
                           f"shape {got.shape} != expected {want.shape}")
    n_bad = int(np.count_nonzero(got != want))
    return StageResult(stage, "mismatches", float(n_bad), "== 0", n_bad == 0)


def not_covered(stage: str, why: str) -> StageResult:
    return StageResult(stage, "n/a", float("nan"), "n/a", None, why)


def guarded(stage: str, fn: Callable[[], list[StageResult] | StageResult]) -> list[StageResult]:
    """Run one stage check; an exception becomes a FAIL row that names it instead of aborting the run."""
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - the verifier reports, it never crashes on one stage
        return [StageResult(stage, "error", float("nan"), "-", False, f"{type(exc).__name__}: {exc}")]
    return out if isinstance(out, list) else [out]


Verifier = Callable[[Path], list[StageResult]]
