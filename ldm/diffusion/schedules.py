"""Discrete T-step noise schedules and the one place where t, sigma and log-SNR are converted.

A schedule is the sequence β_1..β_T of the forward process q(x_t | x_{t−1}) = N(√(1−β_t) x_{t−1}, β_t I)
(DDPM eq. 2). Index ``t`` runs over ``0 .. T−1`` (timestep ``t`` here is DDPM's t+1, as in diffusers).
Derived quantities, all float64 on CPU (a schedule is cheap: four length-T vectors):

* ``alphas = 1 − β``, ``alphas_cumprod = ᾱ_t = Π α_s`` (DDPM eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I)),
* ``snr = ᾱ/(1−ᾱ)`` (Kingma et al. 2021), ``log_snr``, and
* ``sigmas = √((1−ᾱ)/ᾱ)``: the noise level of the variance-exploding view x/√ᾱ (Karras et al. 2022, §2).

Fractional timesteps are interpolated linearly in log-sigma between integer steps (as k-diffusion does),
and ``t_at(sigma)`` is its exact inverse. For a zero-terminal-SNR schedule (Lin et al. 2024) σ_{T−1} = ∞;
the sigma-space conversions then use ᾱ_{T−1} = 2⁻²⁴ (σ ≈ 4096, what diffusers uses too) while integer
timesteps keep the exact ᾱ_{T−1} = 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.diffusion.objectives import normalize_prediction_type

SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("trailing", "leading", "linspace", "karras")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
TERMINAL_ALPHA_CUMPROD_FLOOR = 2.0**-24  # sigma-space stand-in for ᾱ = 0 (diffusers' choice)


@dataclass
class ScheduleConfig:
    """Everything needed to rebuild a schedule; saved as ``scheduler/config.json``.

    ``beta_start``/``beta_end`` default per name (linear: DDPM's 1e-4 → 0.02; scaled_linear: Stable
    Diffusion's 0.00085 → 0.012) and are unused by "cosine". ``prediction_type`` records what the
    denoiser trained with this schedule predicts, so a sampler can read it from the exported part.
    """

    name: str = "scaled_linear"
    num_train_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    zero_terminal_snr: bool = False
    prediction_type: str = "eps"
    cosine_s: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}: use one of {list(SCHEDULES)}")
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps}")
        self.num_train_timesteps = int(self.num_train_timesteps)
        self.prediction_type = normalize_prediction_type(self.prediction_type)
        if self.name in DEFAULT_BETAS:
            start, end = DEFAULT_BETAS[self.name]
            self.beta_start = float(start if self.beta_start is None else self.beta_start)
            self.beta_end = float(end if self.beta_end is None else self.beta_end)
            if not 0 < self.beta_start <= self.beta_end < 1:
                raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        elif not 0 < self.max_beta < 1 or self.cosine_s < 0:
            raise ValueError(f"cosine schedule needs 0 < max_beta < 1 and cosine_s >= 0, got {self.max_beta}, {self.cosine_s}")


def make_betas(config: ScheduleConfig) -> Tensor:
    """β_1..β_T in float64.

    linear: DDPM §4 (1e-4 → 0.02); scaled_linear: √β linear (Rombach et al. 2022, LDM/Stable Diffusion);
    cosine: ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s)) π/2), β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at
    ``max_beta`` (iDDPM, Nichol & Dhariwal 2021, eq. 17); then the zero-terminal-SNR rescale if asked.
    """
    T = config.num_train_timesteps
    if config.name == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    elif config.name == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
    else:
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + config.cosine_s) / (1 + config.cosine_s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=config.max_beta)
    return rescale_zero_terminal_snr(betas) if config.zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ so √ᾱ_T = 0 while √ᾱ_1 is kept (Lin et al. 2024, Algorithm 1)."""
    sqrt_ac = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    alphas_cumprod = sqrt_ac**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def _as_float_tensor(value: Tensor | float) -> Tensor:
    """Tensors keep their float dtype (integers become float64); Python numbers become float64."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() else value.to(torch.float64)
    return torch.tensor(value, dtype=torch.float64)


def posterior_coefficients(abar_t: Any, abar_s: Any) -> tuple[Any, Any, Any, Any]:
    """Coefficients of q(x_s | x_t, x_0) for s < t (s = t − 1 is DDPM eq. 6-7), valid for strided steps.

    With β_{t|s} = 1 − ᾱ_t/ᾱ_s: mean = c0 x_0 + ct x_t, c0 = √ᾱ_s β_{t|s}/(1−ᾱ_t),
    ct = √(ᾱ_t/ᾱ_s)(1−ᾱ_s)/(1−ᾱ_t); variance β̃ = (1−ᾱ_s)/(1−ᾱ_t) β_{t|s} (eq. 7), and the
    "large" choice σ² = β_{t|s} (DDPM §3.2). Works on floats and tensors; ᾱ_s = 1 means s is clean data.
    """
    beta_ts = 1 - abar_t / abar_s
    c0 = abar_s**0.5 * beta_ts / (1 - abar_t)
    ct = (abar_t / abar_s) ** 0.5 * (1 - abar_s) / (1 - abar_t)
    var_small = (1 - abar_s) / (1 - abar_t) * beta_ts
    return c0, ct, var_small, beta_ts


class DiscreteSchedule:
    """A T-step VP noise schedule (DDPM) with conversions t ⇄ σ ⇄ log-SNR.

    Build it with ``DiscreteSchedule.from_name("cosine", zero_terminal_snr=True)`` or
    ``DiscreteSchedule(ScheduleConfig(...))``. Lookups (:meth:`alpha_sigma`, :meth:`q_sample`, ...)
    return the dtype and device of their query; tables are cached per device/dtype.
    """

    config_class = ScheduleConfig

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()
        self.betas = make_betas(self.config)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        if self.config.zero_terminal_snr:
            self.alphas_cumprod[-1] = 0.0  # exact; cumprod already gives 0 up to rounding
        ac = self.alphas_cumprod
        self.snr = ac / (1 - ac)
        self.log_snr = ac.log() - (1 - ac).log()
        self.sigmas = ((1 - ac) / ac).sqrt()
        floored = ac.clamp(min=TERMINAL_ALPHA_CUMPROD_FLOOR)
        self.log_sigmas = 0.5 * ((1 - floored).log() - floored.log())  # finite, increasing in t
        self._tables = {"sqrt_ac": ac.sqrt(), "sqrt_1m_ac": (1 - ac).sqrt(), "log_sigmas": self.log_sigmas}
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_name(cls, name: str = "scaled_linear", **kwargs: Any) -> DiscreteSchedule:
        """``from_name("linear", num_train_timesteps=1000, zero_terminal_snr=False, ...)``."""
        return cls(ScheduleConfig(name=name, **kwargs))

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        """What the denoiser trained with this schedule predicts ("eps", "v" or "x0")."""
        return self.config.prediction_type

    def __repr__(self) -> str:
        return f"DiscreteSchedule({self.config})"

    # ---- lookups --------------------------------------------------------------------------------
    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = self._tables[name].to(device=device, dtype=dtype)
        return self._cache[key]

    def _interp_log_sigma(self, t: Tensor) -> Tensor:
        """log σ at fractional t: linear interpolation between integer steps (k-diffusion's t_to_sigma)."""
        T = self.num_train_timesteps
        table = self._table("log_sigmas", t.device, t.dtype)
        t = t.clamp(0, T - 1)
        low = t.floor().clamp(max=T - 2)
        w = t - low
        low = low.long()
        return (1 - w) * table[low] + w * table[low + 1]

    def alpha_sigma(self, t: Tensor | float | int, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """VP coefficients ``(α_t, σ_t) = (√ᾱ_t, √(1 − ᾱ_t))`` of q(x_t | x_0) (DDPM eq. 4).

        Integer timesteps (or float ones that are whole numbers) read the exact tables; fractional ones
        interpolate in log-sigma. With ``like`` the result has like's dtype/device and shape (B, 1, ...)
        for t of shape (B,); without it, float64 on t's device.
        """
        t = torch.as_tensor(t)
        device = like.device if like is not None else t.device
        out_dtype = like.dtype if like is not None and like.is_floating_point() else torch.float64
        dtype = torch.float64 if out_dtype == torch.float64 and device.type != "mps" else torch.float32
        t = t.to(device)
        T = self.num_train_timesteps
        if t.is_floating_point():
            tf = t.to(dtype)
            index = tf.round().clamp(0, T - 1).long()
            exact = tf == tf.round()
            log_sigma = self._interp_log_sigma(tf)
            half_log_1p = 0.5 * F.softplus(2 * log_sigma)  # ½ log(1 + σ²)
            alpha = torch.where(exact, self._table("sqrt_ac", device, dtype)[index], torch.exp(-half_log_1p))
            sigma = torch.where(exact, self._table("sqrt_1m_ac", device, dtype)[index], torch.exp(log_sigma - half_log_1p))
        else:
            if t.device.type == "cpu" and bool(((t < 0) | (t >= T)).any()):  # no host sync on accelerators
                raise ValueError(f"timesteps must lie in [0, {T - 1}], got min {int(t.min())} max {int(t.max())}")
            alpha = self._table("sqrt_ac", device, dtype)[t.long()]
            sigma = self._table("sqrt_1m_ac", device, dtype)[t.long()]
        if like is not None and alpha.ndim == 1 and like.ndim > 1:
            alpha = alpha.view(-1, *([1] * (like.ndim - 1)))
            sigma = sigma.view(-1, *([1] * (like.ndim - 1)))
        return alpha.to(out_dtype), sigma.to(out_dtype)

    def sigma_at(self, t: Tensor | float) -> Tensor:
        """Noise level σ(t) = √((1−ᾱ_t)/ᾱ_t) of the VE view (Karras et al. 2022, Table 1 "VP"), fractional t
        interpolated in log σ; finite at zero terminal SNR (see module doc). float64 for non-float input."""
        t = _as_float_tensor(t)
        return self._interp_log_sigma(t).exp()

    def t_at(self, sigma: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_at`: the fractional timestep with noise level σ, clamped to [0, T−1]."""
        sigma = _as_float_tensor(sigma)
        table = self._table("log_sigmas", sigma.device, sigma.dtype)
        log_sigma = sigma.log()
        low = (torch.searchsorted(table, log_sigma.contiguous()) - 1).clamp(0, len(table) - 2)
        lo, hi = table[low], table[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(sigma.dtype) + w

    def log_snr_at(self, t: Tensor | float) -> Tensor:
        """λ(t) = log SNR(t) = −2 log σ(t) (Kingma et al. 2021; DPM-Solver's λ = log(α/σ) is λ/2)."""
        return -2 * self.sigma_at(t).log()

    def t_at_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Fractional timestep with log-SNR ``log_snr`` (inverse of :meth:`log_snr_at`)."""
        return self.t_at(torch.exp(-0.5 * _as_float_tensor(log_snr)))

    # ---- forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) as √ᾱ_t x_0 + √(1−ᾱ_t) ε (DDPM eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, like=x0)
        return alpha * x0 + sigma * noise

    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean μ̃_t(x_t, x_0) and variance β̃_t of q(x_{t_prev} | x_t, x_0) (DDPM eq. 6-7).

        ``t_prev`` defaults to t − 1; a negative t_prev means the clean sample (ᾱ = 1).
        The variance is returned shaped (B, 1, ...) like the mean's broadcast.
        """
        t = torch.as_tensor(t, device=x_t.device)
        t_prev = t - 1 if t_prev is None else torch.as_tensor(t_prev, device=x_t.device)
        if bool((t_prev >= t).any()):
            raise ValueError("posterior needs t_prev < t")
        abar_t = self.alpha_sigma(t, like=x_t)[0] ** 2
        abar_s = self.alpha_sigma(t_prev.clamp(min=0), like=x_t)[0] ** 2
        clean = (t_prev < 0).view(abar_s.shape) if abar_s.ndim else t_prev < 0
        abar_s = torch.where(clean, torch.ones_like(abar_s), abar_s)
        c0, ct, var, _ = posterior_coefficients(abar_t, abar_s)
        return c0 * x0 + ct * x_t, var

    # ---- sampling grids ----------------------------------------------------------------------------
    def timesteps(self, steps: int, spacing: str = "trailing", rho: float = 7.0) -> Tensor:
        """Descending sampling timesteps (float64, CPU) for ``steps`` model evaluations.

        "linspace", "leading", "trailing" are Table 2 of Lin et al. 2024 (0-based, as diffusers):
        round(linspace(0, T−1, S)), arange(0, T, T//S) and round(arange(T, 0, −T/S)) − 1;
        trailing starts at t = T−1 (recommended, and the default). "karras" spaces σ by EDM eq. 5,
        σ_i = (σ_max^{1/ρ} + i/(S−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, and gives fractional t.
        """
        T = self.num_train_timesteps
        if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= T:
            raise ValueError(f"steps must be an integer in [1, {T}] (num_train_timesteps), got {steps!r}")
        steps = int(steps)
        i = torch.arange(steps, dtype=torch.float64)
        if spacing == "trailing":
            ts = torch.round(T - i * (T / steps)) - 1
        elif spacing == "leading":
            ts = (i * (T // steps)).flip(0)
        elif spacing == "linspace":
            ts = (i * ((T - 1) / max(steps - 1, 1))).round().flip(0)
        elif spacing == "karras":
            s_min, s_max = self.sigma_at(0.0).item() ** (1 / rho), self.sigma_at(float(T - 1)).item() ** (1 / rho)
            frac = i / max(steps - 1, 1)
            ts = self.t_at((s_max + frac * (s_min - s_max)) ** rho)
            ts[0], ts[-1] = float(T - 1), (0.0 if steps > 1 else float(T - 1))
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {list(SPACINGS)}")
        return ts

    # ---- config round trip -------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-able constructor config (what ``scheduler/config.json`` holds)."""
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DiscreteSchedule:
        """Rebuild from :meth:`to_config` output (``_``-prefixed keys are metadata); unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(ScheduleConfig)}
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"schedule config: unknown keys {unknown} (expected {sorted(fields)})")
        return cls(ScheduleConfig(**values))

    def to_diffusers_config(self) -> dict[str, Any]:
        """The equivalent diffusers scheduler config (DDIM/DDPM/DPMSolver... share these keys); the table is
        ``ldm.interop.scheduler.FIELDS``."""
        from ldm.interop.scheduler import to_diffusers_config

        return to_diffusers_config(self)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> DiscreteSchedule:
        """Build from a diffusers ``scheduler_config.json`` dict (beta_schedule, beta_start, ...)."""
        from ldm.interop.scheduler import from_diffusers_config

        return from_diffusers_config(config)
