"""Stable Diffusion 3: CLIP ×2 + T5 encode, flow-matching MMDiT diffuse with CFG, VAE decode."""
from __future__ import annotations

import numpy as np

from trident_rs.models import tiny_parts as tp
from trident_rs.models.family import IMAGE_WIDTHS, Family, FamilyStages, ModelFacts, ModelSpec, XfuserPipeline
from trident_rs.models.chunking import DenoiseChunk
from trident_rs.models.image_edit import call_inputs
from trident_rs.models.tensors import gather, split, stack

SPECS = (
    ModelSpec("sd3", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "image", 16, 8, 2,
             (1024, 1024), 2048, 28, 200, 7.0, widths=IMAGE_WIDTHS),
    # tiny random-weight variant built offline; the real family's GPU table stands in for it in emulated runs
    ModelSpec("tiny-sd3", "sd3", "", "image", 16, 8, 2, (64, 64), 1024, 4, 100, 7.0,
             widths={"encode": (1,), "diffuse": (1, 2), "decode": (1,)}, profile_model="sd3"),
)

COMPONENTS = {
    "encode": ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
    "diffuse": ("transformer", "scheduler"),
    "decode": ("vae",),
}
# The encode stage also VAE-encodes edits' input images (`trident_rs.models.image_edit`).
COMPONENTS["encode"] += ("vae",)

# T5-XXL encoder 4.76B + CLIP-G 0.69B + CLIP-L 0.12B; MMDiT 2.0B, hidden 1536
FACTS = ModelFacts(5.57e9, 256, True, 2.03e9, 1536, False)


_POSITIVE = ("prompt_embeds", "pooled_prompt_embeds")
_NEGATIVE = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")


class SD3Stages(FamilyStages):
    edit_pipelines = {"img2img": "StableDiffusion3Img2ImgPipeline", "inpaint": "StableDiffusion3InpaintPipeline"}

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

    def diffuse(self, pipe, params, embeddings, on_step=None, step_range=None):
        p0 = params[0]
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        names = _POSITIVE + _NEGATIVE if p0.guidance_scale > 1 else _POSITIVE
        inputs = {n: stack(gather(embeddings, n), device, dtype) for n in names}
        call, edit = call_inputs(pipe, params, embeddings, self.edit_pipelines, dtype)
        with DenoiseChunk(pipe, params, embeddings, step_range) as chunk:
            latents = call(**inputs, **edit, height=p0.height, width=p0.width, guidance_scale=p0.guidance_scale,
                           **chunk.pipeline_kwargs(on_step))[0]
        return chunk.outputs(latents)  # (B, C, h, w)

    def latents_shape(self, pipe, p):
        f = pipe.vae_scale_factor
        return (1, pipe.transformer.config.in_channels, p.height // f, p.width // f)

    def decode(self, pipe, params, latents):
        vae = pipe.vae
        x = stack(latents, pipe._execution_device, vae.dtype)
        # diffusers' StableDiffusion3InpaintPipeline (0.42) decodes without the shift factor, unlike
        # its text-to-image and img2img pipelines; inpainting matches it (a group is one kind: batch_key).
        shift = 0.0 if params[0].edit == "inpaint" else vae.config.shift_factor
        x = x / vae.config.scaling_factor + shift
        image = vae.decode(x, return_dict=False)[0]
        frames = pipe.image_processor.postprocess(image, output_type="np")  # (B, H, W, 3)
        return [np.asarray(frames[i : i + 1]) for i in range(len(params))]


def build_tiny():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip_tok = tp.build_clip_tokenizer()
    t5_tok = tp.build_t5_tokenizer(256)
    torch.manual_seed(tp.SEED)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=tp.T5_DIM,
        caption_projection_dim=128, pooled_projection_dim=2 * tp.CLIP_HIDDEN,
        pos_embed_max_size=64,  # in latent patches: 64 × 8 × 2 = 1024 px
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tp.image_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(tp.clip_config(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(tp.clip_config(clip_tok)),
        tokenizer_2=clip_tok,
        text_encoder_3=tp.t5_encoder(t5_tok),
        tokenizer_3=t5_tok,
    )


def restore_vae_derived(pipe, vae_config: dict) -> None:
    """What the pipeline's `__init__` derives from its VAE (a stage pipeline without one falls back to 8)."""
    from diffusers.image_processor import VaeImageProcessor

    pipe.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor)


FAMILY = Family(
    name="sd3", specs=SPECS, pipeline_class="StableDiffusion3Pipeline", components=COMPONENTS, stages=SD3Stages(),
    build_tiny=build_tiny, facts=FACTS, restore_vae_derived=restore_vae_derived,
    xfuser=XfuserPipeline("xFuserStableDiffusion3Pipeline", batches_cfg=True),
)
