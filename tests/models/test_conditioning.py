"""Conditioning: context shapes, condition dropout rate, guided sampling, bad input."""

import math

import pytest
import torch

import ldm_lightning.models.diffusion as diffusion_module
from ldm_lightning.data.shapes import ShapesDataset
from ldm_lightning.models import ConditionerModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import stamp
from ldm_lightning.models.conditioner import ENCODERS
from ldm_lightning.models.conditioning import (
    KINDS,
    ClassConditioning,
    NoConditioning,
    TextConditioning,
    expand,
)

TEXT = {"vocab_size": 400, "context_length": 16, "layers": 1, "heads": 2}
CAPTIONS = ShapesDataset(100, 8).captions()


def conditioning_config(kind: str, **arguments) -> dict:
    """``model.conditioning`` as ``conf/model/conditioning/<kind>.yaml`` writes it."""
    return {"_target_": f"ldm_lightning.models.conditioning.{KINDS[kind].__name__}", **arguments}


def text_conditioning(**kwargs) -> TextConditioning:
    conditioning = TextConditioning(width=16, text=TEXT, **kwargs)
    conditioning.text.fit_tokenizer(CAPTIONS)
    return conditioning.eval()


def tiny_ldm(conditioning: dict) -> LatentDiffusionModule:
    ldm = LatentDiffusionModule(
        unet={"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attention_resolutions": [2], "num_head_channels": 8},
        first_stage={"identity": True},
        image_size=8,
        schedule={"kind": "linear", "timesteps": 100},
        scale_factor=1.0,
        conditioning=conditioning,
        sampling={"steps": 3},
    )
    # Zero-initialised output convs make every condition predict 0: randomise them.
    for parameter in ldm.unet.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return ldm.eval()


def test_unconditional_has_no_kwargs_and_refuses_conditions():
    conditioning = NoConditioning()
    assert conditioning.unet_kwargs() == {} and conditioning({"label": [1]}, train=True) == {}
    with pytest.raises(ValueError, match="unconditional"):
        conditioning.for_sampling(2, labels=[1, 2])


@pytest.mark.parametrize(
    ("route", "kwargs"),
    [("time", {"num_classes": 19}), ("context", {"context_dim": 16}),
     ("both", {"num_classes": 19, "context_dim": 16})],
)
def test_class_routes_give_unet_kwargs_and_shapes(route, kwargs):
    conditioning = ClassConditioning(num_classes=18, class_route=route, width=16, num_tokens=2)
    assert conditioning.unet_kwargs() == kwargs
    out = conditioning({"label": torch.tensor([0, 5, 17])}, train=False)
    if "num_classes" in kwargs:
        assert out["class_labels"].tolist() == [0, 5, 17]
    if "context_dim" in kwargs:
        assert out["context"].shape == (3, 2, 16)
        null = conditioning.classes.embedding.weight[18].view(2, 16)
        cond, uncond = conditioning.for_sampling(3, labels=[1, 2, 3])
        torch.testing.assert_close(uncond["context"], null.expand(3, 2, 16))


def test_text_context_shape_and_empty_prompt_is_the_null_context():
    conditioning = text_conditioning()
    assert conditioning.unet_kwargs() == {"context_dim": 16}
    out = conditioning({"caption": CAPTIONS[:3]}, train=False)
    assert out["context"].shape == (3, 16, 16)
    cond, uncond = conditioning.for_sampling(2, prompts=["", "a red circle"])
    torch.testing.assert_close(cond["context"][0], uncond["context"][0])
    assert not torch.allclose(cond["context"][1], uncond["context"][1])


def test_class_dropout_rate_matches_p_uncond():
    conditioning = ClassConditioning(num_classes=18, p_uncond=0.3)
    n = 20000
    labels = torch.randint(0, 18, (n,))
    out = conditioning({"label": labels}, train=True)["class_labels"]
    dropped = out == 18
    # Binomial(n, 0.3): standard deviation sqrt(0.3 * 0.7 / n) = 0.0032; allow 5 of them.
    assert abs(dropped.float().mean().item() - 0.3) < 5 * math.sqrt(0.21 / n)
    assert torch.equal(out[~dropped], labels[~dropped])
    # Evaluation never drops.
    assert torch.equal(conditioning({"label": labels}, train=False)["class_labels"], labels)


def test_text_dropout_replaces_captions_by_the_null_context():
    conditioning = text_conditioning(p_uncond=0.5)
    captions = [CAPTIONS[i % 20] for i in range(200)]
    context = conditioning({"caption": captions}, train=True)["context"]
    null = conditioning.for_sampling(1, unconditional=True)[1]["context"][0]
    is_null = (context - null).abs().amax(dim=(1, 2)) < 1e-6
    clean = conditioning({"caption": captions}, train=False)["context"]
    assert torch.allclose(context[~is_null], clean[~is_null], atol=1e-6)
    # Binomial(200, 0.5): sd 0.035; allow 4 of them.
    assert abs(is_null.float().mean().item() - 0.5) < 0.14


def test_guidance_through_ldm_sample_matches_hand_computation(monkeypatch):
    ldm = tiny_ldm(conditioning_config("class", num_classes=3, class_route="both", width=8))
    captured = {}
    real_sample = diffusion_module.sample

    def spy(model_fn, *args, **kwargs):
        captured["model_fn"] = model_fn
        return real_sample(model_fn, *args, **kwargs)

    monkeypatch.setattr(diffusion_module, "sample", spy)
    ldm.sample(n=2, guidance_scale=3.0, labels=[0, 2], steps=2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 70])
    embedding = ldm.conditioner.classes.embedding.weight
    cond_out = ldm.unet(x, t, context=embedding[[0, 2]][:, None], class_labels=torch.tensor([0, 2]))
    null_out = ldm.unet(x, t, context=embedding[[3, 3]][:, None], class_labels=torch.tensor([3, 3]))
    expected = null_out + 3.0 * (cond_out - null_out)
    torch.testing.assert_close(captured["model_fn"](x, t), expected, atol=1e-5, rtol=1e-5)


def test_guidance_identities_of_samples():
    ldm = tiny_ldm(conditioning_config("text", width=8, text=TEXT))
    ldm.conditioner.text.fit_tokenizer(CAPTIONS)
    prompts = ["a red circle on a gray background", "a blue square on a white background"]
    plain = ldm.sample(n=2, prompts=prompts, guidance_scale=1.0)
    guided = ldm.sample(n=2, prompts=prompts, guidance_scale=3.0)
    zero = ldm.sample(n=2, prompts=prompts, guidance_scale=0.0)
    unconditional = ldm.sample(n=2, unconditional=True)
    empty = ldm.sample(n=2, prompts=[""], guidance_scale=3.0)
    assert not torch.allclose(plain, guided, atol=1e-3)
    # s = 0 is the unconditional model; an empty prompt is the null condition at any scale.
    torch.testing.assert_close(zero, unconditional, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(empty, unconditional, atol=1e-5, rtol=1e-5)


def test_negative_prompts_replace_the_null_condition():
    conditioning = text_conditioning()
    _, uncond = conditioning.for_sampling(2, prompts=["a red circle"], negative_prompts=["red"])
    expected = conditioning({"caption": ["red", "red"]}, train=False)["context"]
    torch.testing.assert_close(uncond["context"], expected)


def test_bad_sampling_inputs_are_clear_errors():
    classes = ClassConditioning(num_classes=18)
    with pytest.raises(ValueError, match=r"valid labels are 0..17"):
        classes.for_sampling(2, labels=[3, 18])
    with pytest.raises(ValueError, match=r"valid labels are 0..17"):
        classes({"label": torch.tensor([-1, 2])}, train=True)
    with pytest.raises(ValueError, match=r"pass labels=\[...\] in 0..17, or unconditional=True"):
        classes.for_sampling(2)
    with pytest.raises(ValueError, match="not prompts"):
        classes.for_sampling(2, prompts=["a red circle"])
    with pytest.raises(ValueError, match="not both"):
        classes.for_sampling(2, labels=[1, 2], unconditional=True)
    with pytest.raises(ValueError, match="divides n"):
        classes.for_sampling(4, labels=[1, 2, 3])
    text = text_conditioning()
    with pytest.raises(ValueError, match=r"pass prompts=\[...\]"):
        text.for_sampling(2)
    with pytest.raises(ValueError, match="not labels"):
        text.for_sampling(2, labels=[1])
    with pytest.warns(UserWarning, match="truncated"):
        text.for_sampling(1, prompts=[" ".join(["red"] * 40)])
    with pytest.raises(ValueError, match="num_classes"):
        ClassConditioning()
    with pytest.raises(ValueError, match=r"p_uncond=1.0 must be in \[0, 1\)"):
        ClassConditioning(num_classes=2, p_uncond=1.0)
    with pytest.raises(ValueError, match="randomly initialised"):
        TextConditioning(freeze_text=True)


def test_conditions_repeat_to_fill_n_samples_and_validation_inputs_cycle():
    assert expand([1, 2], 4, "labels") == [1, 1, 2, 2]
    assert expand(torch.tensor([1, 2]), 4, "labels").tolist() == [1, 1, 2, 2]
    classes = ClassConditioning(num_classes=18)
    assert classes.sampling_inputs({"label": torch.tensor([4, 5, 6])}, 5) == {
        "labels": [4, 5, 6, 4, 5]
    }


def test_frozen_text_encoder_from_checkpoint_and_its_record(tmp_path):
    pretrained = ConditionerModule(encoder={"_target_": ENCODERS["text"], **TEXT}, width=16,
                                   first_stage={"identity": True}, embed_dim=8,
                                   image_encoder={"channels": [8]})
    pretrained.encoder.fit_tokenizer(CAPTIONS)
    checkpoint = {"state_dict": pretrained.state_dict(),
                  "hyper_parameters": dict(pretrained.hparams)}
    stamp(checkpoint, "conditioner", pretrained)
    path = tmp_path / "clip.ckpt"
    torch.save(checkpoint, path)

    config = {"text_ckpt_path": str(path)}
    conditioning = TextConditioning(**config).train()
    assert conditioning.frozen and not conditioning.text.training
    assert not any(p.requires_grad for p in conditioning.text.parameters())
    context = conditioning({"caption": CAPTIONS[:2]}, train=False)["context"]
    assert not context.requires_grad
    torch.testing.assert_close(context, pretrained.encoder.eval()(CAPTIONS[:2])[0])

    # The record rebuilds it without the file; weights and tokenizer come with the state dict.
    record = conditioning.record()
    assert record["text_hparams"]["width"] == 16 and len(record["text_sha256"]) == 64
    path.unlink()
    rebuilt = TextConditioning(**config, **record)
    rebuilt.load_state_dict(conditioning.state_dict())
    torch.testing.assert_close(rebuilt({"caption": CAPTIONS[:2]}, train=False)["context"], context)

    unfrozen = TextConditioning(**config, **record, freeze_text=False)
    assert all(p.requires_grad for p in unfrozen.text.parameters())
