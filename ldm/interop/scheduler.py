"""The noise schedule and sampler ⇄ a diffusers scheduler config (``scheduler/scheduler_config.json``).

Two tables, each used in both directions:

* :data:`FIELDS`: ``ScheduleConfig`` field ↔ diffusers config key, with the value spellings that differ
  (``cosine`` is diffusers' ``squaredcos_cap_v2``: iDDPM eq. 17 with s = 0.008 and β ≤ 0.999; ``eps`` is
  ``epsilon``, ``v`` is ``v_prediction``, ``x0`` is ``sample``).
* :data:`SAMPLERS`: our sampler ↔ the diffusers scheduler class and the settings under which its steps are
  ours (DDIM eq. 12 landing on ᾱ = 1, DPM-Solver++(2M) with a first-order last step to σ = 0, ...); the
  timestep spacing is diffusers' ``timestep_spacing``. ``ddim`` and ``dpmpp-2m`` are checked step for step
  against diffusers in tests/test_samplers.py.

A diffusers scheduler with other settings (SD 1.x ships ``PNDMScheduler``; its ``DDIMScheduler`` has
``set_alpha_to_one: false, steps_offset: 1``) imports with the nearest sampler and a note saying what differs.
"""

from __future__ import annotations

from typing import Any

from ldm.diffusion.schedules import DEFAULT_BETAS, DiscreteSchedule, ScheduleConfig
from ldm.interop.tables import ConversionError

# (our ScheduleConfig field, diffusers key, {our value: their value} where the spellings differ)
FIELDS: list[tuple[str, str, dict[Any, Any] | None]] = [
    ("num_train_timesteps", "num_train_timesteps", None),
    ("name", "beta_schedule", {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}),
    ("beta_start", "beta_start", None),
    ("beta_end", "beta_end", None),
    ("zero_terminal_snr", "rescale_betas_zero_snr", None),
    ("prediction_type", "prediction_type", {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}),
]
DIFFUSERS_COSINE = {"cosine_s": 0.008, "max_beta": 0.999}   # fixed in diffusers' betas_for_alpha_bar

# our sampler -> (diffusers class, the settings that make its steps ours)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": True, "steps_offset": 0, "clip_sample": False,
                               "thresholding": False}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                 "final_sigmas_type": "zero", "lower_order_final": True,
                                                 "use_karras_sigmas": False, "steps_offset": 0,
                                                 "thresholding": False}),
    "euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False, "steps_offset": 0}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {"steps_offset": 0}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False, "steps_offset": 0}),
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": False, "steps_offset": 0,
                               "thresholding": False}),
    "lcm": ("LCMScheduler", {"set_alpha_to_one": True, "steps_offset": 0, "clip_sample": False,
                             "thresholding": False}),
}
SPACINGS = ("trailing", "leading", "linspace")
DEFAULT_SAMPLER = "dpmpp-2m"


def export_problems(schedule: DiscreteSchedule) -> list[str]:
    """What a diffusers scheduler config cannot express about this schedule."""
    c = schedule.config
    if c.name == "cosine" and (c.cosine_s, c.max_beta) != tuple(DIFFUSERS_COSINE.values()):
        return [f"cosine schedule with cosine_s={c.cosine_s}, max_beta={c.max_beta} (diffusers fixes "
                f"{DIFFUSERS_COSINE})"]
    return []


def to_diffusers_config(schedule: DiscreteSchedule) -> dict[str, Any]:
    """The diffusers keys of the schedule (DDIM/DDPM/DPMSolver... share them)."""
    problems = export_problems(schedule)
    if problems:
        raise ConversionError(f"a diffusers scheduler cannot express: {'; '.join(problems)}")
    values = vars(schedule.config)
    out = {}
    for ours, theirs, spelling in FIELDS:
        if ours in ("beta_start", "beta_end") and schedule.config.name not in DEFAULT_BETAS:
            continue
        out[theirs] = spelling[values[ours]] if spelling else values[ours]
    return out


def from_diffusers_config(config: dict[str, Any]) -> DiscreteSchedule:
    """The schedule of a diffusers scheduler config dict; what has no equivalent is a ConversionError."""
    if config.get("trained_betas") is not None:
        raise ConversionError("diffusers config has trained_betas; only linear/scaled_linear/squaredcos_cap_v2 "
                              "schedules convert")
    values: dict[str, Any] = {}
    for ours, theirs, spelling in FIELDS:
        if theirs not in config:
            continue
        value = config[theirs]
        if spelling:
            inverse = {v: k for k, v in spelling.items()}
            if value not in inverse:
                raise ConversionError(f"diffusers {theirs} {value!r} has no equivalent here: use one of "
                                      f"{list(inverse)}")
            value = inverse[value]
        values[ours] = value
    values.setdefault("name", "linear")  # diffusers' default beta_schedule
    values.setdefault("prediction_type", "eps")
    if values["name"] in DEFAULT_BETAS:  # diffusers' defaults when the keys are absent
        values.setdefault("beta_start", 1e-4)
        values.setdefault("beta_end", 0.02)
    else:
        values.pop("beta_start", None)
        values.pop("beta_end", None)
    try:
        return DiscreteSchedule(ScheduleConfig(**values))
    except ValueError as e:
        raise ConversionError(f"diffusers scheduler config: {e}") from e


def scheduler_config(schedule: DiscreteSchedule, sampler: str, spacing: str) -> dict[str, Any]:
    """A full ``scheduler_config.json`` (``_class_name`` included) whose steps are ``sampler``'s."""
    if sampler not in SAMPLERS:
        raise ConversionError(f"sampler {sampler!r} has no diffusers scheduler (known: {sorted(SAMPLERS)})")
    if spacing not in SPACINGS:
        raise ConversionError(f"timestep spacing {spacing!r} has no diffusers equivalent (use one of {SPACINGS})")
    cls, settings = SAMPLERS[sampler]
    return {"_class_name": cls, **to_diffusers_config(schedule), **settings, "timestep_spacing": spacing}


def sampler_from_scheduler(config: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(our sampler, timestep spacing, notes on what differs) for a diffusers scheduler config dict."""
    cls = config.get("_class_name")
    spacing = config.get("timestep_spacing", "leading")
    notes = []
    if spacing not in SPACINGS:
        notes.append(f"timestep_spacing {spacing!r} read as 'trailing'")
        spacing = "trailing"
    by_class = {c: name for name, (c, _) in SAMPLERS.items()}
    if cls not in by_class:
        notes.append(f"{cls} has no ldm sampler; pipeline.json uses {DEFAULT_SAMPLER}")
        return DEFAULT_SAMPLER, spacing, notes
    sampler = by_class[cls]
    differs = {k: config[k] for k, v in SAMPLERS[sampler][1].items() if k in config and config[k] != v
               and (k != "steps_offset" or spacing == "leading")}  # the offset only moves leading timesteps
    if differs:
        notes.append(f"{cls} with {differs} differs slightly from ldm's {sampler} "
                     f"(which uses {{{', '.join(f'{k}: {SAMPLERS[sampler][1][k]}' for k in differs)}}})")
    return sampler, spacing, notes
