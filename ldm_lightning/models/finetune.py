"""Few-shot fine-tuning of a trained class- or text-conditional LDM with prior preservation
(DreamBooth, Ruiz et al. 2023).

The module starts as the base checkpoint (``model.finetune.ckpt_path``) and learns one new
concept from the 3-10 images of an :class:`~ldm_lightning.data.instance.InstanceDataModule`:

- class-conditional base: a new class ``new_class``; the class table of every class-embedding
  layer grows by one row (the new class gets index ``K``, the null class moves to ``K + 1``),
  initialised from the mean of the ``K`` class rows (``init_from: mean``), the null row
  (``null``), one class's row (its name: DreamBooth's class noun, "a [V] dog") or the mean of
  a few named rows. Only that row of the table trains, at its own rate ``embedding_lr``: the
  rows are ``N(0, 1)`` vectors (norm ~16 in the shapes demo), so at the network's fine-tuning
  rate (1e-4) Adam would move it by ~1e-4 a step, nothing against its scale;
- text-conditional base: an identifier prompt ``instance_prompt`` ("a sks circle"); the
  tokenizer is byte-level, so any identifier encodes.

Loss (DreamBooth eq. 2, in this LDM's parameterisation, each term the base's diffusion loss)::

    L = E ||target - model(z_t, c_instance)||^2 + lambda E ||target' - model(z'_t, c_prior)||^2

over the instance latents under the concept's condition, and as many latents of the prior set
(images of the original classes sampled by the base model before training,
:mod:`~ldm_lightning.models.prior`) under their own conditions; ``lambda = prior.weight``.
With ``lora`` only LoRA adapters of the attention projections train (Hu et al. 2022;
:mod:`~ldm_lightning.nn.lora`) and the new class's row; else every weight the base trained but
the original classes' rows.

Checkpoints are plain LDM checkpoints (the base's hyperparameters with the grown class list;
LoRA merged into the weights), so ``python -m ldm_lightning.sample`` and ``export`` read them as
any other; the fine-tuning record (``finetune``) and, for resuming, the adapters
(``lora_adapters``) ride along.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch import Tensor

from ldm_lightning.models.checkpoints import read_checkpoint, require_kind, stage_sha256
from ldm_lightning.models.conditioning.build import conditioning_config
from ldm_lightning.models.diffusion import LatentDiffusionModule
from ldm_lightning.models.optim import build_optimizer
from ldm_lightning.models.prior import PriorSpec, prior_images
from ldm_lightning.nn.lora import (
    ATTENTION_PROJECTIONS,
    adapted_state_dict,
    adapter_state_dict,
    add_lora,
    merged_state_dict,
)

CONFIG_KEY = "model.finetune.ckpt_path"
RECORD_KEY = "finetune"
ADAPTERS_KEY = "lora_adapters"
INIT_FROM = ("mean", "null")


def grow_class_table(table: Tensor, init_from: str | int | list[int]) -> Tensor:
    """``[K + 1, D]`` (K classes, then the null row) -> ``[K + 2, D]``: the K rows, the new
    class's row (the mean of the K rows, the null row, row ``init_from``, or the mean of the
    rows ``init_from`` lists), the null row."""
    classes, null = table[:-1], table[-1:]
    if init_from == "mean":
        new = classes.mean(0, keepdim=True)
    elif init_from == "null":
        new = null
    else:
        rows = [int(i) for i in (init_from if isinstance(init_from, list) else [init_from])]
        new = classes[rows].mean(0, keepdim=True)
    return torch.cat([classes, new, null])


class FinetuneModule(LatentDiffusionModule):
    """A base LDM fine-tuned on a few images of a new concept. See the module docstring.

    Args:
        finetune: ``ckpt_path`` (the base LDM: a ``.ckpt`` or export folder),
            ``trust_checkpoint``, ``new_class`` (class-conditional base) or ``instance_prompt``
            (text-conditional base), ``init_from`` (the new class's row: ``mean`` | ``null`` | a
            class name | a list of names, their mean), ``embedding_lr`` (the new row's learning
            rate; null: the optimizer's), ``prior`` (``weight`` lambda, ``num`` images,
            ``conditions``: the original classes or prompts to preserve, null: every class of a
            class-conditional base; ``guidance_scale``, ``seed``, ``dir`` of the cached images)
            and ``lora`` (null: full fine-tuning; else ``rank``, ``alpha``, ``target_modules``).
        optimizer, sampling, num_log_images, compile, channels_last: as for
            :class:`LatentDiffusionModule`; ``sampling`` None keeps the base's.
    """

    def __init__(
        self,
        *,
        finetune: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        num_log_images: int = 16,
        compile: bool | dict[str, Any] = False,
        channels_last: bool = False,
    ) -> None:
        path = finetune.get("ckpt_path")
        if not path:
            raise ValueError(f"{CONFIG_KEY} is not set: point it at the trained LDM to fine-tune")
        base = read_checkpoint(path, CONFIG_KEY, finetune.get("trust_checkpoint", False))
        require_kind(base, "latent_diffusion", path, CONFIG_KEY)
        hparams = dict(base["hyper_parameters"])
        conditioning, concept = _concept(hparams.get("conditioning"), finetune, path)
        super().__init__(**{
            **hparams, "conditioning": conditioning, "optimizer": optimizer,
            "sampling": sampling or hparams.get("sampling"), "num_log_images": num_log_images,
            "compile": compile, "channels_last": channels_last,
        })
        # The checkpoint is the base's kind of module: it keeps the LDM's arguments only.
        self.hparams.pop("finetune")
        self.concept = concept
        self.prior_settings = dict(finetune.get("prior") or {})
        self.lora = dict(finetune["lora"]) if finetune.get("lora") else None
        self.record = {
            "ckpt_path": str(path), "base_sha256": stage_sha256(path), "concept": self.concept,
            "init_from": finetune.get("init_from", "mean"),
            "embedding_lr": finetune.get("embedding_lr"), "prior": self.prior_settings,
            "lora": self.lora,
        }
        self.embedding_lr = finetune.get("embedding_lr")
        self.class_tables = self._load_base(base, self.record["init_from"])
        if self.lora:
            self.conditioner.requires_grad_(False)
            add_lora(self.unet, self.lora["rank"], self.lora["alpha"],
                     self.lora.get("target_modules") or ATTENTION_PROJECTIONS)
        for param in self.class_tables:  # the new class's row trains; the others stay the base's
            param.requires_grad_(True)
            mask = torch.zeros(param.shape[0], 1)
            mask[self.concept["index"]] = 1
            param.register_hook(lambda grad, mask=mask: grad * mask.to(grad))
        self.prior_latents: Tensor | None = None
        self.prior_conditions: list[Any] = []

    def _load_base(self, base: dict[str, Any], init_from: Any) -> list[Tensor]:
        """Load the base weights, each class table grown by the new class's row; returns the
        grown tables' parameters."""
        super().on_load_checkpoint(base)
        state, own, tables = dict(base["state_dict"]), self.state_dict(), []
        if self.conditioner.condition == "class":
            init_from = "null" if init_from is None else init_from  # YAML's null: the null row
            names = list(init_from) if isinstance(init_from, (list, tuple)) else [init_from]
            init = init_from if init_from in INIT_FROM else [
                int(i) for i in self.conditioner.check(names)]
            if isinstance(init, list) and self.concept["index"] in init:
                raise ValueError(f"model.finetune.init_from={init_from!r} is the new class: "
                                 f"name an original class, or one of {INIT_FROM}")
            parameters = dict(self.named_parameters())
            for key, value in base["state_dict"].items():
                if own[key].shape != value.shape:
                    state[key] = grow_class_table(value, init)
                    tables.append(parameters[key])
        self.load_state_dict(state)
        return tables

    # ------------------------------------------------------------------ conditions
    def with_concept(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` (instance images) with the concept as every item's condition."""
        condition = [self.concept["condition"]] * _batch_size(batch)
        return {**batch, self.conditioner.batch_key: condition}

    def conditioning(self, batch: dict[str, Any], train: bool) -> dict[str, Tensor]:
        return self.conditioner(self.with_concept(batch), train)

    def adopt_data(self, data: Any) -> None:
        """Check the instance images' size; they are unlabelled (their condition is the
        concept), so there are no labels to check against the model's classes."""
        size = getattr(data, "image_size", self.hparams.image_size)
        if size != self.hparams.image_size:
            raise ValueError(
                f"data.image_size={size}, but the base model was trained at "
                f"{self.hparams.image_size} px: set data.image_size={self.hparams.image_size}"
            )

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, tuple[Tensor, int]]:
        return super().log_images(self.with_concept(batch))

    # ------------------------------------------------------------------ prior preservation
    def prior_spec(self) -> PriorSpec | None:
        """What decides the prior images; None when prior preservation is off (weight 0)."""
        prior = self.prior_settings
        if not prior.get("weight"):
            return None
        conditions = prior.get("conditions")
        if self.conditioner.condition == "class":
            known = list(range(self.concept["index"]))  # every original class
            conditions = known if conditions is None else self.conditioner.check(conditions)
            conditions = [int(label) for label in conditions]
            if self.concept["index"] in conditions:
                raise ValueError("model.finetune.prior.conditions must name original classes, "
                                 f"not the new one ({self.concept['condition']})")
        elif not conditions:
            raise ValueError(
                "model.finetune.prior.conditions is empty: give the prompts of the original "
                "class to preserve (DreamBooth's class prompt, e.g. ['a circle']), or set "
                "model.finetune.prior.weight=0 to train without prior preservation"
            )
        if prior.get("num", 0) < 1:
            raise ValueError(f"model.finetune.prior.num must be at least 1 with prior.weight > 0, "
                             f"got {prior.get('num')}")
        settings = self.sampling_settings()
        return PriorSpec(self.record["base_sha256"], list(conditions), int(prior["num"]),
                         float(prior.get("guidance_scale", 1.0)), int(prior.get("seed", 0)),
                         {k: v for k, v in settings.items() if v is not None})

    def setup(self, stage: str) -> None:
        """Before fit (and before a resumed run's weights are restored): the prior images of
        the base model, sampled once (rank 0) or read from the cache, as latents."""
        super().setup(stage)
        spec = self.prior_spec() if stage == "fit" else None
        if spec is None:
            return
        strategy = self.trainer.strategy
        self.to(strategy.root_device)
        if self.trainer.is_global_zero:
            prior_images(self, spec, self.prior_settings["dir"])
        strategy.barrier("finetune_prior")
        images, self.prior_conditions = prior_images(self, spec, self.prior_settings["dir"])
        with torch.no_grad():
            latents = [self.first_stage.encode(chunk.to(self.device)) for chunk in images.split(64)]
        self.prior_latents = self.latent_norm.normalize(torch.cat(latents).float())

    def on_fit_start(self) -> None:
        if self.lora and any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
            raise ValueError(
                "model.finetune.lora merges the adapters into the saved weights, which a "
                "weight-averaging callback (EMA) replaces: train LoRA with callbacks=default, "
                "or set model.finetune.lora=null to fine-tune every weight"
            )
        super().on_fit_start()

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer of ``model.optimizer`` with the class tables (only the new row has a
        gradient) in a group of their own at ``embedding_lr`` without weight decay, which
        would shrink the original rows the gradient mask keeps."""
        tables = {id(p) for p in self.class_tables}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in tables]
        groups = [{"params": rest}] if rest else []
        if self.class_tables:
            rate = {"lr": float(self.embedding_lr)} if self.embedding_lr is not None else {}
            groups.append({"params": list(self.class_tables), "weight_decay": 0.0, **rate})
        optimizer, scheduler = build_optimizer(
            self, groups, self.hparams.optimizer, self.default_optimizer
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def dreambooth_losses(
        self, batch: dict[str, Any], generator: torch.Generator | None = None, train: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """The instance loss (the batch under the concept's condition) and the prior loss (as
        many prior latents, drawn at random, under their own conditions; None without prior
        preservation): the two terms of DreamBooth eq. 2."""
        z0 = self.latents(batch)
        instance = self.diffusion_loss(z0, self.conditioning(batch, train), generator)
        if self.prior_latents is None:
            return instance, None
        draw_on = generator.device if generator is not None else "cpu"
        picks = torch.randint(len(self.prior_latents), (z0.shape[0],), generator=generator,
                              device=draw_on).cpu()
        conditions = [self.prior_conditions[i] for i in picks.tolist()]
        cond = self.conditioner({self.conditioner.batch_key: conditions}, train)
        prior = self.diffusion_loss(self.prior_latents[picks].to(z0.device), cond, generator)
        return instance, prior

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        instance, prior = self.dreambooth_losses(batch, self.noise_generator)
        loss = instance if prior is None else instance + self.prior_settings["weight"] * prior
        logged = {"train/instance_loss": instance}
        if prior is not None:
            logged["train/prior_loss"] = prior
        size = _batch_size(batch)
        self.log_dict(logged, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[RECORD_KEY] = self.record
        if self.lora:
            checkpoint[ADAPTERS_KEY] = adapter_state_dict(checkpoint["state_dict"])
            checkpoint["state_dict"] = merged_state_dict(self.unet, checkpoint["state_dict"],
                                                         "unet.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume (or test the best checkpoint) of this fine-tuning run: the same base, and the
        LoRA adapters back out of the merged weights."""
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(RECORD_KEY, {}).get("base_sha256")
        if saved != self.record["base_sha256"]:
            raise ValueError(
                f"this checkpoint fine-tuned the base LDM with sha256 {saved}, but {CONFIG_KEY}="
                f"{self.record['ckpt_path']} has {self.record['base_sha256']}: resume with the "
                "base it started from"
            )
        if self.lora:
            checkpoint["state_dict"] = adapted_state_dict(
                self.unet, checkpoint["state_dict"], checkpoint.get(ADAPTERS_KEY, {}), "unet."
            )


def _batch_size(batch: dict[str, Any]) -> int:
    return len(batch["latent"] if "latent" in batch else batch["image"])


def _concept(
    config: Mapping[str, Any] | None, finetune: Mapping[str, Any], path: str
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The base's conditioning config, grown by the new class for a class-conditional base,
    and the concept: ``{"condition": the label or prompt of the instance images, "index"}``."""
    cls, arguments = conditioning_config(config)
    new_class, prompt = finetune.get("new_class"), finetune.get("instance_prompt")
    kind = getattr(cls, "condition", None)
    if kind not in ("class", "text"):
        raise ValueError(
            f"{CONFIG_KEY}={path} is an unconditional LDM: few-shot fine-tuning teaches a new "
            "class or prompt to a class- or text-conditional one (train it with "
            "+experiment=shapes_ldm_class or shapes_ldm_text)"
        )
    wanted, unwanted = ("new_class", "instance_prompt") if kind == "class" else (
        "instance_prompt", "new_class")
    given = {"new_class": new_class, "instance_prompt": prompt}
    if not given[wanted] or given[unwanted]:
        example = "'orange circle'" if kind == "class" else "'a sks circle on a gray background'"
        raise ValueError(
            f"{CONFIG_KEY}={path} is {kind}-conditional: set model.finetune.{wanted} (e.g. "
            f"{example}) and leave model.finetune.{unwanted} null"
        )
    if kind == "text":
        return dict(config or {}), {"condition": prompt, "index": None}
    count = arguments["num_classes"] or len(arguments["class_names"])
    names = list(arguments.get("class_names") or [str(i) for i in range(count)])
    if new_class in names:
        raise ValueError(f"model.finetune.new_class={new_class!r} is already class "
                         f"{names.index(new_class)} of the base model; name the new class anew")
    grown = {**dict(config or {}), "num_classes": count + 1, "class_names": [*names, new_class]}
    return grown, {"condition": new_class, "index": count}
