import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from siamdiff.config import (
    BUILTIN,
    CHOICES,
    PATH_KEYS,
    check_resume_config,
    load_config,
    with_absolute_paths,
)
from siamdiff.errors import SiamdiffError
from siamdiff.models.autoencoder import load_autoencoder


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_configs_merge_over_base(name: str) -> None:
    cfg = load_config(name, ["data.root=/data"])
    assert cfg.data.root == "/data"
    assert cfg.backbone.kind == name
    assert cfg.backbone.prompt == "endoscopic image of a colonic polyp"


def test_overrides_win_and_are_typed() -> None:
    cfg = load_config("tiny", ["train.max_steps=7", "optim.lr=0.5", "model.mode=mask-only"])
    assert cfg.train.max_steps == 7
    assert cfg.optim.lr == 0.5
    assert cfg.model.mode == "mask-only"


def test_the_augmentation_term_starts_strictly_after_a_third_of_training() -> None:
    # The method's "after 1/3": off at step 1000 of 3000 (a rounded 0.3333333333 was on).
    aug_start = load_config("tiny").model.aug_start
    assert [step / 3000 > aug_start for step in (1000, 1001)] == [False, True]


def test_the_method_and_the_paper_setting_are_the_defaults() -> None:
    """method.md's values, and the paper's sd15 setting the README states: a change here is
    a change of the method, not of a default."""
    model = load_config("tiny").model
    assert (model.mode, model.consistency_weight, model.aug_t_max) == ("siamese", 1.0, 200)
    assert (model.prompt_dropout, model.train_unet_encoder) == (0.05, "auto")
    assert load_config("tiny").train.guidance == 9.0
    sd15 = load_config("sd15", ["backbone.path=/models/sd15"])
    assert sd15.data.transforms.size == 384
    assert (sd15.optim.lr, sd15.optim.weight_decay) == (1e-5, 1e-2)
    assert (sd15.train.max_steps, sd15.train.batch_size) == (6000, 6)
    assert (sd15.train.mixed_precision, sd15.train.gradient_checkpointing) == ("bf16", True)
    assert (sd15.backbone.text, sd15.model.consistency_warmup_steps) == ("clip", 600)


def test_sd15_paths_follow_the_backbone_path() -> None:
    cfg = load_config("sd15", ["backbone.path=/models/sd15", "data.root=x"])
    assert cfg.autoencoder.path == "/models/sd15"
    assert cfg.optim.lr == 1e-5


def test_text_encoder_keys_the_backbone_reads_are_settable() -> None:
    cfg = load_config("scratch", ["backbone.text=clip", "backbone.text_path=/models/clip"])
    assert cfg.backbone.text_path == "/models/clip"
    assert load_config("tiny", ["backbone.text_tokens=4"]).backbone.text_tokens == 4


def test_misspelt_override_is_a_one_line_error() -> None:
    with pytest.raises(SiamdiffError, match=r"train\.max_step") as info:
        load_config("tiny", ["train.max_step=7"])
    assert "\n" not in str(info.value)


def test_a_bare_no_is_the_mixed_precision_no_not_false(tmp_path: Path) -> None:
    assert load_config("tiny", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  mixed_precision: no\n")  # YAML 1.1 reads this as false
    assert load_config(user).train.mixed_precision == "no"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.log_every=0", "train.log_every must be an integer >= 1, got 0"),
        ("optim.grad_accum=0", "optim.grad_accum must be an integer >= 1, got 0"),
        ("train.max_steps=abc", "train.max_steps must be an integer >= 1, got 'abc'"),
        ("train.batch_size=true", "train.batch_size must be an integer >= 1, got True"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be an integer >= 0, got -1"),
        ("optim.lr=0", "optim.lr must be a number > 0, got 0"),
        ("optim.lr=.nan", "optim.lr must be a number > 0, got nan"),
        ("model.prompt_dropout=1.5", "model.prompt_dropout must be a number >= 0 and <= 1"),
        ("train.mixed_precision=fp8", "train.mixed_precision must be one of no, bf16, fp16"),
        ("seed=-1", "seed must be an integer in 0..2147483647, got -1"),
        ("seed=1.5", "seed must be an integer in 0..2147483647, got 1.5"),
        ("seed=4294967296", "seed must be an integer in 0..2147483647"),
        ("train.sample_steps=1000", "train.sample_steps must be an integer in 2..500"),
        ("train.sample_steps=1", "train.sample_steps must be an integer in 2..500"),
        ("data.balanced.fg_ratio=[1.5,1]", "fg_ratio must be two integer weights"),
        ("model.train_unet_encoder=maybe", "train_unet_encoder must be auto, true or false"),
        ("optim.betas=[2,0]", "optim.betas must be two numbers in [0, 1)"),
        ("optim.betas=0.9", "optim.betas must be two numbers in [0, 1)"),
        ("autoencoder.scaling_factor=0", "scaling_factor must be null or a number > 0"),
        ("autoencoder.scaling_factor=abc", "scaling_factor must be null or a number > 0"),
        ("train.speed=true", "train.speed must be a list of names"),
        ("train.speed=[1]", "train.speed must be a list of names"),
        ("data.transforms.size=36", "data.transforms.size must be a multiple of 8, got 36"),
        ("train=null", "train must be a mapping of settings, got None"),
        ("run_dir=null", "run_dir must be a path, got None"),
        ("data.root=null", "data.root must be a path, got None"),
        ("model.aug_t_max=-3", "model.aug_t_max must be an integer >= 0, got -3"),
        ("data.verify=maybe", "data.verify must be true or false, got 'maybe'"),
        ("model.mode=maskonly", "model.mode must be one of siamese, mask-only, got 'maskonly'"),
        ("backbone.kind=sd21", "backbone.kind must be one of tiny, scratch, sd15"),
        ("autoencoder.kind=vae", "autoencoder.kind must be one of taef2, diffusers-kl"),
        ("backbone.prediction_type=x0", "prediction_type must be null or one of auto, epsilon"),
        # Nested sections and the settings read far from the config (tracebacks before).
        ("data.transforms=5", "data.transforms must be a mapping of settings, got 5"),
        ("backbone.dhi=5", "backbone.dhi must be a mapping of settings, got 5"),
        ("backbone.seed=abc", "backbone.seed must be an integer in 0..2147483647, got 'abc'"),
        ("autoencoder.seed=abc", "autoencoder.seed must be an integer in 0..2147483647"),
        ("backbone.dhi.base_channels=0", "base_channels must be null or an integer >= 1"),
        ("backbone.prompt=null", "backbone.prompt must be a string, got None"),
        ("backbone.prompt=[a,b]", "backbone.prompt must be a string"),
        ("data.latent_cache=''", "data.latent_cache must be null or a path, got ''"),
        ("data.latent_cache=1.5", "data.latent_cache must be null or a path, got 1.5"),
        ("run_dir=2024.10", """run_dir must be a path, got 2024.1 (quote a path that reads as"""),
        ("backbone.prompt=", "a string, got None (the empty prompt: backbone.prompt=\"''\")"),
        # A list where a mapping stands, or the reverse: a TypeError traceback before.
        ("optim.betas[0]=0.8", "(in 'optim.betas[0]=0.8')"),
        ("optim.betas.0=0.8", "(in 'optim.betas.0=0.8')"),
        ("data.hints.0=a", "(in 'data.hints.0=a')"),
        ("data.transforms=[1]", "(in 'data.transforms=[1]')"),
        ("optim.betas={a:1}", "(in 'optim.betas={a:1}')"),
        # Settings the chosen kinds never read, saved as if they had run.
        ("autoencoder.path=/weights", "autoencoder.path is not read by autoencoder.kind=dct"),
    ],
)
def test_values_the_loop_would_trip_on_are_one_line_errors(override: str, expected: str) -> None:
    """Checked before anything else (a run directory, the data): the command line named."""
    with pytest.raises(SiamdiffError) as info:
        load_config("tiny", [override])
    message = str(info.value)
    assert message.startswith("command line: ") and expected in message and "\n" not in message


def test_a_bad_value_in_a_config_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  root: data\ntrain:\n  batch_size: 0\n")
    with pytest.raises(SiamdiffError) as info:
        load_config(config, ["train.max_steps=10"])
    assert str(info.value) == f"{config}: train.batch_size must be an integer >= 1, got 0"


def test_a_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  root: data\n   size: 64\n")  # one space too many
    with pytest.raises(SiamdiffError, match=r"mine\.yaml: cannot read config: .* at line 3"):
        load_config(config)


def test_the_choices_checked_up_front_are_the_ones_the_code_accepts() -> None:
    from siamdiff.data.transforms import COLOURS, CROP_MODES
    from siamdiff.models.backbone import KINDS, PREDICTION_TYPES
    from siamdiff.models.siamese import MODES

    assert CHOICES["model.mode"] == MODES
    assert CHOICES["backbone.kind"] == KINDS
    assert CHOICES["backbone.prediction_type"] == ("auto", *PREDICTION_TYPES)
    assert CHOICES["data.transforms.crop"] == CROP_MODES
    assert CHOICES["data.transforms.colour"] == COLOURS
    for kind in CHOICES["autoencoder.kind"]:  # each one known to the loader
        try:
            load_autoencoder({"kind": kind, "path": "/nonexistent"})
        except SiamdiffError as exc:
            assert "unknown autoencoder kind" not in str(exc)


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(SiamdiffError, match="not key=value"):
        load_config("tiny", ["train.max_steps"])


def test_user_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("backbone:\n  kind: tiny\ntrain:\n  batch_size: 3\n")
    assert load_config(path).train.batch_size == 3
    path.write_text("train: [1, 2\n")
    with pytest.raises(SiamdiffError, match=r"mine\.yaml"):
        load_config(path)
    with pytest.raises(SiamdiffError, match="no such config"):
        load_config(tmp_path / "absent.yaml")


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["data.root=/d"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    assert load_config(path) == cfg


def test_unet_and_dhi_arguments_are_free_form_but_the_rest_stays_checked() -> None:
    from siamdiff.models.backbone import build_backbone

    cfg = load_config(
        "tiny", ["backbone.unet.block_out_channels=[32,64]", "backbone.dhi.base_channels=2"]
    )
    backbone = build_backbone(OmegaConf.to_container(cfg.backbone), latent_channels=4)
    assert backbone.unet.config.block_out_channels == (32, 64)
    assert backbone.controlnet.config.dhi_base_channels == 2
    with pytest.raises(SiamdiffError, match=r"backbone\.unet_typo"):
        load_config("tiny", ["backbone.unet_typo.x=1"])
    with pytest.raises(SiamdiffError, match=r"backbone\.dhi\.base_channel"):  # misspelt
        load_config("tiny", ["backbone.dhi.base_channel=64"])
    with pytest.raises(SiamdiffError, match=r"invalid backbone\.unet settings"):
        build_backbone({"kind": "tiny", "unet": {"no_such_argument": 1}}, latent_channels=4)


def test_every_local_path_a_run_reads_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config.yaml is read again by `export` and `sample RUN` from any directory."""
    monkeypatch.chdir(tmp_path)
    for folder in ("data", "sd", "clip", "vae"):
        (tmp_path / folder).mkdir()
    cfg = load_config(
        "tiny",
        [
            "data.root=data",
            "backbone.path=sd",
            "backbone.text_path=clip",
            "autoencoder.path=vae",
            "autoencoder.kind=taef2",
            "run_dir=runs/x",
            "data.latent_cache=cache.lmdb",
        ],
    )
    absolute = with_absolute_paths(cfg)
    for key in PATH_KEYS:
        assert Path(OmegaConf.select(absolute, key)).is_absolute(), key
    assert absolute.backbone.text_path == str(tmp_path / "clip")
    # The shell expands run_dir=~/x, not data.root=~/x (a dotted name is no shell variable).
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config("tiny", ["data.root=~/data", "data.latent_cache=~/cache.lmdb"])
    absolute = with_absolute_paths(cfg)
    assert absolute.data.root == str(tmp_path / "data")
    assert absolute.data.latent_cache == str(tmp_path / "cache.lmdb")
    assert not (tmp_path / "~").exists()


def test_a_path_that_reads_as_a_number_is_a_path() -> None:
    assert load_config("tiny", ["run_dir=2024", "data.root=7"]).run_dir == "2024"


def test_a_config_file_mixing_lists_and_mappings_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  betas: {a: 1}\n")
    with pytest.raises(SiamdiffError, match=rf"^{path}: invalid setting"):
        load_config(path)


def test_sd15_refuses_unet_settings_it_never_reads() -> None:
    """sd15 loads its UNet: block_out_channels=[999,999] was saved in config.yaml, unused."""
    # Blamed on the command line that gave it, not on the built-in sd15.yaml.
    with pytest.raises(SiamdiffError, match=r"^command line: backbone\.unet builds a UNet"):
        load_config("sd15", ["backbone.path=/sd", "backbone.unet.block_out_channels=[8,8]"])


def test_a_moved_run_s_config_names_the_folder_it_is_in(tmp_path: Path) -> None:
    """Resumed as `train MOVED/config.yaml --resume`, it started again at its old path."""
    moved = tmp_path / "moved"
    (moved / "checkpoints" / "step-00000002").mkdir(parents=True)
    saved = load_config("tiny", ["data.root=/d", f"run_dir={tmp_path / 'old'}"])
    (moved / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert load_config(moved / "config.yaml").run_dir == str(moved)
    elsewhere = str(tmp_path / "fork")
    assert load_config(moved / "config.yaml", [f"run_dir={elsewhere}"]).run_dir == elsewhere
    template = tmp_path / "template"  # beside no checkpoint of a run: a file like any other
    (template / "checkpoints" / "notes").mkdir(parents=True)
    (template / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert load_config(template / "config.yaml").run_dir == str(tmp_path / "old")


@pytest.mark.parametrize(
    ("saved", "meant"),
    [(None, "epsilon"), ("auto", "v_prediction"), ("epsilon", "epsilon")],
)
def test_a_run_keeps_the_target_it_was_trained_on(
    tmp_path: Path, saved: str | None, meant: str
) -> None:
    """Runs from before backbone.prediction_type existed trained on epsilon; `auto` saved by
    later ones meant v_prediction. Read with today's default, both would be retargeted."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    written = OmegaConf.to_container(load_config("tiny", ["data.root=/d"]))
    if saved is None:
        del written["backbone"]["prediction_type"]
    else:
        written["backbone"]["prediction_type"] = saved
    (run / "config.yaml").write_text(OmegaConf.to_yaml(written))
    assert load_config(run / "config.yaml").backbone.prediction_type == meant
    shutil.rmtree(run / "checkpoints")  # a config file like any other: auto is today's auto
    expected = "auto" if saved in (None, "auto") else saved
    assert load_config(run / "config.yaml").backbone.prediction_type == expected


def test_a_run_saved_by_an_older_siamdiff_stays_usable(tmp_path: Path) -> None:
    """Settings it accepted and a newer one refuses (a preview of 1 DDIM step, an autoencoder
    path the dct kind never read) made the run unexportable and unresumable."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    written = OmegaConf.to_container(load_config("tiny", ["data.root=/d"]))
    written["train"]["sample_steps"] = 1
    written["autoencoder"]["path"] = "/weights/taef2"
    (run / "config.yaml").write_text(OmegaConf.to_yaml(written))
    cfg = load_config(run / "config.yaml")
    assert cfg.train.sample_steps == 2 and cfg.autoencoder.path == "/weights/taef2"
    with pytest.raises(SiamdiffError, match=r"^command line: train\.sample_steps must be"):
        load_config(run / "config.yaml", ["train.sample_steps=1"])  # given now: refused
    # fp16 ran in fp32 on a CPU: a resume without CUDA goes on as `no`.
    written["train"]["mixed_precision"] = "fp16"
    (run / "config.yaml").write_text(OmegaConf.to_yaml(written))
    check_resume_config(
        run / "config.yaml", load_config(run / "config.yaml", ["train.mixed_precision=no"])
    )
