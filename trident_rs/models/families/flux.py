"""FLUX: CLIP + T5 encode, guidance-distilled flow-matching diffuse on packed latents, VAE decode.

FLUX.1-dev embeds `guidance_scale` in the transformer (no CFG batch); the negative prompt is
only used by the pipeline's "true CFG" (`true_cfg_scale` > 1), which this executor leaves off.
"""
from __future__ import annotations

import numpy as np

from trident_rs.models import tiny_parts as tp
from trident_rs.models.family import IMAGE_WIDTHS, Family, FamilyStages, ModelFacts, ModelSpec, XfuserPipeline
from trident_rs.models.chunking import DenoiseChunk
from trident_rs.models.image_edit import call_inputs
from trident_rs.models.tensors import gather, split, stack

SPECS = (
    ModelSpec("flux", "flux", "black-forest-labs/FLUX.1-dev", "image", 16, 8, 2,
             (1024, 1024), 4096, 28, 200, 3.5, widths=IMAGE_WIDTHS),
    # tiny random-weight variant built offline; the real family's GPU table stands in for it in emulated runs
    ModelSpec("tiny-flux", "flux", "", "image", 16, 8, 2, (64, 64), 1024, 4, 100, 3.5,
             widths={"encode": (1,), "diffuse": (1, 2), "decode": (1,)}, profile_model="flux"),
)

COMPONENTS = {
    "encode": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "diffuse": ("transformer", "scheduler"),
    "decode": ("vae",),
}
# The encode stage also VAE-encodes edits' input images (`trident_rs.models.image_edit`).
COMPONENTS["encode"] += ("vae",)

# T5-XXL 4.76B + CLIP-L 0.12B at 512 tokens; 12B transformer, hidden 3072
FACTS = ModelFacts(4.88e9, 512, False, 11.9e9, 3072, False)


_NAMES = ("prompt_embeds", "pooled_prompt_embeds")


class FluxStages(FamilyStages):
    edit_pipelines = {"img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}

    def encode(self, pipe, params):
        pe, pp, _text_ids = pipe.encode_prompt(  # text_ids are zeros the pipeline rebuilds
            prompt=[p.prompt for p in params], prompt_2=None,
            device=pipe._execution_device, num_images_per_prompt=1,
        )
        pe, pp = split(pe), split(pp)
        return [{"prompt_embeds": pe[i], "pooled_prompt_embeds": pp[i]} for i in range(len(params))]

    def diffuse(self, pipe, params, embeddings, on_step=None, step_range=None):
        p0 = params[0]
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        inputs = {n: stack(gather(embeddings, n), device, dtype) for n in _NAMES}
        call, edit = call_inputs(pipe, params, embeddings, self.edit_pipelines, dtype)
        with DenoiseChunk(pipe, params, embeddings, step_range) as chunk:
            packed = call(**inputs, **edit, height=p0.height, width=p0.width, guidance_scale=p0.guidance_scale,
                          **chunk.pipeline_kwargs(on_step))[0]
        return chunk.outputs(packed)  # packed (B, tokens, 4 × latent channels), as the pipeline returns

    def latents_shape(self, pipe, p):
        f = pipe.vae_scale_factor * 2  # 2×2 latent patches per token
        return (1, (p.height // f) * (p.width // f), pipe.transformer.config.in_channels)

    def preview_latents(self, pipe, params, latents):
        return pipe._unpack_latents(latents, params.height, params.width, pipe.vae_scale_factor)

    def decode(self, pipe, params, latents):
        p0, vae = params[0], pipe.vae
        x = stack(latents, pipe._execution_device, vae.dtype)
        x = pipe._unpack_latents(x, p0.height, p0.width, pipe.vae_scale_factor)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(x, return_dict=False)[0]
        frames = pipe.image_processor.postprocess(image, output_type="np")
        return [np.asarray(frames[i : i + 1]) for i in range(len(params))]


def build_tiny():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_tok = tp.build_clip_tokenizer()
    t5_tok = tp.build_t5_tokenizer(512)
    torch.manual_seed(tp.SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=tp.T5_DIM, pooled_projection_dim=tp.CLIP_HIDDEN,
        guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler settings
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=tp.image_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(tp.clip_config(clip_tok)), tokenizer=clip_tok,
        text_encoder_2=tp.t5_encoder(t5_tok), tokenizer_2=t5_tok,
    )


def restore_vae_derived(pipe, vae_config: dict) -> None:
    """What the pipeline's `__init__` derives from its VAE (a stage pipeline without one falls back to 8)."""
    from diffusers.image_processor import VaeImageProcessor

    pipe.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    # FLUX packs 2×2 latent patches, so its image processor works at twice the VAE scale.
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)
    pipe.latent_channels = vae_config["latent_channels"]


FAMILY = Family(
    name="flux", specs=SPECS, pipeline_class="FluxPipeline", components=COMPONENTS, stages=FluxStages(),
    build_tiny=build_tiny, facts=FACTS, restore_vae_derived=restore_vae_derived,
    xfuser=XfuserPipeline("xFuserFluxPipeline", batches_cfg=False),
)
