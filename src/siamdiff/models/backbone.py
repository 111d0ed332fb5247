"""The diffusion backbone for a config: UNet + DHI ControlNet + text conditioning + noise schedule.

Three kinds (``backbone.kind``):

- ``sd15``: a diffusers-format Stable Diffusion v1.5 directory (``backbone.path``); the UNet,
  scheduler and (``text: clip``) text encoder + tokenizer come from its subfolders.
- ``tiny``: the same classes with tiny widths, random init; CPU-fast (tests, demo).
- ``scratch``: a ~200M-parameter UNet for 256-384 px latents, trained from scratch on one GPU.

In every kind the ControlNet is initialised from the UNet encoder (``ControlNetModel.from_unet``)
and its hint encoder is a :class:`~siamdiff.models.dhi.DenseHintInput`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from siamdiff.errors import SiamdiffError
from siamdiff.models.dhi import BASE_HINT_CHANNELS, DenseHintInput
from siamdiff.models.loading import load_complete
from siamdiff.rng import cpu_seeded

UNCONDITIONAL_PROMPT = ""
TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
KINDS = ("tiny", "scratch", "sd15")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# From-scratch kinds predict v: an eps-predicting UNet must learn the identity eps ~ z_t at high
# t, and a small one learns it badly; every DDIM step divides that error by sqrt(alpha_bar)
# (1/0.07 at t = 999) and samples blow up into colour noise (experiments/prediction_type). With
# v = sqrt(a) eps - sqrt(1 - a) z0 the identity is built in.
FROM_SCRATCH_PREDICTION_TYPE = "v_prediction"

# Widths per kind; ``backbone.unet`` in the config overrides any of these UNet arguments.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~3M parameters: learns visibly within a few hundred CPU steps on 16-channel latents.
    "tiny": {
        "block_out_channels": (64, 128),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8,
        "norm_num_groups": 16,
        "cross_attention_dim": 32,
    },
    # ~200M parameters (+~80M ControlNet); 64-dim attention heads.
    "scratch": {
        "block_out_channels": (192, 384, 576, 576),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "attention_head_dim": (3, 6, 9, 9),
        "cross_attention_dim": 768,
    },
}
DHI_BASE_CHANNELS = {"tiny": 4, "scratch": 16, "sd15": 16}
TRAIN_TIMESTEPS = 1000  # method.md's T, also Stable Diffusion v1.5's


def method_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """method.md's schedule: T=1000, scaled-linear betas 0.00085..0.012, eps-prediction
    (or ``"v_prediction"``, see :data:`FROM_SCRATCH_PREDICTION_TYPE`).

    ``clip_sample=False`` because latents are not bounded to [-1, 1]; ``steps_offset=1``
    matches Stable Diffusion v1.5's own scheduler config, so every kind samples the same
    timesteps. One difference stays: SD's config ends DDIM at alpha_bar of t=0
    (``set_alpha_to_one=False``, as the method's ldm DDIM does), the other kinds at 1, a
    noise-free last step.
    """
    return DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def requested_prediction_type(requested: str | None) -> str | None:
    """``backbone.prediction_type`` checked; None for ``auto`` (or unset): the kind's own target,
    :data:`FROM_SCRATCH_PREDICTION_TYPE` or, for sd15, what its scheduler config says."""
    if requested in (None, "auto"):
        return None
    if requested not in PREDICTION_TYPES:
        raise SiamdiffError(
            f"unknown backbone.prediction_type {requested!r} "
            f"(choose auto or one of {', '.join(PREDICTION_TYPES)})"
        )
    return requested


class DHIControlNetModel(ControlNetModel):
    """diffusers' ControlNetModel whose hint encoder (``controlnet_cond_embedding``) is a DHI.

    The DHI's width is the extra config entry ``dhi_base_channels``; its hint channels are
    ControlNetModel's own ``conditioning_channels``. Both round-trip through
    ``save_pretrained`` / ``from_pretrained``.
    """

    def __init__(self, dhi_base_channels: int = 16, **controlnet_kwargs: Any) -> None:
        super().__init__(**controlnet_kwargs)
        self._use_dense_hint_input(dhi_base_channels)

    @staticmethod
    def _get_init_keys(input_class: type) -> set[str]:
        # __init__ forwards ControlNetModel's arguments as **kwargs, which diffusers' config loader
        # cannot see; without them from_pretrained would rebuild a default-sized ControlNet.
        keys = ConfigMixin._get_init_keys(input_class)
        if issubclass(input_class, DHIControlNetModel):
            keys |= ConfigMixin._get_init_keys(ControlNetModel)
        return keys

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        dhi_base_channels: int = 16,
        hint_channels: int = 3,
        load_weights_from_unet: bool = True,
    ) -> DHIControlNetModel:
        """A ControlNet copied from ``unet``'s encoder and middle block, with a fresh DHI."""
        controlnet = super().from_unet(
            unet, conditioning_channels=hint_channels, load_weights_from_unet=load_weights_from_unet
        )
        controlnet._use_dense_hint_input(dhi_base_channels)
        return controlnet

    def _use_dense_hint_input(self, base_channels: int) -> None:
        self.register_to_config(dhi_base_channels=base_channels)
        self.controlnet_cond_embedding = DenseHintInput(
            out_channels=self.config.block_out_channels[0],
            hint_channels=self.config.conditioning_channels,
            base_channels=base_channels,
        )


class TextConditioner(nn.Module, ABC):
    """Prompts -> cross-attention context ``[B, L, D]``; ``""`` is the unconditional prompt.

    Each distinct prompt in a batch is encoded once (a batch holds at most the prompt and "").
    """

    kind: str
    trainable: bool

    def forward(self, prompts: Sequence[str]) -> Tensor:
        unique = list(dict.fromkeys(prompts))
        table = self.encode_unique(unique)
        return table[[unique.index(prompt) for prompt in prompts]]

    @abstractmethod
    def encode_unique(self, prompts: list[str]) -> Tensor:
        """``[len(prompts), L, D]`` for distinct prompts."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """D, the context width the UNet's cross-attention must take."""


class LearnedTextConditioner(TextConditioner):
    """One learned ``[tokens, dim]`` embedding per prompt of a fixed vocabulary: the prompt and "".

    Needs no text-encoder weights; the embeddings train with the ControlNet.
    """

    kind = "learned"
    trainable = True

    def __init__(self, prompts: Sequence[str], dim: int, tokens: int = 8) -> None:
        super().__init__()
        self.vocabulary = list(dict.fromkeys([UNCONDITIONAL_PROMPT, *prompts]))
        # Unit variance, like the layer-normed outputs of a CLIP text encoder.
        self.embeddings = nn.Parameter(torch.randn(len(self.vocabulary), tokens, dim))

    @property
    def dim(self) -> int:
        return self.embeddings.shape[-1]

    def encode_unique(self, prompts: list[str]) -> Tensor:
        for prompt in prompts:
            if prompt not in self.vocabulary:
                known = [p for p in self.vocabulary if p != UNCONDITIONAL_PROMPT]
                raise SiamdiffError(
                    f"prompt {prompt!r} has no learned text embedding (this model knows {known})"
                )
        return self.embeddings[[self.vocabulary.index(prompt) for prompt in prompts]]


class ClipTextConditioner(TextConditioner):
    """A frozen CLIP text encoder (last hidden state, padded to the tokenizer's max length)."""

    kind = "clip"
    trainable = False

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ClipTextConditioner:
        """Load ``text_encoder/`` and ``tokenizer/`` from a diffusers Stable Diffusion directory."""
        path = Path(path)
        for sub in ("text_encoder", "tokenizer"):
            if not (path / sub).is_dir():
                raise SiamdiffError(f"no {sub}/ folder: CLIP text conditioning needs one", path)
        # A tokenizer folder without its vocabulary loads (two special tokens), then fails
        # at the first prompt.
        if not any((path / "tokenizer" / name).is_file() for name in TOKENIZER_FILES):
            raise SiamdiffError(
                f"holds no tokenizer vocabulary ({' or '.join(TOKENIZER_FILES)})",
                path / "tokenizer",
            )
        try:
            text_encoder = load_complete(
                CLIPTextModel.from_pretrained,
                "CLIP text encoder",
                path / "text_encoder",
                pretrained_model_name_or_path=path / "text_encoder",
                local_files_only=True,
            )
            # fp32 whatever the checkpoint holds (newer transformers keep its fp16): an fp16
            # text context would meet the fp32 UNet in training and CPU sampling.
            text_encoder = text_encoder.float()
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # Runtime: sizes
            raise SiamdiffError(
                f"cannot load the CLIP text encoder ({_first_line(exc)})", path
            ) from exc
        return cls(text_encoder, tokenizer)

    @property
    def dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @torch.no_grad()
    def encode_unique(self, prompts: list[str]) -> Tensor:
        # A tokenizer folder without tokenizer_config.json says 1e30: the encoder's positions.
        length = min(
            self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings
        )
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


def drop_prompts(
    prompts: Sequence[str], p: float, generator: torch.Generator | None = None
) -> list[str]:
    """Replace each prompt by "" with probability ``p`` (classifier-free guidance training)."""
    dropped = (torch.rand(len(prompts), generator=generator) < p).tolist()
    return [
        UNCONDITIONAL_PROMPT if drop else prompt
        for prompt, drop in zip(prompts, dropped, strict=True)
    ]


@dataclass
class Backbone:
    unet: UNet2DConditionModel
    controlnet: DHIControlNetModel
    text: TextConditioner
    noise_scheduler: DDPMScheduler


def build_backbone(cfg: Mapping[str, Any], latent_channels: int, extra_hints: int = 0) -> Backbone:
    """Build (tiny, scratch) or load (sd15) the backbone described by the ``backbone`` config.

    Keys: ``kind``, ``path`` (sd15), ``prompt``, ``text`` (learned | clip), ``seed``,
    ``prediction_type`` (auto | epsilon | v_prediction, see :func:`requested_prediction_type`);
    optional
    ``text_path`` (a directory with text_encoder/ and tokenizer/; default ``path``),
    ``text_tokens`` (learned: tokens per prompt, default 8), ``dhi`` (``base_channels``) and
    ``unet`` (UNet2DConditionModel arguments overriding the preset). The DHI takes
    ``3 + extra_hints`` channels (docs/hints.md). Random initialisation is seeded by ``seed``
    without touching the global RNG.
    """
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise SiamdiffError(f"unknown backbone kind {kind!r} (choose one of {', '.join(KINDS)})")
    text_kind = cfg.get("text", "learned")
    if text_kind not in ("learned", "clip"):
        raise SiamdiffError(f"unknown backbone text conditioning {text_kind!r} (learned or clip)")
    dhi = {k: v for k, v in dict(cfg.get("dhi") or {}).items() if v is not None}
    hint_channels = BASE_HINT_CHANNELS + extra_hints
    if dhi.get("hint_channels", hint_channels) != hint_channels:
        raise SiamdiffError(
            f"backbone.dhi.hint_channels {dhi['hint_channels']!r} does not match data.hints "
            f"(3 + one per hint = {hint_channels}); leave it out"
        )
    prediction_type = requested_prediction_type(cfg.get("prediction_type"))
    with cpu_seeded(int(cfg.get("seed", 0))):
        clip = ClipTextConditioner.from_pretrained(_text_path(cfg)) if text_kind == "clip" else None
        if kind == "sd15":
            unet, noise_scheduler = _load_sd15(_sd15_path(cfg), latent_channels, prediction_type)
        else:
            unet = _build_unet(kind, cfg.get("unet") or {}, latent_channels, clip)
            noise_scheduler = method_noise_scheduler(
                prediction_type or FROM_SCRATCH_PREDICTION_TYPE
            )
        text = clip or LearnedTextConditioner(
            [cfg.get("prompt", UNCONDITIONAL_PROMPT)],
            dim=unet.config.cross_attention_dim,
            tokens=int(cfg.get("text_tokens", 8)),
        )
        if text.dim != unet.config.cross_attention_dim:
            raise SiamdiffError(
                f"text encoder width {text.dim} does not match the UNet's cross-attention width "
                f"{unet.config.cross_attention_dim}",
                _text_path(cfg),
            )
        try:  # settings a UNet takes but its ControlNet copy cannot (another mid block type)
            controlnet = DHIControlNetModel.from_unet(
                unet,
                dhi_base_channels=int(dhi.get("base_channels", DHI_BASE_CHANNELS[kind])),
                hint_channels=hint_channels,
            )
        except (TypeError, ValueError) as exc:
            raise SiamdiffError(
                f"invalid backbone.unet settings for its ControlNet ({_first_line(exc)})"
            ) from exc
    return Backbone(unet=unet, controlnet=controlnet, text=text, noise_scheduler=noise_scheduler)


def freeze_for_training(
    backbone: Backbone, *, train_unet_encoder: bool = False
) -> list[nn.Parameter]:
    """Set ``requires_grad`` as method.md says and return the trainable parameters.

    Trainable: the ControlNet (with its DHI), the UNet decoder (up blocks, output norm and conv)
    and learned text embeddings. Frozen: the UNet encoder and middle block, a CLIP text encoder.
    ``train_unet_encoder=True`` trains the whole UNet: for a randomly initialised (scratch)
    UNet, whose encoder has nothing worth keeping.
    """
    unet = backbone.unet
    unet.requires_grad_(train_unet_encoder)
    for decoder_part in (unet.up_blocks, unet.conv_norm_out, unet.conv_out):
        decoder_part.requires_grad_(True)
    backbone.controlnet.requires_grad_(True)
    backbone.text.requires_grad_(backbone.text.trainable)
    modules = (backbone.controlnet, unet, backbone.text)
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _sd15_path(cfg: Mapping[str, Any]) -> Path:
    if not cfg.get("path"):
        raise SiamdiffError("backbone.path must name a diffusers Stable Diffusion v1.5 directory")
    return Path(cfg["path"])


def _text_path(cfg: Mapping[str, Any]) -> Path:
    path = cfg.get("text_path") or cfg.get("path")
    if not path:
        raise SiamdiffError(
            "text: clip needs backbone.text_path (a directory with text_encoder/ and tokenizer/)"
        )
    return Path(path)


def _plain(value: Any) -> Any:
    # Config lists (OmegaConf ListConfig included) become tuples, as diffusers' configs expect.
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


def _build_unet(
    kind: str,
    overrides: Mapping[str, Any],
    latent_channels: int,
    clip: ClipTextConditioner | None,
) -> UNet2DConditionModel:
    arguments = {**UNET_PRESETS[kind], "in_channels": latent_channels}
    arguments["out_channels"] = latent_channels
    if clip is not None:
        arguments["cross_attention_dim"] = clip.dim
    arguments.update({key: _plain(value) for key, value in overrides.items()})
    try:
        return UNet2DConditionModel(**arguments)
    except (TypeError, ValueError) as exc:
        raise SiamdiffError(f"invalid backbone.unet settings ({_first_line(exc)})") from exc


def _load_sd15(
    path: Path, latent_channels: int, prediction_type: str | None
) -> tuple[UNet2DConditionModel, DDPMScheduler]:
    for config in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (path / config).is_file():
            raise SiamdiffError(f"not a diffusers Stable Diffusion directory (no {config})", path)
    try:
        unet = load_complete(
            UNet2DConditionModel.from_pretrained,
            "UNet",
            path / "unet",
            pretrained_model_name_or_path=path,
            subfolder="unet",
            local_files_only=True,
        )
        overrides = {"prediction_type": prediction_type} if prediction_type else {}
        scheduler = DDPMScheduler.from_pretrained(
            path, subfolder="scheduler", clip_sample=False, local_files_only=True, **overrides
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise SiamdiffError(f"cannot load Stable Diffusion ({_first_line(exc)})", path) from exc
    if unet.config.in_channels != latent_channels:
        raise SiamdiffError(
            f"the UNet takes {unet.config.in_channels} latent channels but the autoencoder "
            f"gives {latent_channels}",
            path / "unet",
        )
    check_prediction_type(scheduler, path / "scheduler")
    return unet, scheduler


def check_prediction_type(scheduler: DDPMScheduler, where: Path) -> None:
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise SiamdiffError(
            f"prediction_type {scheduler.config.prediction_type!r} is not supported "
            f"({' or '.join(PREDICTION_TYPES)})",
            where,
        )
