"""Training under faults: SIGKILL, damaged checkpoints, a full disk, NaN losses."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from siamdiff import cli
from siamdiff.atomic import exclusive_writer
from siamdiff.errors import SiamdiffError
from siamdiff.models.siamese import SiameseDiffusion
from siamdiff.report import read_loss_log
from siamdiff.train import (
    CHECKSUMS_NAME,
    SeededAugmentation,
    checkpoint_digests,
    checkpoint_problem,
    checkpoints,
    train,
)
from tests.fault.helpers import (
    TINY_OVERRIDES,
    error_line,
    fail_fsync,
    kill_when,
    run_ok,
    train_command,
)
from tests.helpers import tiny_config

STEPS = 10
OVERRIDES = (
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=1",
    "train.keep_last=3",
    "train.sample_every=100",
)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_sigkill_twice_then_resume_gives_bit_identical_weights(phantom_data: Path, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(phantom_data, straight, *OVERRIDES))

    run = tmp_path / "killed"
    command = train_command(phantom_data, run, *OVERRIDES)
    kill_when(command, lambda: len(checkpoints(run)) >= 1)
    kill_when([*command, "--resume"], lambda: len(checkpoints(run)) >= 3)
    assert len(checkpoints(run)) >= 3 and checkpoints(run)[-1].name < f"step-{STEPS:08d}"
    # What a kill inside save_state leaves, here with garbage weights: never to be loaded.
    bogus = run / "checkpoints" / f"step-{STEPS - 1:08d}.partial"
    bogus.mkdir(exist_ok=True)
    (bogus / "model.safetensors").write_bytes(b"garbage")
    run_ok([*command, "--resume"])

    a, b = weights(checkpoints(straight)[-1]), weights(checkpoints(run)[-1])
    assert checkpoints(run)[-1].name == f"step-{STEPS:08d}"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [row["step"] for row in read_loss_log(run / "losses.jsonl")] == list(range(1, STEPS + 1))


def test_damaged_newest_checkpoint_is_skipped_for_the_previous_one(
    phantom_data: Path, tmp_path, capsys
):
    run = tmp_path / "run"
    cfg = tiny_config(phantom_data, run, "train.max_steps=3", "train.checkpoint_every=1")
    train(cfg)
    newest = checkpoints(run)[-1]
    original = (newest / "model.safetensors").read_bytes()
    flip_byte(newest / "model.safetensors")
    assert "model.safetensors" in checkpoint_problem(newest)

    train(cfg, resume=True)
    assert "checksum mismatch in model.safetensors" in capsys.readouterr().err
    # Step 3 was recomputed from step 2: the same bytes as before the damage.
    assert (newest / "model.safetensors").read_bytes() == original
    assert checkpoint_problem(newest) is None
    # The damaged one is set aside, not deleted: a passing read error may have failed it.
    aside = newest.with_name("step-00000003.damaged")
    assert (aside / "model.safetensors").read_bytes() != original


def test_a_checksum_file_that_is_no_mapping_or_no_text_damages_its_checkpoint(
    tmp_path: Path,
) -> None:
    checkpoint = tmp_path / "step-00000004"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    for written, problem in (
        (b"[]", "checksums.json is not a mapping of files to digests"),
        (b"\xff\xfe{}", "no readable checksums.json (UnicodeDecodeError)"),
        (b"{", "no readable checksums.json (JSONDecodeError)"),
    ):
        (checkpoint / "checksums.json").write_bytes(written)
        assert checkpoint_problem(checkpoint) == problem


def test_damaged_checkpoints_past_the_resumed_one_never_count_as_kept(
    phantom_data: Path, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys
):
    run = tmp_path / "run"
    every_other = ("train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=100")
    train(tiny_config(phantom_data, run, *every_other, "train.keep_last=2"))
    flip_byte(checkpoints(run)[-1] / "model.safetensors")  # step 4 damaged
    calls = {"n": 0}
    original = SeededAugmentation.__getitem__

    def stop_while_step_four_loads(self, index):
        calls["n"] += 1
        if calls["n"] == 2 + 1:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(SeededAugmentation, "__getitem__", stop_while_step_four_loads)
    keep_one = tiny_config(
        phantom_data, run, *every_other, "train.checkpoint_every=1", "train.keep_last=1"
    )
    with pytest.raises(KeyboardInterrupt):
        train(keep_one, resume=True)
    assert ": skipped, damaged: " in capsys.readouterr().err
    # Step 3's checkpoint is the one kept, not the damaged step 4 it would have counted after.
    assert [p.name for p in checkpoints(run)] == ["step-00000003"]
    assert checkpoint_problem(checkpoints(run)[0]) is None


def test_a_second_trainer_on_the_same_run_is_refused(phantom_data: Path, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = (f"data.root={phantom_data}", f"run_dir={run}", *TINY_OVERRIDES)
    overrides += ("train.max_steps=1", "train.sample_every=100")
    with exclusive_writer(run, 0, "siamdiff train"):  # as a first job still running would
        assert cli.main(["train", "tiny", *overrides, "--resume"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "another `siamdiff train` is writing here" in err and str(run) in err
    assert not run.exists()  # nothing written
    assert cli.main(["train", "tiny", *overrides, "--resume"]) == 0  # once it is gone


def test_resume_without_a_valid_checkpoint_is_a_one_line_error(
    phantom_data: Path, tmp_path, capsys
):
    run = tmp_path / "run"
    overrides = (f"data.root={phantom_data}", f"run_dir={run}", *TINY_OVERRIDES)
    overrides += ("train.max_steps=2", "train.checkpoint_every=1", "train.sample_every=100")
    assert cli.main(["train", "tiny", *overrides]) == 0
    flip_byte(checkpoints(run)[0] / "optimizer.bin")
    (checkpoints(run)[1] / CHECKSUMS_NAME).unlink()
    capsys.readouterr()

    assert cli.main(["train", "tiny", *overrides, "--resume"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "no checkpoint passes its checksums" in err and str(run / "checkpoints") in err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_checkpoint_write_failure_is_one_line_and_keeps_the_previous_checkpoint(
    phantom_data: Path, tmp_path, capsys, monkeypatch, code
):
    run = tmp_path / "run"
    overrides = (f"data.root={phantom_data}", f"run_dir={run}", *TINY_OVERRIDES)
    overrides += ("train.max_steps=3", "train.checkpoint_every=1", "train.sample_every=100")
    fail_fsync(monkeypatch, "step-00000002.partial", code=code)

    assert cli.main(["train", "tiny", *overrides]) == 2
    err = error_line(capsys.readouterr().err)
    assert "step-00000002.partial/trainer_state.json" in err and os.strerror(code) in err
    assert [p.name for p in checkpoints(run)] == ["step-00000001"]
    assert checkpoint_problem(checkpoints(run)[0]) is None

    monkeypatch.undo()
    assert cli.main(["train", "tiny", *overrides, "--resume"]) == 0
    assert [p.name for p in checkpoints(run)][-1] == "step-00000003"


def nan_on_calls(monkeypatch: pytest.MonkeyPatch, bad: set[int] | None) -> None:
    """The model's loss is NaN on the forward calls in ``bad`` (every call after the first
    when ``bad`` is None); the other terms stay as computed."""
    original = SiameseDiffusion.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls[0] += 1
        if (calls[0] > 1) if bad is None else (calls[0] in bad):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(SiameseDiffusion, "forward", forward)


def all_finite(checkpoint: Path) -> bool:
    return all(torch.isfinite(t).all() for t in weights(checkpoint).values())


def test_nonfinite_losses_are_skipped_and_counted(phantom_data: Path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_on_calls(monkeypatch, {2, 3, 5})
    cfg = tiny_config(
        phantom_data, run, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=4"
    )
    train(cfg)
    rows = read_loss_log(run / "losses.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 2, 1, 0]
    assert len(checkpoints(run)) == 4 and all(all_finite(c) for c in checkpoints(run))


def test_resume_after_skipped_steps_takes_the_next_batch_not_a_used_one(
    phantom_data: Path, tmp_path, monkeypatch
):
    overrides = ("train.max_steps=4", "train.checkpoint_every=1", "train.keep_last=4")
    straight = tmp_path / "straight"
    nan_on_calls(monkeypatch, {2, 3})  # step 2 comes from the 4th batch
    train(tiny_config(phantom_data, straight, *overrides))
    monkeypatch.undo()
    resumed = Path(shutil.copytree(straight, tmp_path / "resumed"))
    for later in checkpoints(resumed)[2:]:
        shutil.rmtree(later)
    train(tiny_config(phantom_data, resumed, *overrides), resume=True)
    a, b = weights(checkpoints(straight)[-1]), weights(checkpoints(resumed)[-1])
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_nonfinite_losses_in_a_row_stop_the_run(phantom_data: Path, tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_on_calls(monkeypatch, None)
    cfg = tiny_config(
        phantom_data, run, "train.max_steps=4", "train.checkpoint_every=1", "train.max_nonfinite=3"
    )
    with pytest.raises(SiamdiffError, match="NaN/Inf in 3 steps in a row at step 1") as caught:
        train(cfg)
    assert "\n" not in str(caught.value)
    assert [p.name for p in checkpoints(run)] == ["step-00000001"]
    assert all_finite(checkpoints(run)[0])


class _Payload:
    """Unpickling this would run a command: a checkpoint from a hostile source."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/siamdiff-pwned",))


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(phantom_data: Path, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = (f"data.root={phantom_data}", f"run_dir={run}", *TINY_OVERRIDES)
    overrides += ("train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=100")
    assert cli.main(["train", "tiny", *overrides]) == 0
    last = checkpoints(run)[-1]
    torch.save({"state": _Payload()}, last / "optimizer.bin")
    # Even with matching checksums (an attacker can recompute them), nothing executes.
    (last / CHECKSUMS_NAME).write_text(json.dumps(checkpoint_digests(last)))
    Path("/tmp/siamdiff-pwned").unlink(missing_ok=True)
    capsys.readouterr()

    assert cli.main(["train", "tiny", *overrides, "train.max_steps=3", "--resume"]) == 2
    assert not Path("/tmp/siamdiff-pwned").exists()
    assert "cannot resume from this checkpoint" in error_line(capsys.readouterr().err)
