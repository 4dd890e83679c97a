"""The built-in `tiny-sd` model: a real Stable Diffusion pipeline at toy size.

Every part is the real diffusers or transformers class, built from configs with seeded random weights,
so tests exercise the same code paths as a production model while a 64x64 image takes milliseconds on
a CPU. The weights depend only on `SEED`, so every process builds the same model.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

SEED = 0
MAX_TOKENS = 77
_BOS, _EOS, _PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"

_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
# Four VAE blocks downscale by 8 as in real SD. The decoder runs at full image size, so its channels
# stay few, and its mid-block attention (quadratic in latent pixels) is left out: 1024x1024 stays cheap.
_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "mid_block_add_attention": False,
}

# Latents are the image downscaled by the VAE, and must then pass the UNet's downsamplers evenly.
SIZE_MULTIPLE = 2 ** (len(_VAE["block_out_channels"]) - 1) * 2 ** (len(_UNET["block_out_channels"]) - 1)


def build_tiny_sd(device: str = "cpu") -> StableDiffusionPipeline:
    """A fresh tiny-sd pipeline; DDIM, so `num_inference_steps=N` is exactly N steps and callbacks."""
    tokenizer = _byte_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Forking keeps the caller's global RNG untouched; weights are always built on the CPU so they
    # do not depend on the device's random number generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**_UNET)
        vae = AutoencoderKL(**_VAE)
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        # Stable Diffusion 1.x's noise schedule.
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Half precision on a GPU, as the loader serves directory models.
    return pipe.to(device, torch.float16 if device == "cuda" else torch.float32)


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: any unicode text maps onto the 256 byte symbols, no vocab files."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate([*symbols, _BOS, _EOS, _PAD])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A {_EOS}",
        special_tokens=[(_BOS, vocab[_BOS]), (_EOS, vocab[_EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=MAX_TOKENS,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
    )
