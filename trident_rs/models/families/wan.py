"""Wan 2.1 text-to-video: UMT5 encode, flow-matching 3D-DiT diffuse with CFG, causal 3D VAE decode
+ video post-processing (diffusers' `WanPipeline`).

Encode runs the pipeline's own `encode_prompt` at the pipeline's `max_sequence_length` (512;
`encode_prompt` alone defaults to 226): UMT5 hidden states, trimmed to each prompt's tokens and
zero-padded back to 512, and the negative prompt's ("" by default) when guidance > 1. Diffuse
runs the pipeline's loop on those embeddings (guidance <= 1 turns CFG off, as the pipeline).
Decode undoes the VAE's per-channel latent normalisation (`latents_mean`, `latents_std`) in the
pipeline's own arithmetic, decodes and post-processes.

xfuser 0.7.0 has no xFuser pipeline wrapper for `WanPipeline` (only image-to-video ones,
`xFuserWanImageToVideoPipeline` and `xFuserCausalWanPipeline`; its text-to-video support is a
runner model that swaps in its own transformer class), so diffuse runs at width 1 with real
executors; the cost model still has widths 1-8 (estimated) for the simulator and emulated runs.
"""
from __future__ import annotations

import numpy as np

from trident_rs.models import tiny_parts as tp
from trident_rs.models.family import TINY_WIDTHS, VIDEO_WIDTHS, Family, FamilyStages, ModelFacts, ModelSpec
from trident_rs.models.chunking import DenoiseChunk
from trident_rs.models.tensors import cfg_embeddings, cfg_inputs, stack
from trident_rs.vocab import Shape

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default

SPECS = (
    ModelSpec("wan", "wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "video", 16, 8, 2,
              (720, 1280), 1280, 50, 200, 5.0, default_frames=81, max_frames=81,
              frame_rule=(4, 1), temporal_compression=4, widths=VIDEO_WIDTHS),
    # tiny random-weight variant built offline; the real family's GPU table stands in for it in emulated runs
    ModelSpec("tiny-wan", "wan", "", "video", 16, 8, 2, (64, 64), 256, 4, 100, 5.0,
              default_frames=9, max_frames=33, frame_rule=(4, 1), temporal_compression=4,
              widths=TINY_WIDTHS, profile_model="wan"),
)

COMPONENTS = {
    "encode": ("text_encoder", "tokenizer"),
    "diffuse": ("transformer", "scheduler"),
    "decode": ("vae",),
}

# UMT5-XXL encoder 5.7B at 512 tokens, CFG; 14B transformer, hidden 5120, 40 layers. No measured
# diffuse table: diffuse latency is estimated (derive_estimates) at 480p and 720p.
FACTS = ModelFacts(
    5.7e9, 512, True, 14.0e9, 5120, True, dit_layers=40,
    estimate_shapes=tuple(Shape(h, w, f) for h, w in ((480, 832), (720, 1280)) for f in (1, 17, 33, 81)),
)


class WanStages(FamilyStages):
    def encode(self, pipe, params):
        cfg = params[0].guidance_scale > 1
        pe, ne = pipe.encode_prompt(
            prompt=[p.prompt for p in params], negative_prompt=[p.negative_prompt for p in params],
            do_classifier_free_guidance=cfg, num_videos_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH, device=pipe._execution_device,
        )
        return cfg_embeddings(pe, ne, cfg)

    def diffuse(self, pipe, params, embeddings, on_step=None, step_range=None):
        p0 = params[0]
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        inputs = cfg_inputs(embeddings, p0.guidance_scale > 1, device, dtype)
        with DenoiseChunk(pipe, params, embeddings, step_range) as chunk:
            latents = pipe(**inputs, height=p0.height, width=p0.width, num_frames=p0.num_frames,
                           guidance_scale=p0.guidance_scale, max_sequence_length=MAX_SEQUENCE_LENGTH,
                           **chunk.pipeline_kwargs(on_step))[0]
        return chunk.outputs(latents)  # (B, C, latent frames, h, w), float32 as the pipeline keeps them

    def latents_shape(self, pipe, p):
        f = pipe.vae_scale_factor_spatial
        frames = (p.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        return (1, pipe.transformer.config.in_channels, frames, p.height // f, p.width // f)

    def decode(self, pipe, params, latents):
        import torch

        vae = pipe.vae
        x = stack(latents, pipe._execution_device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        x = x / inv_std + mean  # as the pipeline computes it, so the split stays bit-exact
        video = vae.decode(x, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="np")  # (B, F, H, W, 3)
        return [np.asarray(frames[i]) for i in range(len(params))]


def build_tiny():
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    t5_tok = tp.build_t5_tokenizer(MAX_SEQUENCE_LENGTH)
    torch.manual_seed(tp.SEED)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(t5_tok), d_model=tp.T5_DIM, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = WanTransformer3DModel(  # real layout: patch (1, 2, 2), 16 latent channels, CFG
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=tp.T5_DIM, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=1024,
    )
    vae = AutoencoderKLWan(  # real ratios: ×8 spatial, ×4 temporal, 16 latent channels
        base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    scheduler = UniPCMultistepScheduler(  # Wan 2.1's: flow prediction, flow sigmas, shift 5 (720p)
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0,
    )
    return WanPipeline(tokenizer=t5_tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)


def restore_vae_derived(pipe, vae_config: dict) -> None:
    """What the pipeline's `__init__` derives from its VAE (a stage pipeline without one falls back to 4 and 8)."""
    from diffusers.video_processor import VideoProcessor

    pipe.vae_scale_factor_temporal = vae_config.get("scale_factor_temporal", 4)
    pipe.vae_scale_factor_spatial = vae_config.get("scale_factor_spatial", 8)
    pipe.video_processor = VideoProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)


FAMILY = Family(
    name="wan", specs=SPECS, pipeline_class="WanPipeline", components=COMPONENTS, stages=WanStages(),
    build_tiny=build_tiny, facts=FACTS, restore_vae_derived=restore_vae_derived,
    xfuser=None,  # see the module docstring
)
