"""CogVideoX: T5 encode, 3D-DiT diffuse with CFG, causal 3D VAE decode + video post-processing."""
from __future__ import annotations

import numpy as np

from trident_rs.executors.families.base import FamilyStages, gather, generators, split, stack, step_callback


class CogVideoXStages(FamilyStages):
    def encode(self, pipe, params):
        cfg = params[0].guidance_scale > 1
        pe, ne = pipe.encode_prompt(
            prompt=[p.prompt for p in params], negative_prompt=[p.negative_prompt for p in params],
            do_classifier_free_guidance=cfg, num_videos_per_prompt=1, device=pipe._execution_device,
        )
        pe = split(pe)
        ne = split(ne) if cfg else None
        return [{"prompt_embeds": pe[i], **({"negative_prompt_embeds": ne[i]} if cfg else {})}
                for i in range(len(params))]

    def diffuse(self, pipe, params, embeddings, on_step=None):
        p0 = params[0]
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        names = ("prompt_embeds", "negative_prompt_embeds") if p0.guidance_scale > 1 else ("prompt_embeds",)
        inputs = {n: stack(gather(embeddings, n), device, dtype) for n in names}
        latents = pipe(
            **inputs, height=p0.height, width=p0.width, num_frames=p0.num_frames,
            num_inference_steps=p0.steps, guidance_scale=p0.guidance_scale, generator=generators(params),
            output_type="latent", return_dict=False, callback_on_step_end=step_callback(on_step, p0.steps),
        )[0]
        return split(latents)  # (B, latent frames incl. CogVideoX1.5 padding, C, h, w)

    def decode(self, pipe, params, latents):
        p0 = params[0]
        x = stack(latents, pipe._execution_device, pipe.vae.dtype)
        # Drop the leading frames the pipeline pads for a temporal patch size (CogVideoX1.5).
        wanted = (p0.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        x = x[:, x.shape[1] - wanted :]
        video = pipe.decode_latents(x)
        frames = pipe.video_processor.postprocess_video(video=video, output_type="np")  # (B, F, H, W, 3)
        return [np.asarray(frames[i]) for i in range(len(params))]


STAGES = CogVideoXStages()
