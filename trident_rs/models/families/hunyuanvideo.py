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

from trident_rs.models import tiny_parts as tp
from trident_rs.models.family import TINY_WIDTHS, VIDEO_WIDTHS, Family, FamilyStages, ModelFacts, ModelSpec
from trident_rs.models.chunking import DenoiseChunk
from trident_rs.models.tensors import gather, split, stack

SPECS = (
    ModelSpec("hunyuanvideo", "hunyuanvideo", "hunyuanvideo-community/HunyuanVideo", "video", 16, 8, 2,
             (720, 1280), 1280, 50, 200, 6.0, default_frames=129, max_frames=129,
             frame_rule=(4, 1), temporal_compression=4, widths=VIDEO_WIDTHS),
    # tiny random-weight variant built offline; the real family's GPU table stands in for it in emulated runs
    ModelSpec("tiny-hunyuanvideo", "hunyuanvideo", "", "video", 16, 8, 2, (64, 64), 256, 4, 100, 6.0,
             default_frames=9, max_frames=33, frame_rule=(4, 1), temporal_compression=4,
             widths=TINY_WIDTHS, profile_model="hunyuanvideo"),
)

COMPONENTS = {
    "encode": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "diffuse": ("transformer", "scheduler"),
    "decode": ("vae",),
}

# LLaVA-LLaMA-3-8B 8.0B + CLIP-L 0.12B at 256 tokens; 12.8B transformer, hidden 3072
FACTS = ModelFacts(8.12e9, 256, False, 12.8e9, 3072, True)


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

    def diffuse(self, pipe, params, embeddings, on_step=None, step_range=None):
        p0 = params[0]
        arrays = {n: gather(embeddings, n) for n in _NAMES}  # a missing input fails before any compute
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        inputs = {n: stack(a, device, dtype) for n, a in arrays.items()}
        with DenoiseChunk(pipe, params, embeddings, step_range) as chunk:
            latents = pipe(**inputs, height=p0.height, width=p0.width, num_frames=p0.num_frames,
                           guidance_scale=p0.guidance_scale, **chunk.pipeline_kwargs(on_step))[0]
        return chunk.outputs(latents)  # (B, C, latent frames, h, w), float32 as the pipeline keeps them

    def latents_shape(self, pipe, p):
        f = pipe.vae_scale_factor_spatial
        frames = (p.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        return (1, pipe.transformer.config.in_channels, frames, p.height // f, p.width // f)

    def decode(self, pipe, params, latents):
        vae = pipe.vae
        x = stack(latents, pipe._execution_device, vae.dtype) / vae.config.scaling_factor
        video = vae.decode(x, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="np")  # (B, F, H, W, 3)
        return [np.asarray(frames[i]) for i in range(len(params))]


def build_tiny():
    import torch
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    llama_tok = tp.build_llama3_tokenizer(DEFAULT_PROMPT_TEMPLATE["template"])
    clip_tok = tp.build_clip_tokenizer()
    torch.manual_seed(tp.SEED)
    # 3 layers: the pipeline takes the hidden states 2 layers before the last (hidden_states[-3]).
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=tp.LLAMA_DIM, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tp.LLAMA_MAX_POSITIONS,
        bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id,
        pad_token_id=llama_tok.pad_token_id, rms_norm_eps=1e-5,
    ))
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=tp.LLAMA_DIM, pooled_projection_dim=tp.CLIP_HIDDEN, rope_axes_dim=(8, 12, 12),
    )
    vae = AutoencoderKLHunyuanVideo(  # real ratios: ×8 spatial, ×4 temporal, 16 latent channels
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.476986,
        spatial_compression_ratio=8, temporal_compression_ratio=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # HunyuanVideo's scheduler shift
        text_encoder_2=CLIPTextModel(tp.clip_config(clip_tok)), tokenizer_2=clip_tok,
    )


def restore_vae_derived(pipe, vae_config: dict) -> None:
    """What the pipeline's `__init__` derives from its VAE (a stage pipeline without one falls back to defaults)."""
    from diffusers.video_processor import VideoProcessor

    pipe.vae_scale_factor_spatial = vae_config["spatial_compression_ratio"]
    pipe.vae_scale_factor_temporal = vae_config["temporal_compression_ratio"]
    pipe.video_processor = VideoProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)


def load_overrides(path: str, kwargs: dict) -> None:
    """HunyuanVideo's Llama 3 tokenizer, loaded from its tokenizer.json as it is.

    The model index names it `LlamaTokenizerFast`, and in transformers 5 that class rebuilds a
    Llama-2-style (Metaspace) tokenizer from the vocabulary, dropping tokenizer.json's byte-level
    pre-tokenizer: newlines vanish and words split into letters, with no error. The generic
    backend (what `AutoTokenizer` also picks for a byte-level file) keeps the file's pipeline."""
    if kwargs.get("tokenizer", "load") is None:  # a stage that does not load it
        return
    from transformers import PreTrainedTokenizerFast

    kwargs["tokenizer"] = PreTrainedTokenizerFast.from_pretrained(path, subfolder="tokenizer")


FAMILY = Family(
    name="hunyuanvideo", specs=SPECS, pipeline_class="HunyuanVideoPipeline", components=COMPONENTS, stages=HunyuanVideoStages(),
    build_tiny=build_tiny, facts=FACTS, restore_vae_derived=restore_vae_derived,
    xfuser=None,  # xfuser 0.7.0 has no wrapper for HunyuanVideoPipeline: diffuse runs at width 1 only
    load_overrides=load_overrides,
    # the class the real model's index names (a tokenizer built in code saves as the generic backend)
    tiny_index_classes={"tokenizer": ["transformers", "LlamaTokenizerFast"]},
)
