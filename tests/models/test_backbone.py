"""Backbone construction: tiny/sd15 kinds, DHI ControlNet round-trip, text, freezing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from siamdiff.errors import SiamdiffError
from siamdiff.models.backbone import (
    DHIControlNetModel,
    LearnedTextConditioner,
    build_backbone,
    drop_prompts,
    freeze_for_training,
    method_noise_scheduler,
)
from siamdiff.models.dhi import DenseHintInput

PROMPT = "lower newer"  # spelt with the toy CLIP vocabulary below


def tiny_cfg(**extra: object) -> dict:
    return {"kind": "tiny", "prompt": PROMPT, "text": "learned", "seed": 0, **extra}


def test_tiny_backbone_parts() -> None:
    backbone = build_backbone(tiny_cfg(), latent_channels=4)
    unet, controlnet = backbone.unet, backbone.controlnet
    assert unet.config.in_channels == unet.config.out_channels == 4
    assert isinstance(controlnet.controlnet_cond_embedding, DenseHintInput)
    assert controlnet.config.dhi_base_channels == 4
    # ControlNet initialised from the UNet encoder (method.md).
    unet_state = unet.down_blocks.state_dict()
    for name, value in controlnet.down_blocks.state_dict().items():
        assert torch.equal(value, unet_state[name])
    assert backbone.noise_scheduler.config.num_train_timesteps == 1000
    assert backbone.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert backbone.text([PROMPT]).shape == (1, 8, unet.config.cross_attention_dim)


def test_prediction_type_defaults_to_v_from_scratch_and_to_the_checkpoint_for_sd15(
    tmp_path: Path,
) -> None:
    def prediction(cfg: dict) -> str:
        return build_backbone(cfg, latent_channels=4).noise_scheduler.config.prediction_type

    assert prediction(tiny_cfg()) == "v_prediction"
    assert prediction(tiny_cfg(prediction_type="auto")) == "v_prediction"
    assert prediction(tiny_cfg(prediction_type="epsilon")) == "epsilon"
    sd15 = {"kind": "sd15", "path": str(write_fake_sd15(tmp_path)), "text": "clip"}
    assert prediction(sd15) == "epsilon"  # what its scheduler/ says
    assert prediction({**sd15, "prediction_type": "v_prediction"}) == "v_prediction"
    with pytest.raises(SiamdiffError, match="unknown backbone\\.prediction_type 'sample'"):
        prediction(tiny_cfg(prediction_type="sample"))


def test_seed_determines_weights_without_touching_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_backbone(tiny_cfg(seed=1), latent_channels=4)
    assert torch.equal(torch.rand(1), before)
    b = build_backbone(tiny_cfg(seed=1), latent_channels=4)
    c = build_backbone(tiny_cfg(seed=2), latent_channels=4)
    weight = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[weight], b.unet.state_dict()[weight])
    assert not torch.equal(a.unet.state_dict()[weight], c.unet.state_dict()[weight])
    assert torch.equal(a.text.embeddings, b.text.embeddings)


def test_config_overrides_from_struct_omegaconf() -> None:
    cfg = OmegaConf.create(
        # hint_channels as older run configs spell it: accepted when it matches the hints
        tiny_cfg(
            unet={"block_out_channels": [16, 32]}, dhi={"base_channels": 2, "hint_channels": 4}
        )
    )
    OmegaConf.set_struct(cfg, True)
    backbone = build_backbone(cfg, latent_channels=6, extra_hints=1)
    assert list(backbone.unet.config.block_out_channels) == [16, 32]
    assert backbone.controlnet.config.conditioning_channels == 4
    assert backbone.controlnet.controlnet_cond_embedding.conv_out.out_channels == 16


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"kind": "huge"}, "unknown backbone kind 'huge'"),
        (tiny_cfg(text="bert"), "unknown backbone text conditioning 'bert'"),
        (tiny_cfg(unet={"block_out_channels": [16, 32, 64]}), "invalid backbone.unet settings"),
        (tiny_cfg(unet={"mid_block_type": None}), "invalid backbone.unet settings for its Contr"),
        (tiny_cfg(unet={"layers_per_block": [1, 2]}), "invalid backbone.unet settings for its"),
        ({"kind": "sd15", "text": "learned"}, "backbone.path must name"),
        (tiny_cfg(text="clip"), "text: clip needs backbone.text_path"),
        (tiny_cfg(dhi={"hint_channels": 4}), "hint_channels 4 does not match data.hints"),
    ],
)
def test_bad_configs_are_one_line_errors(cfg: dict, message: str) -> None:
    with pytest.raises(SiamdiffError, match=message) as info:
        build_backbone(cfg, latent_channels=4)
    assert "\n" not in str(info.value)


def test_dhi_controlnet_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    unet = build_backbone(tiny_cfg(), latent_channels=4).unet
    controlnet = DHIControlNetModel.from_unet(unet, dhi_base_channels=2, hint_channels=5)
    torch.nn.init.normal_(controlnet.controlnet_cond_embedding.conv_out.weight)
    controlnet.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dhi_base_channels"] == 2
    loaded = DHIControlNetModel.from_pretrained(tmp_path)
    assert loaded.config.dhi_base_channels == 2
    assert loaded.config.conditioning_channels == 5
    assert list(loaded.config.block_out_channels) == list(unet.config.block_out_channels)
    expected = controlnet.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_learned_text_conditioner() -> None:
    text = LearnedTextConditioner([PROMPT], dim=6, tokens=3)
    out = text([PROMPT, "", PROMPT])
    assert out.shape == (3, 3, 6)
    assert torch.equal(out[0], out[2])
    assert not torch.equal(out[0], out[1])  # "" is the separately learned unconditional prompt
    out.sum().backward()
    assert torch.equal(text.embeddings.grad[text.vocabulary.index(PROMPT)], torch.full((3, 6), 2.0))
    with pytest.raises(SiamdiffError, match="prompt 'a cat' has no learned text embedding"):
        text(["a cat"])


def test_learned_text_tokens_follow_the_config() -> None:
    """backbone.text_tokens sets the learned embedding's length (default 8)."""
    backbone = build_backbone(tiny_cfg(text_tokens=3), latent_channels=4)
    width = backbone.unet.config.cross_attention_dim
    assert backbone.text.embeddings.shape == (2, 3, width)  # the prompt and ""
    assert backbone.text([PROMPT, ""]).shape == (2, 3, width)


def test_freeze_for_training_leaves_encoder_and_middle_frozen() -> None:
    backbone = build_backbone(tiny_cfg(), latent_channels=4)
    trainable = {id(p) for p in freeze_for_training(backbone)}
    unet = backbone.unet
    for module in (unet.conv_in, unet.time_embedding, unet.down_blocks, unet.mid_block):
        assert not any(p.requires_grad or id(p) in trainable for p in module.parameters())
    # The decoder trains whole: its up blocks, the output norm (docstring) and the output conv.
    decoder = (unet.up_blocks, unet.conv_norm_out, unet.conv_out)
    for module in (*decoder, backbone.controlnet, backbone.text):
        assert all(p.requires_grad and id(p) in trainable for p in module.parameters())
    assert len(list(unet.conv_norm_out.parameters())) == 2  # GroupNorm's weight and bias
    everything = freeze_for_training(backbone, train_unet_encoder=True)
    assert {id(p) for p in unet.parameters()} <= {id(p) for p in everything}


def test_drop_prompts() -> None:
    prompts = [PROMPT] * 400
    assert drop_prompts(prompts, 0.0) == prompts
    assert drop_prompts(prompts, 1.0) == [""] * 400
    first = drop_prompts(prompts, 0.05, torch.Generator().manual_seed(0))
    assert first == drop_prompts(prompts, 0.05, torch.Generator().manual_seed(0))
    assert 5 <= first.count("") <= 40


def write_fake_sd15(root: Path, in_channels: int = 4) -> Path:
    """A diffusers-layout "Stable Diffusion" directory with toy-sized weights and vocabulary."""
    vocab = ["l", "o", "w", "e", "r", "n", "lo", "w</w>", "r</w>", "low</w>", "er</w>", "<unk>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (root / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer(
        str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8
    )
    tokenizer.save_pretrained(root / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    unet = UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        norm_num_groups=8,
        cross_attention_dim=16,
    )
    unet.save_pretrained(root / "unet")
    method_noise_scheduler().save_pretrained(root / "scheduler")
    return root


def test_sd15_directory_with_clip_text(tmp_path: Path) -> None:
    root = write_fake_sd15(tmp_path)
    backbone = build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)
    assert isinstance(backbone.noise_scheduler, DDPMScheduler)
    assert list(backbone.unet.config.block_out_channels) == [16, 32]
    assert backbone.controlnet.config.dhi_base_channels == 16
    context = backbone.text([PROMPT, "", PROMPT])
    assert context.shape == (3, 8, 16)
    assert torch.equal(context[0], context[2])
    assert not torch.allclose(context[0], context[1])
    assert not context.requires_grad
    trainable = {id(p) for p in freeze_for_training(backbone)}
    assert not any(id(p) in trainable for p in backbone.text.parameters())
    # A tokenizer saved without its config pads to the encoder's positions, not to 1e30.
    (root / "tokenizer" / "tokenizer_config.json").unlink()
    clip = build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4).text
    assert clip([PROMPT]).shape == (1, 8, 16)
    # CLIP text with a from-scratch UNet: the UNet takes the encoder's width.
    tiny = build_backbone(tiny_cfg(text="clip", text_path=str(root)), latent_channels=4)
    assert tiny.unet.config.cross_attention_dim == 16


def test_sd15_errors_name_the_directory(tmp_path: Path) -> None:
    root = write_fake_sd15(tmp_path)
    with pytest.raises(SiamdiffError, match="takes 4 latent channels but the autoencoder gives 32"):
        build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 32)
    with pytest.raises(SiamdiffError, match=r"nowhere: not a diffusers Stable Diffusion directory"):
        build_backbone({"kind": "sd15", "path": str(tmp_path / "nowhere")}, 4)
    (root / "unet" / "config.json").write_text("{not json")
    with pytest.raises(SiamdiffError, match="cannot load Stable Diffusion"):
        build_backbone({"kind": "sd15", "path": str(root)}, 4)


@pytest.mark.parametrize(
    ("folder", "dropped", "message"),
    [
        ("unet", "conv_out.", "UNet weights are incomplete"),
        ("unet", "down_blocks.0.resnets.0.conv1.", "UNet weights are incomplete"),
        ("text_encoder", "encoder.layers.0.mlp.", "CLIP text encoder weights are"),
    ],
)
def test_an_incomplete_sd15_checkpoint_is_refused(
    tmp_path: Path, folder: str, dropped: str, message: str
) -> None:
    """transformers would fill what is missing with random values, diffusers with nothing,
    each only logging it: a truncated download would train on noise or fail much later."""
    root = write_fake_sd15(tmp_path)
    weights = next((root / folder).glob("*.safetensors"))
    state = load_file(weights)
    kept = {k: v for k, v in state.items() if not k.startswith(dropped)}
    assert len(kept) < len(state)
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(SiamdiffError, match=message) as error:
        build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)
    assert str(root / folder) in str(error.value) and "\n" not in str(error.value)


def test_an_fp16_text_encoder_gives_an_fp32_context(tmp_path: Path) -> None:
    """transformers keeps a checkpoint's fp16; the fp32 UNet then failed at its first matmul."""
    root = write_fake_sd15(tmp_path)
    encoder = root / "text_encoder"
    CLIPTextModel.from_pretrained(encoder).half().save_pretrained(encoder)
    backbone = build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)
    assert backbone.text([PROMPT]).dtype == torch.float32


def test_damaged_text_encoder_or_tokenizer_is_one_line(tmp_path: Path) -> None:
    root = write_fake_sd15(tmp_path)
    weights = next((root / "text_encoder").glob("*.safetensors"))
    intact = weights.read_bytes()
    weights.write_bytes(intact[:100])  # SafetensorError went through as a traceback
    with pytest.raises(SiamdiffError, match="cannot load the CLIP text encoder"):
        build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)
    weights.write_bytes(intact)
    shutil.rmtree(root / "tokenizer")
    (root / "tokenizer").mkdir()  # loaded, then failed at the first prompt
    with pytest.raises(SiamdiffError, match="tokenizer: holds no tokenizer vocabulary"):
        build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)


def test_fp16_variant_weights_alone_are_found(tmp_path: Path) -> None:
    """A folder saved with variant="fp16" (or a download of only *.fp16.* files): "no file
    named model.safetensors", though the weights were there."""
    root = write_fake_sd15(tmp_path)
    reference = build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)
    for folder, model in (("unet", reference.unet), ("text_encoder", reference.text.text_encoder)):
        for weights in (root / folder).glob("*.safetensors"):
            weights.unlink()
        model.half().save_pretrained(root / folder, variant="fp16")
    backbone = build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)
    assert backbone.text([PROMPT]).dtype == torch.float32
    weight = backbone.unet.conv_in.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, reference.unet.conv_in.weight.float())


def test_a_text_encoder_of_another_size_is_one_line(tmp_path: Path) -> None:
    """transformers raises a RuntimeError for mismatched sizes: a traceback, exit status 1."""
    root = write_fake_sd15(tmp_path)
    config_path = root / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = 20
    config_path.write_text(json.dumps(config))
    with pytest.raises(SiamdiffError, match="cannot load the CLIP text encoder") as error:
        build_backbone({"kind": "sd15", "path": str(root), "text": "clip"}, 4)
    assert "\n" not in str(error.value)
