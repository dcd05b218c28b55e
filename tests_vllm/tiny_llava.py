"""A tiny random-weight LLaVA-1.5-shaped model, saved the way the Hub ships llava-hf/llava-1.5-7b-hf.

Same layout and token counts as LLaVA-1.5: a CLIP ViT at 336 px with 14 px patches (576 patches + [CLS]),
features from the penultimate layer with [CLS] dropped ("default"), a 2-layer GELU projector, a Llama
decoder, `<image>` as a special token. Only the widths are small (head_dim 64: vLLM's CPU attention backend
rejects 16). The tokenizer is a word-level one built here, so nothing is downloaded.
"""

import pathlib

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

IMAGE_SIZE, PATCH = 336, 14
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 576
TEXT_HIDDEN = 128  # the Llama's width: what precomputed image embeddings must have
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 3  # its place in the tokenizer's special tokens below
WORDS = "user assistant what is in the image describe this picture a an the of and colour shape left right up down".split()


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", IMAGE_TOKEN, "<pad>"]
    words = WORDS + [":", "?", ".", ","]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    for i in range(len(vocab), vocab_size):  # fill the vocabulary so every logit decodes to something
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    assert vocab[IMAGE_TOKEN] == IMAGE_TOKEN_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
    )


def save_tiny_llava(path: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write config, float32 weights, tokenizer and processor of a random tiny LLaVA-1.5 to `path`."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    path = pathlib.Path(path)
    vocab_size = 512
    tokenizer = _tokenizer(vocab_size)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)
    text = LlamaConfig(hidden_size=TEXT_HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=4)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=NUM_PATCHES)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # random init at std 0.02 gives a flat [CLS] attention; make it peaked as in trained ViTs
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0.0, 0.1)
    model.to(torch.float32).save_pretrained(path)
    # transformers 5 writes the vision tower without its `vision_model.` level; the Hub's llava-hf
    # checkpoints (and vLLM's loader) have it.
    weights = load_file(path / "model.safetensors")
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()},
              path / "model.safetensors", metadata={"format": "pt"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)
    return path


def make_image(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    """A different RGB picture per seed: smooth colour blobs over noise (so patches are not all alike)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = rng.uniform(0, 60, (h, w, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1, 3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
        img += blob[..., None] * rng.uniform(0, 200, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
