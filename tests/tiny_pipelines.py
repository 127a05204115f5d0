"""Tiny real diffusers pipelines built from configs (nothing downloaded): Stable-Diffusion-style
text-to-image (UNet2DConditionModel + CLIPTextModel + a CLIP tokenizer from vocab files written
here + AutoencoderKL), DiT (DiTTransformer2DModel + AutoencoderKL) and DDIM (UNet2DModel)."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CONTEXT_DIM = 8


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16).eval()


def tiny_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single characters (empty merge list)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for c in string.ascii_lowercase + string.digits + ",.!?'":
        tokens += [c, c + "</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CONTEXT_DIM, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return CLIPTextModel(config).eval()


def tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT_DIM,
                                attention_head_dim=4, norm_num_groups=4).eval()


def tiny_sd_pipeline(tmp: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = tiny_tokenizer(tmp / "tokenizer")
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer)), tokenizer=tokenizer, unet=tiny_sd_unet(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_num_groups=4).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(),
                       id2label={i: f"class{i}" for i in range(10)})


def tiny_ddim_pipeline():
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8).eval()
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
