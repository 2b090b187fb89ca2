"""The caption tokenizer: round trip, layout of the ids, truncation, serialisation."""

import copy
import pickle

import pytest
import torch

from ldm_lightning.data.shapes import ShapesDataset
from ldm_lightning.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    MIN_VOCAB_SIZE,
    PAD_ID,
    CaptionTokenizer,
)


@pytest.fixture(scope="module")
def shapes_captions() -> list[str]:
    return ShapesDataset(200, 8).captions()


@pytest.fixture(scope="module")
def tokenizer(shapes_captions) -> CaptionTokenizer:
    return CaptionTokenizer.train(shapes_captions, vocab_size=400, context_length=16)


def test_round_trip_of_training_captions_unseen_words_and_unicode(tokenizer, shapes_captions):
    for caption in shapes_captions[:20]:
        assert tokenizer.decode(tokenizer.encode([caption])[0]) == caption
    # Byte-level: words never seen in training, and non-ASCII, encode without an unknown token.
    odd = "a zebra-striped hexagon, ünïcode ☃ 42"
    wide = CaptionTokenizer.from_json(tokenizer.to_json(), context_length=64)
    assert wide.decode(wide.encode([odd])[0]) == odd
    # Normalisation: lower case, white space collapsed and stripped.
    assert tokenizer.decode(tokenizer.encode(["  A  RED\tcircle "])[0]) == "a red circle"


def test_caption_words_are_single_tokens_and_the_layout_is_bos_eos_pad(tokenizer):
    ids = tokenizer.encode(["a red circle on a gray background", ""])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    # 7 words -> 7 tokens: the merges learned every caption word.
    assert ids[0, 0] == BOS_ID and ids[0, 8] == EOS_ID and (ids[0, 9:] == PAD_ID).all()
    assert (ids[0, 1:8] > EOS_ID).all()
    # The empty caption (the null condition) is <bos> <eos>.
    assert ids[1, :2].tolist() == [BOS_ID, EOS_ID] and (ids[1, 2:] == PAD_ID).all()
    assert tokenizer.vocab_size <= 400


def test_long_prompts_are_truncated_with_a_warning_keeping_eos(tokenizer):
    long = " ".join(["red"] * 30)
    with pytest.warns(UserWarning, match="longer than the context length of 16 tokens"):
        ids = tokenizer.encode([long, "a red circle"])
    assert ids[0, -1] == EOS_ID and (ids[0] != PAD_ID).all()
    assert tokenizer.decode(ids[0]) == " ".join(["red"] * 14)
    assert tokenizer.decode(ids[1]) == "a red circle"


def test_json_pickle_and_deepcopy_keep_the_encoding(tokenizer):
    captions = ["a blue square on a white background", "a cyan triangle"]
    expected = tokenizer.encode(captions)
    again = CaptionTokenizer.from_json(tokenizer.to_json(), 16)
    for copied in (again, pickle.loads(pickle.dumps(tokenizer)), copy.deepcopy(tokenizer)):
        assert torch.equal(copied.encode(captions), expected)


def test_bad_settings_are_errors(shapes_captions, tokenizer):
    with pytest.raises(ValueError, match=f"use at least {MIN_VOCAB_SIZE}"):
        CaptionTokenizer.train(shapes_captions, vocab_size=100, context_length=16)
    with pytest.raises(ValueError, match="use at least 3"):
        CaptionTokenizer.from_json(tokenizer.to_json(), 2)
    with pytest.raises(TypeError, match="list of captions"):
        tokenizer.encode("a red circle")
