"""Training on the tiny backbone over phantom data: real steps, real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from siamdiff.config import load_config
from siamdiff.data.dataset import PairedDataset
from siamdiff.data.manifest import MANIFEST_NAME
from siamdiff.data.sampling import BalancedBatchSampler
from siamdiff.errors import SiamdiffError
from siamdiff.export import export_run, load_export
from siamdiff.models.siamese import SiameseDiffusion
from siamdiff.report import read_loss_log
from siamdiff.train import (
    LOSS_KEYS,
    SeededAugmentation,
    batches,
    build_optimizer,
    check_trained_on,
    checkpoints,
    configure_deepspeed,
    last_valid_checkpoint,
    launcher_grace_note,
    preview_pairs,
    resumed_batches,
    train,
)
from tests.helpers import (
    PHANTOM_SIZE,
    launch_two_processes,
    out_of_memory_on_call,
    tiny_config,
    two_process_command,
    two_process_env,
)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoints(run_dir)[-1] / "model.safetensors")


def test_run_directory_holds_everything_a_user_looks_at(phantom_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(
        tiny_config(
            phantom_data,
            run,
            "train.max_steps=4",
            "train.checkpoint_every=1",
            "train.keep_last=2",
            "train.sample_every=2",
        )
    )
    assert [p.name for p in checkpoints(run)] == ["step-00000003", "step-00000004"]
    state = json.loads((checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state.items() >= {"step": 4, "batches_taken": 4, "num_processes": 1}.items()
    assert state["loss_window"]["seen"] == 0  # logged at step 4: a new window
    assert state["data_pairs"] == len(PairedDataset(phantom_data))
    assert load_config(run / "config.yaml").train.max_steps == 4
    written = (run / "config.yaml").read_text()
    assert "prediction_type: v_prediction" in written  # `auto`, saved as what it trained on
    rows = read_loss_log(run / "losses.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) >= {"loss", "mask", "image", "consistency", "augment", "lr"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert list((run / "tb").rglob("events.out.tfevents.*"))


def test_a_run_dir_that_is_no_place_for_a_run_is_refused(phantom_data: Path, tmp_path: Path):
    """The dataset itself (its verify then failed on the run's files), a file, or a folder
    of something else."""
    for run_dir in (phantom_data, phantom_data / "run", phantom_data.parent):
        with pytest.raises(SiamdiffError, match="is, holds or lies inside the dataset"):
            train(tiny_config(phantom_data, run_dir, "train.max_steps=1"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(SiamdiffError, match="is a file: run_dir names a folder"):
        train(tiny_config(phantom_data, tmp_path / "afile", "train.max_steps=1"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_text("")
    with pytest.raises(SiamdiffError, match="exists and is not a siamdiff run"):
        train(tiny_config(phantom_data, tmp_path / "photos", "train.max_steps=1"), resume=True)
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a.jpg"]


def test_existing_run_needs_resume(phantom_data: Path, tmp_path: Path):
    cfg = tiny_config(phantom_data, tmp_path / "run", "train.max_steps=1")
    train(cfg)
    with pytest.raises(SiamdiffError, match="--resume"):
        train(cfg)


def test_resume_refuses_settings_the_run_was_not_trained_with(
    phantom_data: Path, tmp_path: Path, capsys
):
    run = tmp_path / "run"
    done = ("train.max_steps=1", "train.sample_every=100")
    train(tiny_config(phantom_data, run, *done), resume=True)  # a requeued job's first start
    assert f"--resume: no checkpoint in {run}" in capsys.readouterr().err
    saved = load_config(run / "config.yaml")
    assert saved.data.root == str(phantom_data.resolve())  # the same files from anywhere
    bigger = tiny_config(phantom_data, run, *done, "train.batch_size=4", "optim.lr=0.5")
    with pytest.raises(SiamdiffError, match=r"train\.batch_size 2 -> 4") as err:
        train(bigger, resume=True)
    assert "optim.lr" in str(err.value)
    assert f"siamdiff train {run / 'config.yaml'} --resume" in str(err.value)
    # A latent cache may move, not appear (the augmentations depend on it); a free-form
    # UNet argument given on one side only is another model.
    for other, message in (
        (f"data.latent_cache={tmp_path / 'cache'}", r"data\.latent_cache None -> "),
        ("backbone.unet.dropout=0.1", r"backbone\.unet\.dropout \(unset\) -> 0\.1"),
    ):
        with pytest.raises(SiamdiffError, match=message):
            train(tiny_config(phantom_data, run, *done, other), resume=True)
    # Reporting and where the data lives may change; the saved config resumes as it is.
    train(tiny_config(phantom_data, run, *done, "train.log_every=5"), resume=True)
    out = capsys.readouterr().out
    assert "at train.max_steps (1) already: nothing to train" in out and "training" not in out
    assert load_config(run / "config.yaml").train.log_every != 5  # a no-op rewrites nothing
    train(load_config(run / "config.yaml"), resume=True)
    # Training longer is allowed, and what it changes is said.
    train(tiny_config(phantom_data, run, "train.max_steps=2", "train.sample_every=100"), True)
    assert "train.max_steps 1 -> 2: the learning-rate schedule" in capsys.readouterr().err
    assert checkpoints(run)[-1].name == "step-00000002"
    with pytest.raises(SiamdiffError, match=r"at step 2, past train\.max_steps 1"):
        train(tiny_config(phantom_data, run, *done), resume=True)
    assert load_config(run / "config.yaml").train.max_steps == 2  # not rewritten


def test_training_longer_follows_the_new_schedule_from_the_first_resumed_step(
    phantom_data: Path, tmp_path: Path
):
    """The checkpoint holds the rate its schedule gave at its step: 0 at a finished run's
    end, which the first resumed step used instead of the new schedule's rate."""
    quick = ("optim.warmup_steps=1", "train.sample_every=100", "train.checkpoint_every=2")
    straight, longer = tmp_path / "straight", tmp_path / "longer"
    train(tiny_config(phantom_data, straight, "train.max_steps=4", *quick))
    train(tiny_config(phantom_data, longer, "train.max_steps=2", *quick))
    train(tiny_config(phantom_data, longer, "train.max_steps=4", *quick), resume=True)
    rates = [
        {r["step"]: r["lr"] for r in read_loss_log(run / "losses.jsonl")}
        for run in (straight, longer)
    ]
    assert rates[1][3] == rates[0][3] > 0


@pytest.mark.parametrize(
    ("how", "kept"),
    [
        # Ctrl-C (or SIGTERM) mid-step: the step finishes, its boundary checkpoint is written.
        ("signal", ["step-00000002", "step-00000003"]),
        # A second Ctrl-C stops at once: the last boundary checkpoint is kept as it was.
        ("at-once", ["step-00000002"]),
    ],
)
def test_interrupted_run_resumes_to_bit_identical_weights(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, kept: list[str]
):
    # One loss row for the 4 steps: the resumed run's averages the steps before the stop too.
    overrides = ("train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=3")
    overrides += ("train.log_every=4",)
    straight = tmp_path / "straight"
    train(tiny_config(phantom_data, straight, *overrides))
    # Whatever the launcher left (a background job's shell ignores Ctrl-C): it must come back.
    before = signal.getsignal(signal.SIGINT)

    calls = {"n": 0}
    original = SeededAugmentation.__getitem__

    def interrupt_at_step_three(self, index):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # the batch of step 3 is loading
            if how == "signal":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt
        return original(self, index)

    broken = tmp_path / "broken"
    monkeypatch.setattr(SeededAugmentation, "__getitem__", interrupt_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(phantom_data, broken, *overrides))
    monkeypatch.setattr(SeededAugmentation, "__getitem__", original)
    assert [p.name for p in checkpoints(broken)] == kept
    # A stop skips the step's preview grid: a launcher's grace after the signal is short.
    assert not (broken / "samples" / "step-00000003.png").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    train(tiny_config(phantom_data, broken, *overrides), resume=True)

    a, b = final_weights(straight), final_weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [read_loss_log(run / "losses.jsonl") for run in (straight, broken)]
    assert [r["step"] for r in rows[1]] == [4]
    assert {k: rows[1][0][k] for k in LOSS_KEYS} == {k: rows[0][0][k] for k in LOSS_KEYS}


def test_data_workers_leave_ctrl_c_to_the_main_process(
    phantom_data: Path, monkeypatch: pytest.MonkeyPatch
):
    """A terminal's Ctrl-C reaches the DataLoader workers too: the main process finishes its
    step (which may need another batch), so a worker must not die of it."""
    data = SeededAugmentation(PairedDataset(phantom_data), seed=0)
    sampler = BalancedBatchSampler(data.dataset.coverages, batch_size=2)
    original = SeededAugmentation.__getitem__

    def ctrl_c_in_the_worker(self, index):  # runs in the worker process
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, index)

    monkeypatch.setattr(SeededAugmentation, "__getitem__", ctrl_c_in_the_worker)
    stream = batches(data, sampler, start=0, num_workers=1, pin_memory=False)
    try:
        assert [len(next(stream)["image"]) for _ in range(3)] == [2, 2, 2]
    finally:
        stream.close()


class _RandomDraws(torch.utils.data.Dataset):
    """Each item: its index and one draw of torch's RNG, as a random crop would make."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "draw": torch.rand(())}


def test_a_frame_drawn_twice_an_epoch_gets_other_augmentations():
    """Two large lesions, four small ones, 2:1: each large frame is drawn twice an epoch."""
    data = SeededAugmentation(_RandomDraws(), seed=3)
    sampler = BalancedBatchSampler([0.9, 0.8, 0.1, 0.1, 0.1, 0.1], batch_size=3)

    def epoch(start: int) -> list[tuple[int, float]]:
        stream = batches(data, sampler, start=start, num_workers=0, pin_memory=False)
        drawn = [next(stream) for _ in range(len(sampler) - start)]
        stream.close()
        pairs = (zip(b["index"], b["draw"], strict=True) for b in drawn)
        return [(int(i), float(v)) for batch in pairs for i, v in batch]

    straight = epoch(0)
    large = [v for i, v in straight if i in (0, 1)]
    assert len(large) == 4 and len(set(large)) == 4
    assert epoch(1) == straight[3:]  # a resume draws the same augmentations


def test_partial_checkpoint_is_never_resumed_from_and_cleared(phantom_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    cfg = tiny_config(phantom_data, run, "train.max_steps=2", "train.checkpoint_every=1")
    train(cfg)
    # A kill during save leaves only a ".partial" directory: resume must ignore it.
    (run / "checkpoints" / "step-00000001.partial").mkdir()
    assert checkpoints(run)[-1].name == "step-00000002"
    cfg.train.max_steps = 3
    train(cfg, resume=True)  # the next start clears it, whatever its step
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-00000003"
    assert not list((run / "checkpoints").glob("*.partial"))


def test_resume_refuses_other_data_or_another_autoencoder(phantom_data: Path, tmp_path: Path):
    """Paths may change on resume (data moved), the files trained on may not: the sampler's
    saved position means other batches on other pairs."""
    run, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(phantom_data, moved)
    train(tiny_config(phantom_data, run, "train.max_steps=1"))
    train(tiny_config(moved, run, "train.max_steps=2"), resume=True)  # the same files
    manifest = json.loads((moved / MANIFEST_NAME).read_text())
    train_records = [r for r in manifest["records"] if r["split"] == "train"]
    train_records[0]["split"] = "val"
    (moved / MANIFEST_NAME).write_text(json.dumps(manifest))
    then_now = rf"\({len(train_records)} then, {len(train_records) - 1} now"
    with pytest.raises(SiamdiffError, match=f"other training pairs .* {then_now}"):
        train(tiny_config(moved, run, "train.max_steps=3"), resume=True)

    state = json.loads((checkpoints(run)[-1] / "trainer_state.json").read_text())
    cfg = tiny_config(phantom_data, run)
    check_trained_on(state, {**state}, cfg)
    with pytest.raises(SiamdiffError, match="is not the autoencoder the run was trained with"):
        check_trained_on(state, {**state, "autoencoder_identity": "taef2:other"}, cfg)
    older = {k: state[k] for k in ("step", "batches_taken")}  # before the record: resumes
    check_trained_on(older, state, cfg)


def test_training_refuses_a_dataset_that_does_not_verify(phantom_data: Path, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    for item in phantom_data.iterdir():
        (data / item.name).write_bytes(item.read_bytes())
    victim = next(data.glob("*_mask.png"))
    raw = bytearray(victim.read_bytes())
    raw[-20] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(SiamdiffError, match="does not verify"):
        train(tiny_config(data, tmp_path / "run", "train.max_steps=1"))
    train(tiny_config(data, tmp_path / "run", "train.max_steps=1", "data.verify=false"))


def test_frozen_weights_stay_and_trainable_ones_move(phantom_data: Path, tmp_path: Path):
    sd15_like = ("train.max_steps=3", "model.train_unet_encoder=false", "train.checkpoint_every=1")
    run = tmp_path / "run"
    train(tiny_config(phantom_data, run, *sd15_like, "train.keep_last=3"))
    first, last = (load_file(p / "model.safetensors") for p in checkpoints(run)[::2])
    frozen = [k for k in first if k.startswith(("unet.down_blocks", "unet.mid_block"))]
    moving = [k for k in first if k.startswith(("unet.up_blocks", "controlnet."))]
    assert frozen and moving
    assert all(torch.equal(first[k], last[k]) for k in frozen)
    assert sum(not torch.equal(first[k], last[k]) for k in moving) > len(moving) // 2


def test_the_loop_feeds_the_loss_its_hints_schedules_and_dropped_prompts(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Per step: the mask hint, then the image hint; w_i = step / max_steps; lambda_c annealed
    over its warm-up; the prompts after dropout; a from-scratch UNet trained whole (auto)."""
    calls: list[dict] = []
    loss_terms = SiameseDiffusion.loss_terms

    def recorded(self, z0, mask_hint, image_hint, text_emb, **kwargs):
        with torch.no_grad():
            empty = self.text([""] * len(text_emb))
        calls.append(
            {
                "mask_hint": mask_hint.detach().clone(),
                "image_hint": image_hint.detach().clone(),
                "unconditional": torch.equal(text_emb, empty),
                "encoder_trains": all(p.requires_grad for p in self.unet.down_blocks.parameters()),
                **kwargs,
            }
        )
        return loss_terms(self, z0, mask_hint, image_hint, text_emb, **kwargs)

    monkeypatch.setattr(SiameseDiffusion, "forward", recorded)
    schedule = ("model.consistency_warmup_steps=2", "model.consistency_weight=0.5")
    run = tmp_path / "run"
    train(tiny_config(phantom_data, run, "train.max_steps=4", *schedule, "model.prompt_dropout=1"))
    assert [c["progress"] for c in calls] == [0.0, 0.25, 0.5, 0.75]
    assert [c["consistency_weight"] for c in calls] == [0.0, 0.25, 0.5, 0.5]
    assert all(c["unconditional"] and c["encoder_trains"] for c in calls)
    for call in calls:
        mask_hint = call["mask_hint"]
        assert set(mask_hint.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(mask_hint, mask_hint[:, :1].expand_as(mask_hint))
        assert call["image_hint"].unique().numel() > 2
    calls.clear()
    kept = tmp_path / "kept"
    train(tiny_config(phantom_data, kept, "train.max_steps=1", "model.prompt_dropout=0"))
    assert not calls[0]["unconditional"]


def test_a_mask_only_run_trains_mask_diffusion_alone_and_exports_as_such(
    phantom_data: Path, tmp_path: Path
):
    run = tmp_path / "run"
    train(tiny_config(phantom_data, run, "train.max_steps=2", "model.mode=mask-only"))
    rows = read_loss_log(run / "losses.jsonl")
    assert all(r["image"] == r["consistency"] == r["augment"] == 0 < r["mask"] for r in rows)
    assert load_export(export_run(run, tmp_path / "export")).model.mode == "mask-only"


def test_channels_last_training_takes_the_same_steps(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    layouts = []
    loss_terms = SiameseDiffusion.loss_terms

    def recorded(self, *args, **kwargs):
        weight = self.unet.conv_in.weight
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last))
        return loss_terms(self, *args, **kwargs)

    monkeypatch.setattr(SiameseDiffusion, "forward", recorded)
    overrides = ("train.max_steps=2", "train.sample_every=2")
    train(tiny_config(phantom_data, tmp_path / "plain", *overrides))
    fast = tmp_path / "nhwc"
    train(tiny_config(phantom_data, fast, *overrides, "train.speed=[channels_last]"))
    assert layouts == [False, False, True, True]  # the lever was applied, not just accepted
    assert (fast / "samples" / "step-00000002.png").is_file()
    a, b = final_weights(tmp_path / "plain"), final_weights(fast)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    # The checkpoint resumes (its tensors were saved from NHWC parameters).
    train(tiny_config(phantom_data, fast, "train.max_steps=3", "train.speed=[channels_last]"), True)
    state = json.loads((checkpoints(fast)[-1] / "trainer_state.json").read_text())
    assert state.items() >= {"step": 3, "batches_taken": 3, "num_processes": 1}.items()


@pytest.mark.parametrize(
    ("speed", "expected"),
    [
        ("[bf16_frozen]", "needs train.mixed_precision=bf16"),
        ("[cuda_graphs]", "^train.speed: unknown speed lever 'cuda_graphs'"),
    ],
)
def test_speed_levers_that_cannot_apply_are_refused(
    phantom_data: Path, tmp_path: Path, speed: str, expected: str
):
    with pytest.raises(SiamdiffError, match=expected):
        train(tiny_config(phantom_data, tmp_path / "run", f"train.speed={speed}"))


def test_out_of_memory_is_one_line_that_says_what_to_change(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run = tmp_path / "run"
    cfg = tiny_config(phantom_data, run, "train.max_steps=3", "train.checkpoint_every=1")
    monkeypatch.setattr(
        SiameseDiffusion, "forward", out_of_memory_on_call(SiameseDiffusion.forward, call=3)
    )
    with pytest.raises(SiamdiffError) as error:
        train(cfg)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{run}: CUDA out of memory.")
    assert "Tried to allocate 20.00 GiB: lower train.batch_size" in message
    assert "Of the allocated" not in message
    monkeypatch.undo()
    assert [p.name for p in checkpoints(run)] == ["step-00000001", "step-00000002"]
    train(cfg, resume=True)
    assert [p.name for p in checkpoints(run)][-1] == "step-00000003"


def test_deepspeed_reads_batch_accumulation_clipping_and_precision_from_the_config(
    phantom_data: Path, tmp_path: Path
):
    # examples/accelerate/deepspeed_zero2.yaml as accelerate hands it over (bf16 chosen there).
    ds_config = {
        "zero_optimization": {"stage": 2},
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": "auto",
        "bf16": {"enabled": True},
    }
    overrides = ("train.batch_size=6", "optim.grad_accum=4", "optim.max_grad_norm=0.5")
    cfg = tiny_config(phantom_data, tmp_path / "run", *overrides, "train.mixed_precision=bf16")
    configure_deepspeed(ds_config, cfg, num_processes=8)
    assert ds_config == {
        "zero_optimization": {"stage": 2},
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.5,
        "train_micro_batch_size_per_gpu": 6,
        "train_batch_size": 6 * 4 * 8,
        # fp32 weights under torch's autocast, as without DeepSpeed: no bf16 weights
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
    }
    cfg = tiny_config(phantom_data, tmp_path / "run", "train.mixed_precision=fp16")
    with pytest.raises(SiamdiffError, match="fp16 is not supported under DeepSpeed"):
        configure_deepspeed({}, cfg, num_processes=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the launch is valid")
def test_a_deepspeed_launch_without_cuda_is_refused(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets
    with pytest.raises(SiamdiffError, match="DeepSpeed launch needs CUDA GPUs"):
        train(tiny_config(phantom_data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_ddp_processes_keep_identical_weights(phantom_data: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    done = launch_two_processes(
        "train",
        "tiny",
        f"data.root={phantom_data}",
        f"run_dir={run}",
        f"data.transforms.size={PHANTOM_SIZE}",
        "train.batch_size=2",
        "train.max_steps=3",
        "train.sample_steps=2",
        "train.sample_count=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights identical on all 2 ranks" in done.stdout + done.stderr
    assert checkpoints(run)[-1].name == "step-00000003"
    assert done.stdout.count("run written to") == 1


def test_logged_losses_are_the_mean_over_every_rank(tmp_path: Path) -> None:
    """Each rank sees its own share of the global batch; the log must not be rank 0's alone."""
    script = tmp_path / "reduce.py"
    script.write_text(
        "from accelerate import Accelerator\n"
        "from siamdiff.train import mean_over_ranks\n"
        "accelerator = Accelerator(cpu=True)\n"
        "rank = accelerator.process_index\n"
        "means = mean_over_ranks(accelerator, {'loss': rank + 1.0, 'mask': 10.0 * rank})\n"
        "print(f'rank {rank}: {means}', flush=True)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=two_process_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: {{'loss': 1.5, 'mask': 5.0}}" in done.stdout


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(phantom_data: Path, tmp_path: Path):
    """SIGTERM to rank 1 alone (a preempted node): rank 0 hears of it at the step boundary,
    both save that step's checkpoint and exit; neither waits forever for the other."""
    run = tmp_path / "ddp"
    command = [*two_process_command(), "train", "tiny", f"data.root={phantom_data}"]
    command += [f"run_dir={run}", f"data.transforms.size={PHANTOM_SIZE}", "train.batch_size=2"]
    command += ["train.max_steps=10000", "train.checkpoint_every=10000", "train.log_every=1"]
    command += ["train.sample_every=10000"]
    with subprocess.Popen(command, env=two_process_env(), stderr=subprocess.PIPE, text=True) as job:
        deadline = time.monotonic() + 300
        while (
            len(read_loss_log(run / "losses.jsonl") if (run / "losses.jsonl").exists() else []) < 3
        ):
            assert job.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        ranks = {
            int(child.environ().get("RANK", -1)): child
            for child in psutil.Process(job.pid).children(recursive=True)
        }
        ranks[1].send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=120)
    assert "SIGTERM: finishing this step" in stderr
    last = checkpoints(run)[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] >= 3 and state["batches_taken"] == state["step"]
    assert last_valid_checkpoint(run) == last  # whole: every rank wrote its part


@pytest.mark.slow
def test_two_hundred_tiny_steps_lower_the_loss(phantom_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    train(
        tiny_config(
            phantom_data,
            run,
            "train.max_steps=200",
            "train.batch_size=4",
            "train.log_every=20",
            "train.checkpoint_every=200",
            "train.sample_every=200",
        )
    )
    rows = read_loss_log(run / "losses.jsonl")
    assert len(rows) == 10
    # Means over 20 steps each: the first window against the last two.
    first, last = rows[0]["mask"], (rows[-1]["mask"] + rows[-2]["mask"]) / 2
    assert last < 0.8 * first, [round(r["mask"], 3) for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_latent_cache_is_built_once_and_used(phantom_data: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "latents.lmdb"
    overrides = ("train.max_steps=2", f"data.latent_cache={cache}", "train.sample_every=100")
    train(tiny_config(phantom_data, tmp_path / "a", *overrides))
    assert cache.is_dir()

    # Second run: every latent comes from the cache; the autoencoder never encodes.
    from siamdiff.models.autoencoder import LatentAutoencoder

    def no_encoding(self, images):
        raise AssertionError("encoded although the latent was cached")

    monkeypatch.setattr(LatentAutoencoder, "encode", no_encoding)
    train(tiny_config(phantom_data, tmp_path / "b", *overrides))
    assert checkpoints(tmp_path / "b")[-1].name == "step-00000002"


def test_a_latent_cache_inside_the_dataset_or_without_verify_is_refused(
    phantom_data: Path, tmp_path: Path
):
    """Inside, its files made the dataset fail verify on the next run; without verify, an
    edited mask was served the latent of its old window."""
    inside = tiny_config(phantom_data, tmp_path / "a", f"data.latent_cache={phantom_data}/lat")
    with pytest.raises(SiamdiffError, match="is, holds or lies inside the dataset"):
        train(inside)
    unverified = ("data.verify=false", f"data.latent_cache={tmp_path / 'lat'}")
    with pytest.raises(SiamdiffError, match=r"data\.latent_cache needs data\.verify=true"):
        train(tiny_config(phantom_data, tmp_path / "b", *unverified))
    assert not (phantom_data / "lat").exists() and not (tmp_path / "lat").exists()


def test_lab_colour_is_refused_for_a_latent_model(phantom_data: Path, tmp_path: Path):
    cfg = tiny_config(phantom_data, tmp_path / "run", "data.transforms.colour=lab")
    with pytest.raises(SiamdiffError, match="RGB"):
        train(cfg)


def test_eight_bit_adamw_trains_keeps_uint8_moments_and_resumes_exactly(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pytest.importorskip("bitsandbytes")
    overrides = ("optim.name=adamw8bit", "train.checkpoint_every=2", "train.sample_every=100")
    straight = tmp_path / "straight"
    train(tiny_config(phantom_data, straight, "train.max_steps=4", *overrides))
    state = torch.load(checkpoints(straight)[-1] / "optimizer.bin", weights_only=True)["state"]
    # bitsandbytes keeps tensors of 4096+ elements in 8 bits (smaller ones in fp32).
    quantised = [s["__bnb_optimizer_quant_state__"] for s in state.values()]
    assert sum(q["state1"].dtype == q["state2"].dtype == torch.uint8 for q in quantised) > 10
    assert all(r["loss"] == r["loss"] for r in read_loss_log(straight / "losses.jsonl"))

    resumed = tmp_path / "resumed"
    original = SeededAugmentation.__getitem__
    calls = {"n": 0}

    def interrupt_at_step_three(self, index):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:  # the batch of step 3 is loading
            raise KeyboardInterrupt
        return original(self, index)

    with monkeypatch.context() as patch:
        patch.setattr(SeededAugmentation, "__getitem__", interrupt_at_step_three)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(phantom_data, resumed, "train.max_steps=4", *overrides))
    assert [p.name for p in checkpoints(resumed)] == ["step-00000002"]
    train(tiny_config(phantom_data, resumed, "train.max_steps=4", *overrides), resume=True)
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)

    torch_adamw = tmp_path / "adamw"
    train(tiny_config(phantom_data, torch_adamw, "train.max_steps=4", *overrides[1:]))
    c = final_weights(torch_adamw)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another optimizer, other steps


def test_eight_bit_adamw_without_bitsandbytes_or_with_deepspeed_is_one_line(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cfg = tiny_config(phantom_data, tmp_path / "run", "optim.name=adamw8bit")
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(SiamdiffError, match="ZeRO shards the optimizer state itself"):
        build_optimizer(cfg, parameters, torch.device("cpu"), deepspeed=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(SiamdiffError, match=r"needs bitsandbytes: pip install 'siamdiff\[lowmem"):
        train(cfg)
    with pytest.raises(SiamdiffError, match=r"optim\.name must be one of adamw, adamw8bit"):
        tiny_config(phantom_data, tmp_path / "run", "optim.name=sgd")


def test_an_overflowing_gradient_skips_its_step_and_never_reaches_the_weights(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A finite loss whose gradient overflows (no GradScaler without fp16) used to be clipped
    into NaN and stepped on: every weight NaN, checkpointed with valid checksums."""
    original = Accelerator.backward
    calls = {"n": 0}

    def overflow_on_the_second(self, loss, **kwargs):
        original(self, loss, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            grads = [p.grad for p in self._models[0].parameters() if p.grad is not None]
            grads[0].fill_(float("inf"))

    monkeypatch.setattr(Accelerator, "backward", overflow_on_the_second)
    run = tmp_path / "run"
    train(tiny_config(phantom_data, run, "train.max_steps=3", "train.sample_every=100"))
    weights = final_weights(run)
    assert all(torch.isfinite(w).all() for w in weights.values())
    rows = read_loss_log(run / "losses.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sum(r["nonfinite_skipped"] for r in rows) == 1
    state = json.loads((checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert state.items() >= {"step": 3, "batches_taken": 4, "num_processes": 1}.items()


def test_a_nan_micro_batch_skips_its_whole_accumulation_window(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """grad_accum=2: a NaN in the first micro-batch of a window used to leave the step to the
    second alone; the window is now skipped whole, as a NaN skips a step without accumulation."""
    original = SiameseDiffusion.forward
    calls = {"n": 0}

    def nan_on_the_third(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(SiameseDiffusion, "forward", nan_on_the_third)
    run = tmp_path / "run"
    overrides = ("optim.grad_accum=2", "train.checkpoint_every=1", "train.keep_last=3")
    train(tiny_config(phantom_data, run, "train.max_steps=3", "train.sample_every=100", *overrides))
    taken = [
        json.loads((c / "trainer_state.json").read_text())["batches_taken"]
        for c in checkpoints(run)
    ]
    assert taken == [2, 6, 8]  # micro-batches 3-4 skipped together
    assert calls["n"] == 7  # the skipped window's second micro-batch is not even computed


def test_a_skipped_window_is_left_out_of_the_logged_losses(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The first micro-batch of a window skipped at its second was averaged into the row,
    though no step was taken on it."""
    original = SiameseDiffusion.forward
    losses: list[float] = []

    def nan_on_the_fourth(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        if len(losses) == 3:
            terms["loss"] = terms["loss"] * float("nan")
        losses.append(terms["loss"].item())
        return terms

    monkeypatch.setattr(SiameseDiffusion, "forward", nan_on_the_fourth)
    run = tmp_path / "run"
    overrides = ("optim.grad_accum=2", "train.max_steps=2", "train.log_every=2")
    train(tiny_config(phantom_data, run, "train.sample_every=100", *overrides))
    (row,) = read_loss_log(run / "losses.jsonl")
    assert len(losses) == 6 and row["nonfinite_skipped"] == 1
    stepped = [losses[i] for i in (0, 1, 4, 5)]  # the third was in the skipped window
    assert row["loss"] == pytest.approx(sum(stepped) / 4, rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA fp16 is valid")
def test_fp16_without_cuda_is_refused(phantom_data: Path, tmp_path: Path):
    """accelerate's fp16 autocast and loss scaling run on CUDA only: it trained in fp32."""
    cfg = tiny_config(phantom_data, tmp_path / "run", "train.mixed_precision=fp16")
    with pytest.raises(SiamdiffError, match="fp16 needs a CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_fp16_gradients_nan_at_every_scale_stop_the_run(
    phantom_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """fp16's loss scaler lowered its scale on every NaN gradient and the run went on skipping
    forever (its scale reaching 0). CUDA's scaler is imitated by torch's CPU one."""
    import siamdiff.train as train_module

    monkeypatch.setattr(train_module, "check_mixed_precision", lambda cfg: None)
    original_init, original_backward = Accelerator.__init__, Accelerator.backward

    def with_a_scaler(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.scaler, self.native_amp = torch.amp.GradScaler("cpu"), True

    calls = {"n": 0}

    def nan_gradients_after_the_first(self, loss, **kwargs):
        original_backward(self, loss, **kwargs)
        calls["n"] += 1
        if calls["n"] > 1:
            grads = [p.grad for p in self._models[0].parameters() if p.grad is not None]
            grads[0].fill_(float("nan"))

    monkeypatch.setattr(Accelerator, "__init__", with_a_scaler)
    monkeypatch.setattr(Accelerator, "backward", nan_gradients_after_the_first)
    overrides = ("train.mixed_precision=fp16", "train.max_nonfinite=3", "train.max_steps=5")
    cfg = tiny_config(phantom_data, tmp_path / "run", "train.sample_every=100", *overrides)
    AcceleratorState._reset_state()  # one process's state holds one mixed precision
    try:
        with pytest.raises(SiamdiffError, match="NaN/Inf in 3 steps in a row at step 1"):
            train(cfg)
    finally:
        AcceleratorState._reset_state()
    # One step, 17 halvings of the scale from 2**16 to below 1, then 3 counted.
    assert calls["n"] == 1 + 16 + 3


def test_sample_grids_do_not_change_the_training(phantom_data: Path, tmp_path: Path):
    """With dropout, a grid drawn in train mode used dropout and the training RNG: how often
    grids are drawn (which a resume may change) changed the weights."""
    overrides = ("train.max_steps=3", "backbone.unet.dropout=0.1")
    train(tiny_config(phantom_data, tmp_path / "rare", *overrides, "train.sample_every=100"))
    train(tiny_config(phantom_data, tmp_path / "often", *overrides, "train.sample_every=1"))
    a, b = final_weights(tmp_path / "rare"), final_weights(tmp_path / "often")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "often" / "samples").glob("*.png"))) == 3


def test_a_resumed_run_replaces_its_tensorboard_rows_past_the_checkpoint(
    phantom_data: Path, tmp_path: Path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    overrides = ("train.max_steps=3", "train.checkpoint_every=2", "train.sample_every=100")
    train(tiny_config(phantom_data, run, *overrides))
    shutil.rmtree(checkpoints(run)[-1])  # killed after logging step 3, before its checkpoint
    train(tiny_config(phantom_data, run, *overrides), resume=True)
    events = EventAccumulator(str(run / "tb" / "siamdiff"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/loss")] == [1, 2, 3]  # step 3 once
    for checkpoint in checkpoints(run):  # killed before its first checkpoint: from step 0
        shutil.rmtree(checkpoint)
    train(tiny_config(phantom_data, run, *overrides), resume=True)
    events = EventAccumulator(str(run / "tb" / "siamdiff"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/loss")] == [1, 2, 3]


def test_the_preview_grid_spreads_over_the_split() -> None:
    """Records are sorted by id, so the first few are consecutive frames of one video."""
    assert preview_pairs(list(range(10)), 4).indices == [0, 3, 6, 9]
    assert preview_pairs(list(range(3)), 4).indices == [0, 1, 2]


def test_a_run_resumed_on_other_ranks_goes_on_at_the_same_epoch_and_global_batch() -> None:
    """100 frames in batches of 4: 25 global batches an epoch on 1 rank, 24 on 2 and 4 ranks
    (6 and 12 each). Scaling the batches taken by the ratio of ranks drifted a batch an epoch."""

    def sampler(ranks: int) -> BalancedBatchSampler:
        return BalancedBatchSampler([0.1] * 50 + [0.5] * 50, 4, num_replicas=ranks)

    def state(taken: int, ranks: int) -> dict:
        return {"step": taken, "batches_taken": taken, "num_processes": ranks}

    assert resumed_batches(state(250, 1), 1, sampler(2)) == 10 * 12  # epoch 10, its 1st batch
    assert resumed_batches(state(13, 4), 1, sampler(1)) == 2 * 25 + 4  # epoch 2, 4th batch
    assert resumed_batches(state(31, 2), 1, sampler(4)) == 2 * 6 + 3  # epoch 2, batch 14 / 4
    # The 25th batch of a 1-rank epoch has no 2-rank counterpart: the next epoch begins.
    assert resumed_batches(state(24, 1), 1, sampler(2)) == 12
    assert resumed_batches(state(7, 2), 1, sampler(2)) == 7
    assert resumed_batches({"step": 6}, 2, sampler(3)) == 12  # older checkpoints: step x accum


def test_a_torchrun_launch_is_told_to_allow_a_checkpoint_time_after_a_stop(
    monkeypatch: pytest.MonkeyPatch,
):
    from torch.distributed.launcher.api import LaunchConfig

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launcher_grace_note(2) is None  # not launched by torchrun: no launcher kills it
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launcher_grace_note(1) is None
    assert launcher_grace_note(2).endswith(
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 in the environment (or torchrun --shutdown-timeout 600)"
    )
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    assert launcher_grace_note(2) is None
    # A torch whose launcher has its grace fixed at 30 s: nothing to set, said so.
    fields = {k: v for k, v in LaunchConfig.__dataclass_fields__.items() if k != "shutdown_timeout"}
    monkeypatch.setattr(LaunchConfig, "__dataclass_fields__", fields)
    assert "this torch cannot be told to wait longer" in launcher_grace_note(2)
