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

Both kinds of schedule share one interface, :class:`NoiseSchedule`, which is all the samplers, the SDE
view, the losses and the likelihood code use: a family q(x_t | x_0) = N(α_t x_0, σ_t² I) over T levels
with an increasing noise-to-signal ratio σ̄_t = σ_t/α_t (the "VE σ" above). :class:`DiscreteSchedule` is the
variance-preserving one (α² + σ² = 1, DDPM); :class:`VESchedule` the variance-exploding one of NCSN/SMLD
(α = 1, σ_t a geometric ladder; Song & Ermon 2019 §4.2, Song et al. 2021b eq. 9). The log-σ̄ table,
its interpolation, ``t_at``, the spacings, q(x_t | x_0) and the posterior are written once for both.
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
SPACINGS = ("trailing", "leading", "linspace", "karras", "geometric")
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
            raise ValueError(f"cosine schedule needs 0 < max_beta < 1 and cosine_s >= 0, "
                             f"got {self.max_beta}, {self.cosine_s}")


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


def gaussian_posterior(alpha_t: Any, sigma_t: Any, alpha_s: Any, sigma_s: Any) -> tuple[Any, Any, Any, Any]:
    """Coefficients of q(x_s | x_t, x_0) for s < t of any Gaussian family x_t = α_t x_0 + σ_t ε.

    With α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α²_{t|s} σ_s² (the transition q(x_t | x_s)):
    mean = c0 x_0 + ct x_t with c0 = α_s σ²_{t|s}/σ_t², ct = α_{t|s} σ_s²/σ_t², and variance
    σ²_{t|s} σ_s²/σ_t² (Kingma et al. 2021, VDM eq. 3 and App. A); returns ``(c0, ct, var_small, var_large)``
    with var_large = σ²_{t|s} (DDPM §3.2's "σ² = β" choice, for strided steps β_{t|s}). For VP this is
    DDPM eq. 6-7 (:func:`posterior_coefficients`); for VE (α = 1) the SMLD ancestral step of Song et al. 2021b
    eq. 47. σ_s = 0 (s is clean data) gives c0 = 1, ct = 0, var_small = 0. Floats or tensors.
    """
    ratio = alpha_t / alpha_s
    var_ts = sigma_t**2 - ratio**2 * sigma_s**2
    c0 = alpha_s * var_ts / sigma_t**2
    ct = ratio * sigma_s**2 / sigma_t**2
    return c0, ct, var_ts * sigma_s**2 / sigma_t**2, var_ts


def posterior_coefficients(abar_t: Any, abar_s: Any) -> tuple[Any, Any, Any, Any]:
    """Coefficients of q(x_s | x_t, x_0) for s < t (s = t − 1 is DDPM eq. 6-7), valid for strided steps.

    With β_{t|s} = 1 − ᾱ_t/ᾱ_s: mean = c0 x_0 + ct x_t, c0 = √ᾱ_s β_{t|s}/(1−ᾱ_t),
    ct = √(ᾱ_t/ᾱ_s)(1−ᾱ_s)/(1−ᾱ_t); variance β̃ = (1−ᾱ_s)/(1−ᾱ_t) β_{t|s} (eq. 7), and the
    "large" choice σ² = β_{t|s} (DDPM §3.2). Works on floats and tensors; ᾱ_s = 1 means s is clean data.
    The VP case of :func:`gaussian_posterior`, written in ᾱ so β_{t|s} has no cancellation.
    """
    beta_ts = 1 - abar_t / abar_s
    c0 = abar_s**0.5 * beta_ts / (1 - abar_t)
    ct = (abar_t / abar_s) ** 0.5 * (1 - abar_s) / (1 - abar_t)
    var_small = (1 - abar_s) / (1 - abar_t) * beta_ts
    return c0, ct, var_small, beta_ts


class NoiseSchedule:
    """The interface every sampler, loss and likelihood uses: T levels t = 0..T−1 of q(x_t | x_0) =
    N(α_t x_0, σ_t² I) with σ̄_t = σ_t/α_t increasing (see the module doc).

    A subclass sets ``config`` (with ``num_train_timesteps`` and ``prediction_type``), calls
    :meth:`_set_tables` with its exact α_t, σ_t per integer t, and implements :meth:`alpha_sigma_of` (the
    (α, σ) of a level given log σ̄, used between integer steps), :attr:`prior_std`, :meth:`input_scale` and
    the config round trip. Lookups return the dtype and device of their query; tables are cached per
    device/dtype.
    """

    kind = ""  # "vp" or "ve"
    config: Any

    def _set_tables(self, alpha: Tensor, sigma: Tensor, log_sigmas: Tensor) -> None:
        """Exact float64 (α_t, σ_t) per integer t and the finite, increasing log σ̄_t table."""
        self._tables = {"alpha": alpha, "sigma": sigma, "log_sigmas": log_sigmas}
        self.log_sigmas = log_sigmas
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps (noise levels)."""
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        """What the denoiser trained with this schedule predicts ("eps", "v" or "x0")."""
        return self.config.prediction_type

    @property
    def prior_std(self) -> float:
        """Std of the prior p(x_{T−1}) = N(0, prior_std² I) that sampling starts from."""
        raise NotImplementedError

    def alpha_sigma_of(self, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(α, σ) of the level whose noise-to-signal ratio is σ̄ = exp(log_sigma)."""
        raise NotImplementedError

    def input_scale(self, t: Tensor | float) -> Tensor:
        """c_in(t): the denoiser network sees c_in · x_t (:meth:`scale_model_input`)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # ---- lookups --------------------------------------------------------------------------------
    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = self._tables[name].to(device=device, dtype=dtype)
        return self._cache[key]

    def _interp_log_sigma(self, t: Tensor) -> Tensor:
        """log σ̄ at fractional t: linear interpolation between integer steps (k-diffusion's t_to_sigma)."""
        T = self.num_train_timesteps
        table = self._table("log_sigmas", t.device, t.dtype)
        t = t.clamp(0, T - 1)
        low = t.floor().clamp(max=T - 2)
        w = t - low
        low = low.long()
        return (1 - w) * table[low] + w * table[low + 1]

    def alpha_sigma(self, t: Tensor | float | int, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Coefficients ``(α_t, σ_t)`` of q(x_t | x_0) = N(α_t x_0, σ_t² I) (DDPM eq. 4 for VP).

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
            a_interp, s_interp = self.alpha_sigma_of(self._interp_log_sigma(tf))
            alpha = torch.where(exact, self._table("alpha", device, dtype)[index], a_interp)
            sigma = torch.where(exact, self._table("sigma", device, dtype)[index], s_interp)
        else:
            if t.device.type == "cpu" and bool(((t < 0) | (t >= T)).any()):  # no host sync on accelerators
                raise ValueError(f"timesteps must lie in [0, {T - 1}], got min {int(t.min())} max {int(t.max())}")
            alpha = self._table("alpha", device, dtype)[t.long()]
            sigma = self._table("sigma", device, dtype)[t.long()]
        if like is not None and alpha.ndim == 1 and like.ndim > 1:
            alpha = alpha.view(-1, *([1] * (like.ndim - 1)))
            sigma = sigma.view(-1, *([1] * (like.ndim - 1)))
        return alpha.to(out_dtype), sigma.to(out_dtype)

    def sigma_at(self, t: Tensor | float) -> Tensor:
        """Noise-to-signal ratio σ̄(t) = σ_t/α_t, the noise level of the VE view x/α (Karras et al. 2022,
        Table 1), fractional t interpolated in log σ̄; finite at zero terminal SNR (module doc). float64 for
        non-float input."""
        t = _as_float_tensor(t)
        return self._interp_log_sigma(t).exp()

    def t_at(self, sigma: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_at`: the fractional timestep with noise level σ̄, clamped to [0, T−1]."""
        sigma = _as_float_tensor(sigma)
        table = self._table("log_sigmas", sigma.device, sigma.dtype)
        log_sigma = sigma.log()
        low = (torch.searchsorted(table, log_sigma.contiguous()) - 1).clamp(0, len(table) - 2)
        lo, hi = table[low], table[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(sigma.dtype) + w

    def log_snr_at(self, t: Tensor | float) -> Tensor:
        """λ(t) = log SNR(t) = −2 log σ̄(t) (Kingma et al. 2021; DPM-Solver's λ = log(α/σ) is λ/2)."""
        return -2 * self.sigma_at(t).log()

    def t_at_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Fractional timestep with log-SNR ``log_snr`` (inverse of :meth:`log_snr_at`)."""
        return self.t_at(torch.exp(-0.5 * _as_float_tensor(log_snr)))

    def scale_model_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        """What a denoiser *network* is fed: c_in(t) · x_t (Karras et al. 2022, Table 1 "c_in"; identity for
        VP). Training and every sampler's model_fn apply it at the same place, the network's input."""
        scale = self.input_scale(torch.as_tensor(t, device=x_t.device))
        if scale.ndim == 1 and x_t.ndim > 1:
            scale = scale.view(-1, *([1] * (x_t.ndim - 1)))
        return x_t * scale.to(x_t.dtype)

    # ---- forward process ---------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample q(x_t | x_0) = N(α_t x_0, σ_t² I) as α_t x_0 + σ_t ε (DDPM eq. 4; SMLD's x_0 + σ_t ε)."""
        alpha, sigma = self.alpha_sigma(t, like=x0)
        return alpha * x0 + sigma * noise

    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor,
                                t_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean μ̃_t(x_t, x_0) and variance of q(x_{t_prev} | x_t, x_0) (DDPM eq. 6-7; :func:`gaussian_posterior`).

        ``t_prev`` defaults to t − 1; a negative t_prev means the clean sample (α = 1, σ = 0).
        The variance is returned shaped (B, 1, ...) like the mean's broadcast.
        """
        t = torch.as_tensor(t, device=x_t.device)
        t_prev = t - 1 if t_prev is None else torch.as_tensor(t_prev, device=x_t.device)
        if bool((t_prev >= t).any()):
            raise ValueError("posterior needs t_prev < t")
        alpha_t, sigma_t = self.alpha_sigma(t, like=x_t)
        alpha_s, sigma_s = self.alpha_sigma(t_prev.clamp(min=0), like=x_t)
        clean = (t_prev < 0).view(alpha_s.shape) if alpha_s.ndim else t_prev < 0
        alpha_s = torch.where(clean, torch.ones_like(alpha_s), alpha_s)
        sigma_s = torch.where(clean, torch.zeros_like(sigma_s), sigma_s)
        if self.kind == "vp":  # DDPM's ᾱ form: the same numbers without cancellation in β_{t|s}
            c0, ct, var, _ = posterior_coefficients(alpha_t**2, alpha_s**2)
        else:
            c0, ct, var, _ = gaussian_posterior(alpha_t, sigma_t, alpha_s, sigma_s)
        return c0 * x0 + ct * x_t, var

    # ---- sampling grids ----------------------------------------------------------------------------
    def timesteps(self, steps: int, spacing: str = "trailing", rho: float = 7.0) -> Tensor:
        """Descending sampling timesteps (float64, CPU) for ``steps`` model evaluations.

        "linspace", "leading", "trailing" are Table 2 of Lin et al. 2024 (0-based, as diffusers):
        round(linspace(0, T−1, S)), arange(0, T, T//S) and round(arange(T, 0, −T/S)) − 1;
        trailing starts at t = T−1 (recommended, and the default). "karras" spaces σ by EDM eq. 5,
        σ_i = (σ_max^{1/ρ} + i/(S−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, and gives fractional t. "geometric"
        spaces σ̄ geometrically from σ̄(T−1) to σ̄(0), the noise ladder of annealed Langevin dynamics
        (Song & Ermon 2019, §4.2); for a VE schedule it is round-free linspace in t.
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
        elif spacing in ("karras", "geometric"):
            s_min, s_max = self.sigma_at(0.0).item(), self.sigma_at(float(T - 1)).item()
            frac = i / max(steps - 1, 1)
            if spacing == "karras":
                s_min, s_max = s_min ** (1 / rho), s_max ** (1 / rho)
                ts = self.t_at((s_max + frac * (s_min - s_max)) ** rho)
            else:
                ts = self.t_at(torch.exp(math.log(s_max) + frac * (math.log(s_min) - math.log(s_max))))
            ts[0], ts[-1] = float(T - 1), (0.0 if steps > 1 else float(T - 1))
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {list(SPACINGS)}")
        return ts

    # ---- config round trip -------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-able constructor config (what ``scheduler/config.json`` holds)."""
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Rebuild from :meth:`to_config` output (``_``-prefixed keys are metadata); unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        values = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"schedule config: unknown keys {unknown} (expected {sorted(fields)})")
        return cls(cls.config_class(**values))


class DiscreteSchedule(NoiseSchedule):
    """A T-step VP noise schedule (DDPM): α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), with conversions t ⇄ σ ⇄ log-SNR.

    Build it with ``DiscreteSchedule.from_name("cosine", zero_terminal_snr=True)`` or
    ``DiscreteSchedule(ScheduleConfig(...))``.
    """

    kind = "vp"
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
        self._set_tables(ac.sqrt(), (1 - ac).sqrt(), 0.5 * ((1 - floored).log() - floored.log()))

    @classmethod
    def from_name(cls, name: str = "scaled_linear", **kwargs: Any) -> DiscreteSchedule:
        """``from_name("linear", num_train_timesteps=1000, zero_terminal_snr=False, ...)``."""
        return cls(ScheduleConfig(name=name, **kwargs))

    @property
    def prior_std(self) -> float:
        """1: the VP marginal at t = T−1 is ≈ N(0, I) (DDPM §2, p(x_T) = N(0, I))."""
        return 1.0

    def alpha_sigma_of(self, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        """α = 1/√(1 + σ̄²), σ = σ̄ α (α² + σ² = 1), computed as exp(−½ softplus(2 log σ̄))."""
        half_log_1p = 0.5 * F.softplus(2 * log_sigma)  # ½ log(1 + σ̄²)
        return torch.exp(-half_log_1p), torch.exp(log_sigma - half_log_1p)

    def input_scale(self, t: Tensor | float) -> Tensor:
        """1: VP inputs already have unit variance for unit-variance data."""
        return torch.ones_like(_as_float_tensor(t))

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


@dataclass
class VEScheduleConfig:
    """A variance-exploding schedule: T noise levels σ_min → σ_max, geometric (``scheduler/config.json``).

    Song & Ermon 2019 (§4.2) take σ_max ≈ the largest pairwise distance of the training data and σ_min
    small enough to be invisible; Song et al. 2021b (App. C) use σ_min = 0.01, σ_max = 50 for CIFAR-10 in
    [0, 1]. ``prediction_type`` "eps" or "x0" (v-prediction needs α² + σ² = 1).
    """

    name: str = "ve"
    num_train_timesteps: int = 1000
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    prediction_type: str = "eps"

    def __post_init__(self) -> None:
        if self.name != "ve":
            raise ValueError(f"a VE schedule config has name 've', got {self.name!r}")
        if int(self.num_train_timesteps) != self.num_train_timesteps or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps}")
        self.num_train_timesteps = int(self.num_train_timesteps)
        self.sigma_min, self.sigma_max = float(self.sigma_min), float(self.sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        self.prediction_type = normalize_prediction_type(self.prediction_type)
        if self.prediction_type == "v":
            raise ValueError("v-prediction is defined for VP schedules (α² + σ² = 1); use 'eps' or 'x0' with 've'")


class VESchedule(NoiseSchedule):
    """The NCSN/SMLD noise ladder as a schedule: α_t = 1, σ_t = σ_min (σ_max/σ_min)^{t/(T−1)} (Song & Ermon
    2019, §4.2's geometric sequence; Song et al. 2021b eq. 9/31, the VE SDE's σ(t)). log σ̄ is linear in t,
    so fractional t (the log-σ interpolation of :class:`NoiseSchedule`) is exactly the continuous σ(t)."""

    kind = "ve"
    config_class = VEScheduleConfig

    def __init__(self, config: VEScheduleConfig | None = None) -> None:
        self.config = config or VEScheduleConfig()
        c = self.config
        frac = torch.arange(c.num_train_timesteps, dtype=torch.float64) / (c.num_train_timesteps - 1)
        log_sigmas = math.log(c.sigma_min) + frac * (math.log(c.sigma_max) - math.log(c.sigma_min))
        sigma = log_sigmas.exp()
        self.sigmas = sigma
        self.snr = sigma.pow(-2)
        self.log_snr = -2 * log_sigmas
        self._set_tables(torch.ones_like(sigma), sigma, log_sigmas)

    @property
    def prior_std(self) -> float:
        """σ_max: the VE prior p_T = N(0, σ_max² I) (Song et al. 2021b, App. C / eq. 31's initial state)."""
        return self.config.sigma_max

    def alpha_sigma_of(self, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(log_sigma), log_sigma.exp()

    def input_scale(self, t: Tensor | float) -> Tensor:
        """c_in = 1/√(1 + σ_t²) (Karras et al. 2022, Table 1 with σ_data = 1): the network sees inputs of
        unit-ish variance whatever σ, which is x_t rescaled to the VP variable of the same σ̄."""
        return torch.rsqrt(1 + self.sigma_at(_as_float_tensor(t)) ** 2)


SCHEDULE_CLASSES: dict[str, type[NoiseSchedule]] = {"DiscreteSchedule": DiscreteSchedule, "VESchedule": VESchedule}


def build_schedule(config: dict[str, Any] | None = None) -> NoiseSchedule:
    """The schedule a config block names: ``{name: ve, sigma_min, sigma_max, ...}`` is a :class:`VESchedule`,
    any other name (linear, scaled_linear, cosine) a VP :class:`DiscreteSchedule`. A saved ``config.json``
    (with its ``_class_name``) reads back the same way."""
    config = dict(config or {})
    cls = VESchedule if config.get("name") == "ve" else DiscreteSchedule
    named = config.get("_class_name")
    if named is not None and SCHEDULE_CLASSES.get(named) not in (None, cls):
        raise ValueError(f"schedule config names class {named!r} but its name is {config.get('name')!r}")
    return cls.from_config(config)
