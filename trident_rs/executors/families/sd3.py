"""Stable Diffusion 3: CLIP ×2 + T5 encode, flow-matching MMDiT diffuse with CFG, VAE decode."""
from __future__ import annotations

import numpy as np

from trident_rs.executors.families.base import FamilyStages, gather, generators, split, stack, step_callback

_POSITIVE = ("prompt_embeds", "pooled_prompt_embeds")
_NEGATIVE = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


class SD3Stages(FamilyStages):
    def encode(self, pipe, params):
        cfg = params[0].guidance_scale > 1  # as the pipeline: guidance <= 1 turns CFG off
        pe, ne, pp, np_ = pipe.encode_prompt(
            prompt=[p.prompt for p in params], prompt_2=None, prompt_3=None,
            negative_prompt=[p.negative_prompt for p in params],
            do_classifier_free_guidance=cfg, device=pipe._execution_device, num_images_per_prompt=1,
        )
        names = _POSITIVE + _NEGATIVE if cfg else _POSITIVE
        tensors = (pe, pp, ne, np_) if cfg else (pe, pp)
        per_name = {n: split(t) for n, t in zip(names, tensors)}
        return [{n: per_name[n][i] for n in names} for i in range(len(params))]

    def diffuse(self, pipe, params, embeddings, on_step=None):
        p0 = params[0]
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        names = _POSITIVE + _NEGATIVE if p0.guidance_scale > 1 else _POSITIVE
        inputs = {n: stack(gather(embeddings, n), device, dtype) for n in names}
        latents = pipe(
            **inputs, height=p0.height, width=p0.width, num_inference_steps=p0.steps,
            guidance_scale=p0.guidance_scale, generator=generators(params), output_type="latent",
            return_dict=False, callback_on_step_end=step_callback(on_step, p0.steps),
        )[0]
        return split(latents)

    def decode(self, pipe, params, latents):
        vae = pipe.vae
        x = stack(latents, pipe._execution_device, vae.dtype)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(x, return_dict=False)[0]
        frames = pipe.image_processor.postprocess(image, output_type="np")  # (B, H, W, 3)
        return [np.asarray(frames[i : i + 1]) for i in range(len(params))]


STAGES = SD3Stages()
