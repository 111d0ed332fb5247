"""The command line as a user meets it: exit codes and one-line errors."""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from siamdiff import cli
from siamdiff.cli import SOURCE_KINDS, ProgressAsLines, main, peer_failed
from siamdiff.data.readers import READERS, load_rgb
from siamdiff.errors import SiamdiffError, compile_failure


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("siamdiff: error: ")
    return lines[0]


def test_console_script_and_module_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "siamdiff", "--help"], capture_output=True, text=True, check=True
    )
    verbs = (
        "demo",
        "prepare",
        "verify",
        "stats",
        "download",
        "train",
        "export",
        "sample",
        "train-segmenter",
        "evaluate",
        "rate",
    )
    for verb in verbs:
        assert verb in done.stdout


def test_cli_source_kinds_are_the_readers() -> None:
    assert set(SOURCE_KINDS) == set(READERS)


def test_prepare_verify_stats_round_trip(phantom_data: Path, tmp_path: Path, capsys) -> None:
    raw = phantom_data.parent / "raw"
    out = tmp_path / "data"
    assert (
        main(
            [
                "prepare",
                "--source",
                f"folder={raw}",
                "--out",
                str(out),
                "--size",
                "32",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["stats", str(out)]) == 0
    assert "phantom" in capsys.readouterr().out and (out / "stats.png").is_file()

    victim = next(out.glob("*_mask.png"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    assert main(["verify", str(out)]) == 1
    assert victim.name in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["prepare", "--source", "folder=/no/such/dir", "--out", "{tmp}/o"], "/no/such/dir"),
        (["verify", "{tmp}"], "manifest-v1.json"),
        (["stats", "{tmp}/absent"], "absent"),
        (["train", "tiny"], "data.root"),
        (["train", "tiny", "data.root=x", "train.bogus=1"], "train.bogus"),
        (["train", "{tmp}/missing.yaml"], "missing.yaml"),
        (["rate"], "SYN REAL --study"),
        (["rate", "--export", "{tmp}"], "{tmp}"),
        (["rate", "--study", "{tmp}/new"], "{tmp}/new: is not a study yet: give SYN REAL"),
        (["rate", "--study", "{tmp}/new", "--port", "70000"], "--port must be in 1..65535"),
        (["sample", "{tmp}", "--masks", "{tmp}", "--out", "{tmp}/syn"], "{tmp}"),
        (
            ["sample", "{tmp}", "--masks", "{tmp}", "--out", "{tmp}/s", "--control-scale", "-1"],
            "--control-scale must be a finite number >= 0, got -1.0",
        ),
        (
            ["evaluate", "{tmp}", "{tmp}", "--out", "m", "--segmenter", "s", "--device", "gpu0"],
            "--device 'gpu0' cannot be used (not a device name: use cpu, cuda, cuda:N, mps",
        ),
        (["train-segmenter", "{tmp}", "--out", "{tmp}/s", "--device", "cuda:7"], "CUDA device"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], needle: str, tmp_path: Path, capsys) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    needle = needle.replace("{tmp}", str(tmp_path))
    assert main(argv) == 2
    assert needle in one_line_error(capsys)


def test_prepare_rejects_an_unknown_source_kind(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--source", "dicom=/x", "--out", "o"])
    assert exit_info.value.code == 2
    assert "KIND=DIR" in capsys.readouterr().err


def test_overrides_after_a_flag_are_overrides_still(capsys) -> None:
    # argparse alone leaves them over ("unrecognized arguments"); main reads them as overrides.
    assert main(["train", "tiny", "--resume", "train.max_step=7"]) == 2
    assert "train.max_step" in one_line_error(capsys)  # read as an override, then refused
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "tiny", "--resume", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("requested", "cuda", "processes", "expected"),
    [
        (None, True, 2, "cuda:1"),  # launched processes each take their own GPU
        ("cuda", True, 2, "cuda:1"),
        (None, True, 1, "cuda"),
        (None, False, 2, "cpu"),
        ("cpu", True, 2, "cpu"),
        ("cuda:0", True, 2, "cuda:0"),  # an explicit index is the user's choice
    ],
)
def test_sample_gives_each_launched_process_its_own_gpu(
    requested: str | None, cuda: bool, processes: int, expected: str, monkeypatch
) -> None:
    import accelerate
    import torch

    import siamdiff.synthesize

    seen = {}

    def fake_synthesize(*args, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(format=lambda: "")

    state = SimpleNamespace(num_processes=processes, process_index=1, local_process_index=1)
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu, timeout: state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    monkeypatch.setattr(siamdiff.synthesize, "synthesize", fake_synthesize)
    argv = ["sample", "model", "--masks", "data:train", "--out", "syn"]
    assert main(argv + (["--device", requested] if requested else [])) == 0
    assert (seen["device"], seen["rank"], seen["world_size"]) == (expected, 1, processes)


def test_ctrl_c_says_how_to_go_on(monkeypatch, capsys) -> None:
    import siamdiff.synthesize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(siamdiff.synthesize, "synthesize", interrupted)
    assert main(["sample", "model", "--masks", "data", "--out", "syn", "--device", "cpu"]) == 130
    assert capsys.readouterr().err == (
        "siamdiff: interrupted; the same command again goes on (finished pairs are kept)\n"
    )
    # Again with --overwrite, it would delete the pairs it kept.
    assert main(["sample", "model", "--masks", "data", "--out", "syn", "--overwrite"]) == 130
    assert capsys.readouterr().err == (
        "siamdiff: interrupted; the same command without --overwrite goes on (finished pairs "
        "are kept)\n"
    )


class _FailingInAWorker(torch.utils.data.Dataset):
    def __init__(self, path: Path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        if self.path.suffix == ".png":
            return load_rgb(self.path)  # UnreadableImageError, a subclass with two arguments
        raise SiamdiffError("mask is 32x32 but its image is 64x64", self.path)


@pytest.mark.parametrize("name", ["a_mask.json", "missing image.png"])
def test_an_error_from_a_data_loader_worker_is_its_own_line(
    name, tmp_path, monkeypatch, capsys
) -> None:
    """torch re-raises a worker's exception by calling its class on the worker's traceback
    text (a RuntimeError when the class refuses one argument): still the user's one line."""
    import siamdiff.data.stats

    path = tmp_path / name

    def failing_in_a_worker(*args, **kwargs):
        next(iter(torch.utils.data.DataLoader(_FailingInAWorker(path), num_workers=1)))

    monkeypatch.setattr(siamdiff.data.stats, "write_stats", failing_in_a_worker)
    assert main(["stats", "data"]) == 2
    expected = "cannot read image" if path.suffix == ".png" else "mask is 32x32"
    assert one_line_error(capsys).startswith(f"siamdiff: error: {path}: {expected}")


def test_an_error_keeps_the_spaces_of_the_path_it_names() -> None:
    """The message is folded onto one line; the path is the user's, spaces and all."""
    error = SiamdiffError("mask is\n  empty", "runs/my  run/a\nb.png")
    assert str(error) == "runs/my  run/a\\nb.png: mask is empty"


def test_progress_bars_in_a_log_file_are_lines_of_their_own() -> None:
    """A cluster job's stderr is a file: carriage-return redraws would make the run one line."""
    from tqdm import tqdm

    log = io.StringIO()
    lines = ProgressAsLines(log)
    with tqdm(total=3, file=lines, mininterval=0, ascii=True, desc="train", leave=False) as bar:
        for _ in range(3):
            bar.update(1)
    print("done", file=lines)
    lines.finish()
    rows = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and rows[-1] == ""  # whole lines only
    assert [r.split("|")[-1].split()[0] for r in rows[:-2]] == ["0/3", "1/3", "2/3", "3/3"]
    assert rows[-2] == "done"  # the cleared bar (leave=False) left no blank line


def test_a_usage_mistake_is_one_line_pointing_at_help(capsys) -> None:
    """argparse printed its usage block first: several lines for a forgotten option."""
    with pytest.raises(SystemExit) as exit_status:
        main(["evaluate", "real", "syn", "--out", "m.json"])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "siamdiff evaluate: error: the following arguments are required: --segmenter "
        "(see siamdiff evaluate --help)"
    ]
    # A typo is no abbreviation: `--resum` trained as `--resume`, `--overw` replaced outputs.
    for typo in (["train", "tiny", "--resum"], ["demo", "--overw"]):
        with pytest.raises(SystemExit) as exit_status:
            main(typo)
        assert exit_status.value.code == 2
        assert f"unrecognized arguments: {typo[-1]}" in capsys.readouterr().err


def test_the_command_line_puts_stderr_back(capsys) -> None:
    before = sys.stderr
    assert main(["stats", "/nonexistent/data"]) == 2
    assert sys.stderr is before
    assert capsys.readouterr().err.startswith("siamdiff: error: /nonexistent/data")


def test_help_shows_every_telling_default(capsys) -> None:
    for verb, shown in (
        ("sample", ("(default: 50)", "(default: 42)", "(default: 0.0)")),
        ("demo", ("(default: 400)", "(default: siamdiff-demo)")),
    ):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = capsys.readouterr().out
        assert all(default in text for default in shown), verb
        assert "(default: False)" not in text and "(default: None)" not in text


def test_only_a_lost_peer_of_a_launch_is_told_in_one_line() -> None:
    """A gloo or NCCL error outside a multi-process launch is a bug: its traceback stays."""
    assert not peer_failed(RuntimeError("[gloo/pair.cc:561] Connection closed by peer"))


def test_a_notice_is_printed_once_per_launch_and_always_by_a_lone_process(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from siamdiff.runtime import notice

    for world, rank, shown in (
        ("", "", True),
        ("1", "3", True),
        ("2", "0", True),
        ("2", "1", False),
    ):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        notice("warning: a checkpoint was skipped")
        assert (capsys.readouterr().err != "") is shown, (world, rank)


def test_a_failing_torch_compile_is_one_line_saying_what_to_do(capsys) -> None:
    from torch._dynamo.exc import TorchRuntimeError
    from torch._inductor.exc import InductorError

    # As inductor raised it here, its compile cache damaged by another run sharing it.
    damaged = InductorError(ImportError("/tmp/torchinductor_root/x.main.so: file too short"), None)

    def compiles(args: argparse.Namespace) -> int:
        raise damaged

    assert cli._run(argparse.Namespace(handler=compiles, verb="train")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "siamdiff: error: torch.compile failed (ImportError: /tmp/torchinductor_root/x.main.so: "
        "file too short): leave out the compile speed lever, or give it an empty cache with "
        "TORCHINDUCTOR_CACHE_DIR=/a/new/folder (runs sharing one cache can damage it)"
    ]
    # Any other error keeps its traceback, the compiled code's own (a shape bug) too.
    assert compile_failure(RuntimeError("a bug")) is None
    assert compile_failure(TorchRuntimeError("a and b must have same reduction dim")) is None


def _fake_segmenter_dir(tmp_path: Path) -> Path:
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "segmenter.json").write_text('{"val": null}')
    return tmp_path / "seg"


# Every option given a value other than its default, and where each must arrive.
OPTIONS_REACH_THEIR_CALL = {
    "prepare": (
        "siamdiff.data.prepare.prepare",
        "prepare --source folder=raw --out d --size 96 --mask-threshold 7 --image-bits 12 "
        "--workers 0 --strict --drop-empty --overwrite",
        {"size": 96, "mask_threshold": 7, "overwrite": True, "strict": True, "drop_empty": True}
        | {"workers": 0, "image_bits": 12},
    ),
    "download": (
        "siamdiff.data.download.download_kvasir",
        "download kvasir-seg --dest d --url mirror.zip --sha256 ab12 --overwrite",
        {"url": "mirror.zip", "expected_sha256": "ab12", "overwrite": True},
    ),
    "export": (
        "siamdiff.export.export_run",
        "export run out --checkpoint 40 --overwrite",
        {"checkpoint": "40", "overwrite": True},
    ),
    "sample": (
        "siamdiff.synthesize.synthesize",
        "sample model --masks data:val --out syn --per-mask 3 --steps 7 --guidance 3.5 "
        "--control-scale 1.5 --eta 0.25 --seed 5 --scheduler unipc --mask-aug flip,shift "
        "--batch-size 2 --device cpu --format pranet,nnunet --limit 6 --overwrite "
        "--speed channels_last --no-verify",
        {"split": "val", "per_mask": 3, "steps": 7, "guidance": 3.5, "control_scale": 1.5}
        | {"eta": 0.25, "seed": 5, "scheduler": "unipc", "mask_aug": ["flip", "shift"]}
        | {"batch_size": 2, "device": "cpu", "formats": ["pranet", "nnunet"], "limit": 6}
        | {"overwrite": True, "speed": "channels_last", "verify": False},
    ),
    "train-segmenter": (
        "siamdiff.evaluate.segmenter.train_segmenter",
        "train-segmenter data --out seg --arch fpn --encoder resnet34 --size 64 --epochs 3 "
        "--batch-size 5 --lr 0.01 --seed 2 --extra syn --device cpu --workers 1 --overwrite "
        "--no-verify",
        {"arch": "fpn", "encoder": "resnet34", "size": 64, "epochs": 3, "batch_size": 5}
        | {"lr": 0.01, "seed": 2, "extra_roots": (Path("syn"),), "device": "cpu", "workers": 1}
        | {"overwrite": True, "verify": False},
    ),
    "train-vae": (
        "siamdiff.train_vae.train_vae",
        "train-vae data --out vae --device cpu --workers 1 --resume --no-verify",
        {"device": "cpu", "workers": 1, "resume": True, "overwrite": False, "verify": False},
    ),
    "evaluate": (
        "siamdiff.evaluate.metrics.evaluate",
        "evaluate real syn --segmenter seg --out {tmp}/m.json --utility --utility-epochs 2 "
        "--utility-size 64 --utility-seeds 2 --utility-first-seed 3 --utility-archs unet "
        "--utility-matched-steps --inception-weights w.pth --clip-model clip --device cpu "
        "--workers 1 --no-verify",
        {"segmenter_dir": Path("seg"), "utility": True, "inception_weights": Path("w.pth")}
        | {"clip_model": Path("clip")}
        | {"device": "cpu", "workers": 1, "verify": False}
        | {
            "utility_options": {
                "epochs": 2,
                "size": 64,
                "seeds": (3, 4),
                "archs": ("unet",),
                "matched_steps": True,
            }
        },
    ),
    "rate": (
        "siamdiff.rate.open_study",
        "rate syn real --study s --per-source 4 --repeats 2 --seed 3 --overlay",
        {"per_source": 4, "repeats": 2, "seed": 3, "overlay": True},
    ),
    "demo": (
        "siamdiff.demo.run_demo",
        "demo --out o --train-steps 5 --overwrite",
        {"train_steps": 5, "overwrite": True},
    ),
}


@pytest.mark.parametrize("verb", OPTIONS_REACH_THEIR_CALL)
def test_every_option_reaches_the_call_it_is_for(
    verb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import accelerate

    import siamdiff.evaluate.metrics
    import siamdiff.rate
    import siamdiff.rate.server

    target, argv, expected = OPTIONS_REACH_THEIR_CALL[verb]
    module, name = target.rsplit(".", 1)
    seen: dict = {}
    returned = {
        "train-segmenter": _fake_segmenter_dir(tmp_path),
        "sample": SimpleNamespace(format=lambda: ""),
        "prepare": SimpleNamespace(format=lambda: ""),
    }.get(verb, tmp_path)

    def recorded(*args, **kwargs):
        seen.update(kwargs)
        return returned

    monkeypatch.setattr(importlib.import_module(module), name, recorded)
    state = SimpleNamespace(num_processes=1, process_index=0, local_process_index=0)
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu, timeout: state)
    monkeypatch.setattr(siamdiff.evaluate.metrics, "format_metrics", lambda metrics: "")
    monkeypatch.setattr(
        siamdiff.evaluate.metrics, "write_evaluation_report", lambda *a, **k: tmp_path
    )
    monkeypatch.setattr(siamdiff.rate, "serve", lambda *a, **k: None)
    monkeypatch.setattr(siamdiff.rate.server, "check_can_listen", lambda host, port: None)
    monkeypatch.chdir(tmp_path)
    assert main(argv.format(tmp=tmp_path).split()) == 0
    assert {key: seen.get(key) for key in expected} == expected


def test_every_train_vae_setting_reaches_its_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import siamdiff.train_vae

    seen = []
    monkeypatch.setattr(
        siamdiff.train_vae, "train_vae", lambda data, out, settings, **kwargs: seen.append(settings)
    )
    argv = (
        "train-vae data --out vae --size 64 --steps 9 --batch-size 3 --lr 0.001 --widths 8,16 "
        "--layers-per-block 2 --latent-channels 8 --kl-weight 0.01 --ssim-weight 0.5 --seed 4 "
        "--checkpoint-every 3"
    )
    assert main(argv.split()) == 0
    expected = siamdiff.train_vae.VAESettings(
        size=64,
        steps=9,
        batch_size=3,
        lr=0.001,
        widths=(8, 16),
        layers_per_block=2,
        latent_channels=8,
        kl_weight=0.01,
        ssim_weight=0.5,
        seed=4,
        checkpoint_every=3,
    )
    assert seen == [expected]
