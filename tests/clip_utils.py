"""A tiny CLIP text model and tokenizer written like a downloaded one (offline)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from ldm_lightning.data.shapes import ShapesDataset

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT = 16


def write_tiny_clip(folder: Path) -> Path:
    """A randomly initialised 2-layer, 32-wide CLIPTextModel and a byte-level BPE tokenizer
    with CLIP's special tokens, saved to ``folder`` with ``save_pretrained``: the layout of
    ``openai/clip-vit-large-patch14``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        ShapesDataset(200, 8).captions(),
        trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    bos, eos = bpe.token_to_id(BOS), bpe.token_to_id(EOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=EOS
    )
    tokenizer.save_pretrained(folder)
    config = transformers.CLIPTextConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CONTEXT,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(folder)
    return folder
