"""Small components the tiny family builders share: tokenizers made in code, a small CLIP text
config, a small T5 encoder and an image VAE (x8, 16 latent channels). Nothing here knows a family.

Each family's tiny builder (`trident_rs.models.families.<name>`) assembles its pipeline from
these; the cache (`trident_rs.models.tiny`) saves and loads them.
"""
from __future__ import annotations

SEED = 0

# Shared text-encoder sizes. SD3 needs T5 d_model >= 2 × CLIP hidden (CLIP embeddings are
# concatenated and zero-padded to T5 width) and pooled_projection_dim = 2 × CLIP projection_dim.
CLIP_HIDDEN = 32
T5_DIM = 64
CLIP_MAX_LENGTH = 77
LLAMA_DIM = 64
LLAMA_MAX_POSITIONS = 512  # HunyuanVideo encodes 95 template + 256 prompt tokens


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


def clip_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=CLIP_HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )


def t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_DIM, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def image_vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )
