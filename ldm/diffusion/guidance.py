"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that turns a conditional denoiser
``denoiser(x, t, context[, mask])`` into the ``model_fn(x, t)`` every sampler takes.

Guidance is applied to the model's raw output, whatever its prediction type. That is exact: for a
fixed x_t the maps output → x̂0, ε̂, v̂ are affine with the same x_t term in both branches
(objectives.predict_x0_eps), so ``u + w (c − u)`` in eps, v or x0 gives the same guided x̂0 and ε̂
(Ho & Salimans 2022 eq. 6 is written for ε). The guidance rescale is not linear, so it depends on the
space it acts in: like Lin et al. 2024 (§3.4, who use v-prediction) it acts on the model output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]


def guided_output(uncond: Tensor, cond: Tensor, scale: float, rescale: float = 0.0) -> Tensor:
    """``u + w (c − u)`` (Ho & Salimans 2022, eq. 6 with w = 1 + their w), then with φ = ``rescale`` the
    guidance rescale of Lin et al. 2024, eq. 15-16: x_rescaled = x_cfg · std(x_pos)/std(x_cfg),
    x = φ x_rescaled + (1 − φ) x_cfg, stds taken per sample over all non-batch dims."""
    guided = uncond + scale * (cond - uncond)
    if rescale:
        dims = list(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True).clamp(min=torch.finfo(guided.dtype).tiny)
        guided = rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided
    return guided


def classifier_free_guidance(denoiser: Denoiser, cond: Tensor, uncond: Tensor, scale: float,
                             rescale: float = 0.0, cond_mask: Tensor | None = None,
                             uncond_mask: Tensor | None = None, cond_pooled: Tensor | None = None,
                             uncond_pooled: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap ``denoiser`` so each ``model_fn(x, t)`` call evaluates cond and uncond in ONE batched forward
    of size 2B and returns :func:`guided_output`. ``scale`` = 1 gives the conditional model, 0 the
    unconditional one.

    ``cond``/``uncond`` are (B, L, D) token embeddings (a batch of 1 is broadcast to B). With masks
    (B, L) the denoiser is called as ``denoiser(x, t, context, mask)``, else ``denoiser(x, t, context)``;
    a missing mask for one branch counts as all tokens valid. ``cond_pooled``/``uncond_pooled`` (B or 1, E),
    given together, are passed as ``pooled=`` (a U-Net conditioned on the pooled text embedding).
    """
    if (cond_pooled is None) != (uncond_pooled is None):
        raise ValueError("pass both cond_pooled and uncond_pooled, or neither")
    if cond.ndim < 2 or uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} contexts must share (L, D): "
                         "encode the empty prompt padded to the same length")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale φ must be in [0, 1], got {rescale}")
    use_mask = cond_mask is not None or uncond_mask is not None

    def batch(a: Tensor, b: int) -> Tensor:
        if a.shape[0] == b:
            return a
        if a.shape[0] == 1:
            return a.expand(b, *a.shape[1:])
        raise ValueError(f"context batch {a.shape[0]} does not match sample batch {b} (use 1 or {b})")

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        context = torch.cat([batch(uncond, b), batch(cond, b)]).to(device=x.device)
        args = [torch.cat([x, x]), torch.cat([t, t]), context]
        if use_mask:
            ones = torch.ones(cond.shape[:2], dtype=torch.bool, device=x.device)
            masks = [batch(m if m is not None else ones, b).to(x.device) for m in (uncond_mask, cond_mask)]
            if masks[0].dtype != masks[1].dtype:
                masks = [m.to(torch.bool) for m in masks]
            args.append(torch.cat(masks))
        kwargs = {}
        if cond_pooled is not None:
            kwargs["pooled"] = torch.cat([batch(uncond_pooled, b), batch(cond_pooled, b)]).to(device=x.device)
        out_uncond, out_cond = denoiser(*args, **kwargs).chunk(2)
        return guided_output(out_uncond, out_cond, scale, rescale)

    return model_fn
