"""CogVideoX: T5 encode, 3D-DiT diffuse with CFG, causal 3D VAE decode + video post-processing."""
from __future__ import annotations

import numpy as np

from trident_rs.models import tiny_parts as tp
from trident_rs.models.family import TINY_WIDTHS, VIDEO_WIDTHS, Family, FamilyStages, ModelFacts, ModelSpec, XfuserPipeline
from trident_rs.models.chunking import DenoiseChunk
from trident_rs.models.tensors import cfg_embeddings, cfg_inputs, stack

SPECS = (
    ModelSpec("cogvideox", "cogvideox", "THUDM/CogVideoX1.5-5B", "video", 16, 8, 2,
             (768, 1360), 1360, 50, 200, 6.0, default_frames=81, max_frames=161,
             frame_rule=(16, 1), temporal_compression=4, widths=VIDEO_WIDTHS, max_height=768),
    # tiny random-weight variant built offline; the real family's GPU table stands in for it in emulated runs
    ModelSpec("tiny-cogvideox", "cogvideox", "", "video", 16, 8, 2, (64, 64), 256, 4, 100, 6.0,
             default_frames=9, max_frames=49, frame_rule=(8, 1), temporal_compression=4,
             widths=TINY_WIDTHS, profile_model="cogvideox"),
)

COMPONENTS = {
    "encode": ("text_encoder", "tokenizer"),
    "diffuse": ("transformer", "scheduler"),
    "decode": ("vae",),
}

# T5-XXL at 226 tokens; 5.6B transformer, hidden 3072
FACTS = ModelFacts(4.76e9, 226, True, 5.6e9, 3072, True)


class CogVideoXStages(FamilyStages):
    def encode(self, pipe, params):
        cfg = params[0].guidance_scale > 1
        pe, ne = pipe.encode_prompt(
            prompt=[p.prompt for p in params], negative_prompt=[p.negative_prompt for p in params],
            do_classifier_free_guidance=cfg, num_videos_per_prompt=1, device=pipe._execution_device,
        )
        return cfg_embeddings(pe, ne, cfg)

    def diffuse(self, pipe, params, embeddings, on_step=None, step_range=None):
        p0 = params[0]
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        inputs = cfg_inputs(embeddings, p0.guidance_scale > 1, device, dtype)
        with DenoiseChunk(pipe, params, embeddings, step_range) as chunk:
            latents = pipe(**inputs, height=p0.height, width=p0.width, num_frames=p0.num_frames,
                           guidance_scale=p0.guidance_scale, **chunk.pipeline_kwargs(on_step))[0]
        return chunk.outputs(latents)  # (B, latent frames incl. CogVideoX1.5 padding, C, h, w)

    def latents_shape(self, pipe, p):
        frames = (p.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        patch_t = pipe.transformer.config.patch_size_t
        if patch_t is not None:  # CogVideoX1.5 pads the latent frames to its temporal patch
            frames += -frames % patch_t
        f = pipe.vae_scale_factor_spatial
        return (1, frames, pipe.transformer.config.in_channels, p.height // f, p.width // f)

    def decode(self, pipe, params, latents):
        p0 = params[0]
        x = stack(latents, pipe._execution_device, pipe.vae.dtype)
        # Drop the leading frames the pipeline pads for a temporal patch size (CogVideoX1.5).
        wanted = (p0.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        x = x[:, x.shape[1] - wanted :]
        video = pipe.decode_latents(x)
        frames = pipe.video_processor.postprocess_video(video=video, output_type="np")  # (B, F, H, W, 3)
        return [np.asarray(frames[i]) for i in range(len(params))]


def build_tiny():
    import torch
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    t5_tok = tp.build_t5_tokenizer(226)
    torch.manual_seed(tp.SEED)
    # Like CogVideoX1.5: rotary positions and temporal patch 2 (latent frames padded to even).
    # Rotary tables are sliced from sample_height/width (latent px): 32 × 8 = the spec max 256 px.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        time_embed_dim=64, text_embed_dim=tp.T5_DIM, num_layers=2, sample_width=32, sample_height=32,
        sample_frames=9, patch_size=2, patch_size_t=2, temporal_compression_ratio=4,
        max_text_seq_length=226, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
        layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4,
        sample_height=64, sample_width=64, scaling_factor=0.7,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
    )
    return CogVideoXPipeline(tokenizer=t5_tok, text_encoder=tp.t5_encoder(t5_tok), vae=vae,
                             transformer=transformer, scheduler=scheduler)


def restore_vae_derived(pipe, vae_config: dict) -> None:
    """What the pipeline's `__init__` derives from its VAE (a stage pipeline without one falls back to defaults)."""
    from diffusers.video_processor import VideoProcessor

    pipe.vae_scale_factor_spatial = 2 ** (len(vae_config["block_out_channels"]) - 1)
    pipe.vae_scale_factor_temporal = vae_config["temporal_compression_ratio"]
    pipe.vae_scaling_factor_image = vae_config["scaling_factor"]
    pipe.video_processor = VideoProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)


FAMILY = Family(
    name="cogvideox", specs=SPECS, pipeline_class="CogVideoXPipeline", components=COMPONENTS, stages=CogVideoXStages(),
    build_tiny=build_tiny, facts=FACTS, restore_vae_derived=restore_vae_derived,
    xfuser=XfuserPipeline("xFuserCogVideoXPipeline", batches_cfg=True),
)
