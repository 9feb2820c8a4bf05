"""HunyuanVideo: Llama 3 (prompt template) + CLIP pooled encode, guidance-distilled flow-matching
3D-DiT diffuse, causal 3D VAE decode + video post-processing.

Encode runs the pipeline's own `encode_prompt`: the prompt goes into the Llama 3 chat template,
the hidden states 2 layers before the last are taken and the template's `crop_start` tokens are
cropped off (with the attention mask, which diffuse needs: the text is right-padded to 256
tokens). Diffuse runs the pipeline's loop on those embeddings: sigmas linspace(1, 0) shifted by
the scheduler's `shift`, `guidance_scale` embedded in the transformer (×1000, no CFG batch),
initial noise from each request's generator. Decode divides by the VAE's `scaling_factor`
(HunyuanVideo has no shift factor) and post-processes as the pipeline does.

The pipeline's negative prompt only enters its "true CFG" (`true_cfg_scale` > 1), which this
executor leaves off, as the pipeline does by default: `negative_prompt` has no effect.
"""
from __future__ import annotations

import numpy as np

from trident_rs.executors.families.base import FamilyStages, gather, generators, split, stack, step_callback

_NAMES = ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask")


class HunyuanVideoStages(FamilyStages):
    def encode(self, pipe, params):
        pe, pooled, mask = pipe.encode_prompt(  # default template and max_sequence_length=256
            prompt=[p.prompt for p in params], prompt_2=None,
            num_videos_per_prompt=1, device=pipe._execution_device,
        )
        tensors = {"prompt_embeds": split(pe), "pooled_prompt_embeds": split(pooled),
                   "prompt_attention_mask": split(mask)}  # mask as float32 0/1: exact in any dtype
        return [{n: tensors[n][i] for n in _NAMES} for i in range(len(params))]

    def diffuse(self, pipe, params, embeddings, on_step=None):
        p0 = params[0]
        arrays = {n: gather(embeddings, n) for n in _NAMES}  # a missing input fails before any compute
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        inputs = {n: stack(a, device, dtype) for n, a in arrays.items()}
        latents = pipe(
            **inputs, height=p0.height, width=p0.width, num_frames=p0.num_frames,
            num_inference_steps=p0.steps, guidance_scale=p0.guidance_scale, generator=generators(params),
            output_type="latent", return_dict=False, callback_on_step_end=step_callback(on_step, p0.steps),
        )[0]
        return split(latents)  # (B, C, latent frames, h, w), float32 as the pipeline keeps them

    def decode(self, pipe, params, latents):
        vae = pipe.vae
        x = stack(latents, pipe._execution_device, vae.dtype) / vae.config.scaling_factor
        video = vae.decode(x, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="np")  # (B, F, H, W, 3)
        return [np.asarray(frames[i]) for i in range(len(params))]


STAGES = HunyuanVideoStages()
