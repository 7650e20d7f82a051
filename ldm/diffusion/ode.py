"""Small ODE solvers for states that are tuples of tensors: fixed-step Runge–Kutta and adaptive Dormand–Prince.

``integrate(f, y0, t0, t1, method=...)`` solves dy/dt = f(t, y) from t0 to t1 (either direction) where
``y`` is a tuple of tensors (e.g. ``(x, log-density change)`` for the probability-flow likelihood). It
returns ``(y1, nfe)``, nfe being the number of evaluations of ``f``.

* fixed steps: "euler", "heun" (RK2, trapezoid), "rk4" (the classical fourth-order method) over ``steps``
  equal steps (Butcher tableaux, Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.1);
* adaptive: "dopri5", the Dormand & Prince (1980) embedded 5(4) pair (the RK45 of scipy and torchdiffeq's
  default), with the local error of the 4th-order companion kept below ``atol + rtol·max(|y|, |y_new|)`` in
  the RMS norm over all elements, and the step-size controller h ← h · min(5, max(0.2, 0.9 · err^{−1/5}))
  (Hairer et al., §II.4, eq. 4.12-4.13). The first step size follows their "starting step size" algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

State = tuple[Tensor, ...]
OdeFn = Callable[[float, State], State]

FIXED_METHODS = ("euler", "heun", "rk4")
ADAPTIVE_METHODS = ("dopri5",)
METHODS = FIXED_METHODS + ADAPTIVE_METHODS

# Butcher tableaux (c, A, b) of the fixed-step methods
_TABLEAUX: dict[str, tuple[list[float], list[list[float]], list[float]]] = {
    "euler": ([0.0], [[]], [1.0]),
    "heun": ([0.0, 1.0], [[], [1.0]], [0.5, 0.5]),
    "rk4": ([0.0, 0.5, 0.5, 1.0], [[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6]),
}

# Dormand–Prince 5(4): nodes, stages, 5th-order weights (FSAL: the last stage is f at the new point), 4th-order weights
_DP_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_DP_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_DP_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_DP_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]


def _combine(y: State, h: float, ks: list[State], weights: list[float]) -> State:
    """y + h Σ w_i k_i, element by element of the state tuple."""
    out = []
    for j, yj in enumerate(y):
        acc = yj
        for w, k in zip(weights, ks):
            if w:
                acc = acc + (h * w) * k[j]
        out.append(acc)
    return tuple(out)


def _rk_step(f: OdeFn, t: float, y: State, h: float, tableau: tuple[list[float], list[list[float]], list[float]],
             k0: State | None = None) -> tuple[State, list[State]]:
    c, a, b = tableau
    ks: list[State] = []
    for i, ci in enumerate(c):
        if i == 0 and k0 is not None:
            ks.append(k0)
            continue
        ks.append(f(t + ci * h, _combine(y, h, ks, a[i]) if i else y))
    return _combine(y, h, ks, b), ks


def _rms(parts: list[Tensor]) -> float:
    total = sum(float(p.double().pow(2).sum()) for p in parts)
    count = sum(p.numel() for p in parts)
    return math.sqrt(total / max(count, 1))


def integrate(f: OdeFn, y0: State, t0: float, t1: float, method: str = "rk4", steps: int = 50,
              rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 10_000) -> tuple[State, int]:
    """Solve dy/dt = f(t, y), y(t0) = y0, to t1; returns ``(y(t1), nfe)`` (see the module doc)."""
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}: use one of {list(METHODS)}")
    if t1 == t0:
        return y0, 0
    if method in FIXED_METHODS:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        tableau, h, y = _TABLEAUX[method], (t1 - t0) / steps, y0
        for i in range(int(steps)):
            y, _ = _rk_step(f, t0 + i * h, y, h, tableau)
        return y, int(steps) * len(tableau[0])
    return _dopri5(f, y0, t0, t1, rtol, atol, max_steps)


def _initial_step(f0: State, y0: State, f: OdeFn, t0: float, direction: float, rtol: float,
                  atol: float) -> tuple[float, int]:
    """Hairer et al. §II.4 "starting step size": h from ‖y0‖, ‖f0‖ and a trial Euler step (order 5)."""
    scale = [atol + rtol * y.abs() for y in y0]
    d0 = _rms([y / s for y, s in zip(y0, scale)])
    d1 = _rms([k / s for k, s in zip(f0, scale)])
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = tuple(y + direction * h0 * k for y, k in zip(y0, f0))
    f1 = f(t0 + direction * h0, y1)
    d2 = _rms([(a - b) / s for a, b, s in zip(f1, f0, scale)]) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1), 1


def _dopri5(f: OdeFn, y0: State, t0: float, t1: float, rtol: float, atol: float, max_steps: int) -> tuple[State, int]:
    direction = 1.0 if t1 > t0 else -1.0
    t, y = t0, y0
    k0 = f(t, y)
    h, nfe = _initial_step(k0, y0, f, t0, direction, rtol, atol)
    nfe += 1
    for _ in range(max_steps):
        if (t1 - t) * direction <= 1e-12 * max(1.0, abs(t1)):
            return y, nfe
        h = min(h, abs(t1 - t))
        y_new, ks = _rk_step(f, t, y, direction * h, (_DP_C, _DP_A, _DP_B5), k0)
        nfe += 6
        k_last = f(t + direction * h, y_new)  # FSAL: the 7th stage is the next step's first
        nfe += 1
        y4 = _combine(y, direction * h, ks + [k_last], _DP_B4)
        err = _rms([(a - b) / (atol + rtol * torch.maximum(c.abs(), a.abs())) for a, b, c in zip(y_new, y4, y)])
        if err <= 1.0:
            t, y, k0 = t + direction * h, y_new, k_last
        h *= min(5.0, max(0.2, 0.9 * (err if err > 0 else 1e-10) ** (-1 / 5)))
    raise RuntimeError(f"dopri5 did not reach t1 = {t1} in {max_steps} steps (last t = {t}); loosen rtol/atol")
