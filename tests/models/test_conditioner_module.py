"""ConditionerModule: CLIP loss against a direct computation, recall, temperature, checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from ldm_lightning.data.shapes import ShapesDataset
from ldm_lightning.losses.contrastive import contrastive_loss
from ldm_lightning.metrics.retrieval import recall_over_distinct, retrieval_recall
from ldm_lightning.models import ConditionerModule
from ldm_lightning.models.checkpoints import load_stage, stamp
from ldm_lightning.models.conditioner import ENCODERS
from ldm_lightning.nn.image_encoder import LatentImageEncoder

TINY_TEXT = {"vocab_size": 400, "context_length": 12, "layers": 1, "heads": 2}


def text_module(**overrides) -> ConditionerModule:
    module = ConditionerModule(
        encoder={"_target_": ENCODERS["text"], **TINY_TEXT},
        width=16,
        first_stage={"identity": True},
        image_encoder={"channels": [8, 16]},
        embed_dim=8,
        **overrides,
    )
    module.encoder.fit_tokenizer(ShapesDataset(100, 8).captions())
    return module


def direct_clip_loss(image, text, scale, groups):
    """Sum over i of -sum_j T_ij log softmax_j(s <I_i, T_j>), both directions, by loops."""
    n = len(image)
    total = 0.0
    for direction in (0, 1):
        for i in range(n):
            a = image[i] if direction == 0 else text[i]
            others = text if direction == 0 else image
            logits = [scale * float(a @ others[j]) for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            positives = [j for j in range(n) if groups[j] == groups[i]]
            total += -sum(logits[j] - log_z for j in positives) / len(positives)
    return total / (2 * n)


def test_contrastive_loss_matches_direct_computation_and_clip_pseudocode():
    image = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=-1)
    unique = torch.arange(5)
    loss = contrastive_loss(image, text, 7.0, None)
    assert loss.item() == pytest.approx(direct_clip_loss(image, text, 7.0, unique.tolist()))
    # CLIP's Fig. 3: (CE(logits, arange) + CE(logits^T, arange)) / 2.
    logits = 7.0 * image @ text.T
    clip = (F.cross_entropy(logits, unique) + F.cross_entropy(logits.T, unique)) / 2
    assert loss.item() == pytest.approx(clip.item())
    groups = torch.tensor([0, 1, 0, 2, 1])
    grouped = contrastive_loss(image, text, 7.0, groups)
    assert grouped.item() == pytest.approx(direct_clip_loss(image, text, 7.0, groups.tolist()))


def test_retrieval_recall_on_a_hand_made_example():
    # Captions are the unit vectors e0, e1, e2; image 2 is nearest to caption 0 (a miss at 1).
    text = torch.eye(3)
    image = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.9, 0.0, 0.5], [0.0, 0.1, 1.0]])
    match = torch.tensor([0, 1, 2, 2])
    recall = retrieval_recall(image, text, match, ks=(1, 2))
    assert recall["recall@1_i2t"] == pytest.approx(3 / 4)
    assert recall["recall@2_i2t"] == pytest.approx(1.0)
    # Caption 2's best image (3, score 1.0) ranks first; caption 0's best (image 0) too.
    assert recall["recall@1_t2i"] == pytest.approx(1.0)


def test_recall_over_distinct_captions_retrieves_among_each_captions_first_embedding():
    torch.manual_seed(0)
    image, text = torch.randn(5, 4), torch.randn(5, 4)
    keys = ["a", "b", "a", "c", "b"]
    expected = retrieval_recall(image, text[[0, 1, 3]], torch.tensor([0, 1, 0, 2, 1]), ks=(1, 2))
    assert recall_over_distinct(image, text, keys, ks=(1, 2)) == expected


def test_temperature_starts_at_clip_value_and_is_clamped_at_100():
    module = text_module()
    assert module.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        module.logit_scale.fill_(math.log(1000.0))
    assert module.scale().item() == pytest.approx(100.0)


def test_image_encoder_maps_latents_to_embeddings():
    encoder = LatentImageEncoder(3, channels=[8, 16], out_dim=5)
    out = encoder(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_overfits_a_batch_to_perfect_retrieval():
    torch.manual_seed(0)
    module = text_module(init_temperature=0.1)
    dataset = ShapesDataset(8, 8)
    items = [dataset[i] for i in range(8)]
    batch = {
        "image": torch.stack([item["image"] for item in items]),
        "caption": [item["caption"] for item in items],
    }
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        image, text, groups = module.embed(batch)
        loss = contrastive_loss(image, text, module.scale(), groups)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    image, text, groups = module.embed(batch)
    assert loss.item() < 0.2 * first
    recall = retrieval_recall(image.detach(), text.detach(), groups.cpu())
    assert recall["recall@1_i2t"] == 1.0 and recall["recall@1_t2i"] == 1.0


def test_checkpoint_carries_the_tokenizer(tmp_path):
    module = text_module()
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    stamp(checkpoint, "conditioner", module)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = load_stage(ConditionerModule, tmp_path / "c.ckpt", "conditioner")
    captions = ["a red circle on a gray background", ""]
    assert loaded.encoder.tokenizer.to_json() == module.encoder.tokenizer.to_json()
    torch.testing.assert_close(loaded.encoder(captions)[1], module.eval().encoder(captions)[1])


def test_class_encoder_errors_name_the_valid_range():
    with pytest.raises(ValueError, match="ClassEncoder.*missing.*'num_classes'.*model.encoder"):
        ConditionerModule(encoder={"_target_": ENCODERS["class"]}, first_stage={"identity": True})
    with pytest.raises(ValueError, match="num_classes must be at least 1, got None"):
        ConditionerModule(encoder="class", first_stage={"identity": True})  # of before
    module = ConditionerModule(
        encoder={"_target_": ENCODERS["class"], "num_classes": 4}, width=8,
        first_stage={"identity": True}, embed_dim=4, image_encoder={"channels": [8]},
    )
    batch = {"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([1, 4])}
    with pytest.raises(ValueError, match="valid labels are 0..3"):
        module.embed(batch)
    with pytest.raises(ValueError, match="unknown"):
        ConditionerModule(encoder="clip", first_stage={"identity": True})
