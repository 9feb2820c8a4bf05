"""Tiny random-weight pipelines built fully offline (no hub access).

Each tiny model is a real diffusers pipeline with a small config ("small" shapes: VAE ×8 with
16 latent channels, transformer patch 2, a few layers, hidden 128), seeded random weights and
tokenizers built in code. It is written once with `save_pretrained` to
`$TRIDENT_CACHE/tiny/<name>` (default `~/.cache/trident_rs/tiny/<name>`) and then loaded like a
real model, through `from_pretrained(local_dir)`.

Concurrent builders (several Ray replicas) are safe: a file lock serialises them and the
directory appears by atomic rename, so a reader never sees a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock

from trident_rs.errors import UnknownModelError

# Bump when a tiny config changes: cached builds with another version are rebuilt.
BUILD_VERSION = 2
_MARKER = "trident_tiny.json"
SEED = 0

# Shared text-encoder sizes. SD3 needs T5 d_model >= 2 × CLIP hidden (CLIP embeddings are
# concatenated and zero-padded to T5 width) and pooled_projection_dim = 2 × CLIP projection_dim.
CLIP_HIDDEN = 32
T5_DIM = 64
CLIP_MAX_LENGTH = 77
LLAMA_DIM = 64
LLAMA_MAX_POSITIONS = 512  # HunyuanVideo encodes 95 template + 256 prompt tokens


def cache_root() -> Path:
    """Root of trident_rs caches: `$TRIDENT_CACHE` or `~/.cache/trident_rs`."""
    return Path(os.environ.get("TRIDENT_CACHE") or Path.home() / ".cache" / "trident_rs")


def tiny_dir(name: str) -> Path:
    return cache_root() / "tiny" / name


# --- tokenizers, built in code -------------------------------------------------------------

_WORDS = ("a", "red", "cube", "blue", "cat", "dog", "on", "the", "sphere", "of", "in", "green")


def build_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer: 256 byte symbols (plain and end-of-word) + a few merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("c", "u"), ("cu", "b"), ("cub", "e</w>"), ("a", "t</w>")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer(max_length: int):
    """A unigram T5 tokenizer over letters, digits and a few whole words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# Llama 3's pre-tokenizer split (byte-level BPE); HunyuanVideo's text encoder is a Llama 3.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<pad>")


def build_llama3_tokenizer(template: str):
    """A Llama-3-style byte-level BPE tokenizer (Llama 3's split regex, `<|begin_of_text|>` prepended,
    header/eot special tokens, right padding) whose vocabulary has every word of `template` and of
    a few prompt words as one token, like the real 128k vocabulary does. HunyuanVideo's prompt
    template then takes as many tokens as with the real tokenizer (its `crop_start`, 95), so
    cropping the template off the encoder output removes exactly the template."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for segment in re.split("|".join(map(re.escape, _LLAMA3_SPECIAL)), template.replace("{}", "")):
        for piece, _ in pre.pre_tokenize_str(segment):
            vocab.setdefault(piece, len(vocab))
    for word in _WORDS:  # a prompt's first word has no leading space ("Ġ" in byte-level), the others do
        vocab.setdefault(word, len(vocab))
        vocab.setdefault("Ġ" + word, len(vocab))
    # ignore_merges (as Llama 3): a pre-token in the vocabulary is one token; others fall back to bytes.
    backend = Tokenizer(BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_LLAMA3_SPECIAL))
    bos = _LLAMA3_SPECIAL[0]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<pad>",
        padding_side="right", model_max_length=LLAMA_MAX_POSITIONS,
    )


def _clip_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=CLIP_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_DIM, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def _image_vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


# --- the families --------------------------------------------------------------------------

def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer(256)
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=T5_DIM,
        caption_projection_dim=128, pooled_projection_dim=2 * CLIP_HIDDEN,
        pos_embed_max_size=64,  # in latent patches: 64 × 8 × 2 = 1024 px
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(_clip_config(clip_tok)),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_tok)),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5_encoder(t5_tok),
        tokenizer_3=t5_tok,
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer(512)
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler settings
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_image_vae(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(_clip_config(clip_tok)), tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(t5_tok), tokenizer_2=t5_tok,
    )


def _build_cogvideox():
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    t5_tok = build_t5_tokenizer(226)
    torch.manual_seed(SEED)
    # Like CogVideoX1.5: rotary positions and temporal patch 2 (latent frames padded to even).
    # Rotary tables are sliced from sample_height/width (latent px): 32 × 8 = the spec max 256 px.
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        time_embed_dim=64, text_embed_dim=T5_DIM, num_layers=2, sample_width=32, sample_height=32,
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
    return CogVideoXPipeline(tokenizer=t5_tok, text_encoder=_t5_encoder(t5_tok), vae=vae,
                             transformer=transformer, scheduler=scheduler)


def _build_hunyuanvideo():
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    llama_tok = build_llama3_tokenizer(DEFAULT_PROMPT_TEMPLATE["template"])
    clip_tok = build_clip_tokenizer()
    torch.manual_seed(SEED)
    # 3 layers: the pipeline takes the hidden states 2 layers before the last (hidden_states[-3]).
    llama = LlamaModel(LlamaConfig(
        vocab_size=len(llama_tok), hidden_size=LLAMA_DIM, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LLAMA_MAX_POSITIONS,
        bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id,
        pad_token_id=llama_tok.pad_token_id, rms_norm_eps=1e-5,
    ))
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=LLAMA_DIM, pooled_projection_dim=CLIP_HIDDEN, rope_axes_dim=(8, 12, 12),
    )
    vae = AutoencoderKLHunyuanVideo(  # real ratios: ×8 spatial, ×4 temporal, 16 latent channels
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32, 32),
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.476986,
        spatial_compression_ratio=8, temporal_compression_ratio=4,
    )
    return HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=llama_tok, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),  # HunyuanVideo's scheduler shift
        text_encoder_2=CLIPTextModel(_clip_config(clip_tok)), tokenizer_2=clip_tok,
    )


TINY_BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny-sd3": _build_sd3,
    "tiny-flux": _build_flux,
    "tiny-cogvideox": _build_cogvideox,
    "tiny-hunyuanvideo": _build_hunyuanvideo,
}

# Written into model_index.json after saving, as the real model's index names them (the saved
# class of a tokenizer built in code is the generic backend).
_INDEX_CLASSES = {"tiny-hunyuanvideo": {"tokenizer": ["transformers", "LlamaTokenizerFast"]}}


def build_tiny_pipeline(name: str):
    """Construct the tiny pipeline in memory (seeded random weights). Prefer `ensure_tiny_model`."""
    if name not in TINY_BUILDERS:
        raise UnknownModelError(name, list(TINY_BUILDERS))
    with torch.random.fork_rng():
        pipe = TINY_BUILDERS[name]()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # freshly constructed modules are in training mode (T5 dropout)
    return pipe


def _is_built(path: Path) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_model(name: str, root: Path | None = None) -> Path:
    """Directory of the saved tiny model `name`, building it first if the cache lacks it."""
    if name not in TINY_BUILDERS:
        raise UnknownModelError(name, list(TINY_BUILDERS))
    target = (root / name) if root is not None else tiny_dir(name)
    if _is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_built(target):  # another process built it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build_tiny_pipeline(name).save_pretrained(staging)
            if name in _INDEX_CLASSES:
                index = json.loads((staging / "model_index.json").read_text())
                index.update(_INDEX_CLASSES[name])
                (staging / "model_index.json").write_text(json.dumps(index, indent=2))
            (staging / _MARKER).write_text(json.dumps({"name": name, "version": BUILD_VERSION}))
            if target.exists():  # stale version
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
