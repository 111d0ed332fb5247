"""The benchmark harness: a CPU smoke run of every measurement, and the SD1.5 FLOP target."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch

from siamdiff import bench
from siamdiff.bench import main, meta_flops, naive_sample, results_path


def test_tiny_cpu_run_measures_both_implementations_and_they_agree(tmp_path: Path, capsys) -> None:
    argv = ["--preset", "tiny", "--device", "cpu", "--train-batches", "4", "--sample-batches", "2"]
    argv += ["--sample-steps", "3", "--iters", "1", "--warmup", "0", "--no-meta"]
    argv += ["--speed", "channels_last", "--gradient-checkpointing"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu-*.json")
    results = json.loads(path.read_text())
    variants = ["naive", "siamdiff", "siamdiff+channels_last"]
    checkpointed = "siamdiff+channels_last+gradient_checkpointing"
    assert results["variants"] == [*variants, checkpointed]
    assert results["speed_levers"] == ["channels_last"]
    (train,) = results["training"]
    assert results["equivalence_tolerance"] == {"step": 1e-4, "image": 1e-3}
    for name in [*variants[1:], checkpointed]:
        # Same loss, gradients and eps: siamdiff's shared-encoder step is the naive step, minus
        # work.
        assert train[name]["loss_relative_difference"] < 1e-5
        assert train[name]["grad_relative_difference"] < 1e-4
        assert train[name]["eps_relative_difference"] < 1e-5
        assert train[name]["within_tolerance"] is True
    assert train["flop_ratio"] < 0.8  # t = 0, 333, 666, 999: one sample in the augmentation term
    for name in variants:
        assert train[name]["images_per_s"] > 0 and train[name]["flops_per_step"] > 0
    (sampling,) = results["sampling"]
    for name in variants[1:]:
        assert sampling[name]["image_max_abs_difference"] < 1e-3
        assert sampling[name]["image_relative_difference"] < 1e-3
        assert sampling[name]["within_tolerance"] is True
    assert checkpointed not in sampling  # sampling keeps no activations to recompute
    printed = capsys.readouterr().out
    assert "siamdiff+channels_last" in printed and "speedup" in printed
    assert "OVER TOLERANCE" not in printed and printed.count("  ok") == 3 + 2


def test_a_branch_that_computes_something_else_is_over_tolerance(tmp_path: Path, monkeypatch):
    """Each branch's eps is compared with the naive step's and judged against the tolerance:
    an image branch 1 % off is flagged in the results and the table."""
    branches = bench.SiameseDiffusion.branch_predictions

    def image_branch_off_by_a_little(self, *args):
        mask, image = branches(self, *args)
        return mask, image * 1.01

    monkeypatch.setattr(bench.SiameseDiffusion, "branch_predictions", image_branch_off_by_a_little)
    argv = ["--preset", "tiny", "--device", "cpu", "--train-batches", "2", "--sample-batches", "2"]
    argv += ["--sample-steps", "2", "--iters", "1", "--warmup", "0", "--no-meta"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu-*.json")
    (train,) = json.loads(path.read_text())["training"]
    assert train["siamdiff"]["eps_relative_difference"] > 1e-3
    assert train["siamdiff"]["within_tolerance"] is False
    assert "OVER TOLERANCE" in path.with_suffix(".md").read_text()


def test_checkpointing_is_measured_before_compile_and_off_for_it() -> None:
    """Last, after compile, a time-boxed GPU run would likely never reach it."""
    plan = bench.variant_plan(("channels_last", "compile"), checkpointing=True)
    assert plan == [
        ("naive", ()),
        ("siamdiff", ()),
        ("siamdiff+channels_last", ("channels_last",)),
        ("siamdiff+channels_last+gradient_checkpointing", ("gradient_checkpointing",)),
        ("siamdiff+channels_last+compile", ("compile",)),
    ]


def test_committed_results_render() -> None:
    """Results of every version render (older ones lack later fields)."""
    for path in sorted((Path(__file__).parents[1] / "bench" / "results").glob("*.json")):
        text = bench.format_results(json.loads(path.read_text()))
        assert text.startswith("siamdiff bench: ") and "sampling (DDIM)" in text, path


def test_a_cut_short_run_keeps_the_variants_it_measured(tmp_path: Path, monkeypatch) -> None:
    measure = bench.bench_sampling

    def interrupted_after_naive(b, row, variant, reference):
        if variant != "naive":
            raise KeyboardInterrupt  # the time box's SIGINT
        return measure(b, row, variant, reference)

    monkeypatch.setattr(bench, "bench_sampling", interrupted_after_naive)
    argv = ["--preset", "tiny", "--device", "cpu", "--train-batches", "2", "--sample-batches", "2"]
    argv += ["--sample-steps", "2", "--iters", "1", "--warmup", "0", "--no-meta"]
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(tmp_path)])
    (path,) = tmp_path.glob("cpu-*.json")
    results = json.loads(path.read_text())
    assert results["variants"] == ["naive"]
    assert results["sampling"][0]["naive"]["images_per_s"] > 0
    assert "naive" in path.with_suffix(".md").read_text()


def test_cpu_flop_counts_include_attention() -> None:
    """The same step counted while it runs on the CPU and on ``meta`` (where attention has a
    FLOP formula): equal, so CPU MFU and FLOP ratios do not leave attention out."""

    def step_flops(device: torch.device) -> int:
        model, _ = bench.build(bench.PRESETS["tiny"], device)
        b = bench.make_batch(model, bench.PRESETS["tiny"], 2, device)
        return bench.count_flops(lambda: bench.siamdiff_loss(model, b, 0.0).backward(), device)

    cpu, meta = step_flops(torch.device("cpu")), step_flops(torch.device("meta"))
    assert cpu == meta > 0


def test_relative_difference_is_the_largest_gap_over_the_largest_reference_value() -> None:
    """The bench's agreement figure: max |a - b| / max |b|, a worst case, not a best one."""
    a = torch.tensor([1.0, 3.0, -2.0])
    b = torch.tensor([1.0, 1.0, 4.0])  # gaps 0, 2, 6; largest |b| 4
    assert bench.relative_difference(a, b) == pytest.approx(6 / 4)
    # Half precision is compared in float32; an all-zero reference does not divide by zero.
    assert bench.relative_difference(a.half(), b.half()) == pytest.approx(6 / 4)
    assert bench.relative_difference(torch.zeros(2), torch.zeros(2)) == 0.0


def test_bf16_frozen_weights_are_refused_without_cuda(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--speed", "bf16_frozen"])
    assert "bf16_frozen needs bf16 autocast" in capsys.readouterr().err


def test_siamdiff_step_at_sd15_size_needs_at_most_three_quarters_of_the_naive_flops() -> None:
    counted = meta_flops(batch=8)  # ~10 s on one CPU core: shapes only, on meta
    assert counted["ratio_training_average"] <= 0.75
    # The figures docs/performance.md and bench/results/*.json give for batch 8 (2 of the 8
    # samples in the augmentation term): a change to either step's work moves them.
    assert counted["augmented_samples"] == 2
    assert counted["ratio_before_augmentation"] == pytest.approx(0.826, abs=0.005)
    assert counted["ratio_with_augmentation"] == pytest.approx(0.641, abs=0.005)
    assert counted["ratio_training_average"] == pytest.approx(0.688, abs=0.005)
    # A run averages one third before the augmentation term starts and two thirds after it.
    for step in ("naive", "siamdiff"):
        phases = counted[step]
        expected = (phases["before_augmentation"] + 2 * phases["with_augmentation"]) / 3
        assert phases["training_average"] == pytest.approx(expected)
    # The shared encoder and single mask control save work in both phases; the augmentation
    # term, run on the t <= 200 samples only, saves more once it starts.
    assert counted["ratio_with_augmentation"] < counted["ratio_before_augmentation"] < 0.9
    # ControlNet (361M with the DHI) + UNet decoder: what AdamW keeps two moments of.
    assert 0.85e9 < counted["trainable_parameters"] < 0.9e9
    state = counted["adamw_state_gb"]
    assert state["adamw"] == pytest.approx(4 * state["adamw8bit"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sample-steps", "501"], "--sample-steps must be at most 500"),
        (["--device", "gpu"], "--device gpu: "),
        (["--device", "meta"], "--device meta: the bench measures on cpu or cuda"),
        (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
        (["--out", "{file}"], "is not a folder: the output cannot be written below it"),
    ],
)
def test_bad_input_is_refused_before_measuring(
    args: list[str], message: str, tmp_path: Path, capsys
) -> None:
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(file=tmp_path / "file") for a in args]
    with pytest.raises(SystemExit):
        main(["--device", "cpu", *args] if "--device" not in args else args)
    assert message in capsys.readouterr().err


def test_a_second_run_on_one_day_keeps_the_first_results(tmp_path: Path) -> None:
    first = results_path(tmp_path, "cpu x86", "2026-12-01")
    first.write_text("{}")
    second = results_path(tmp_path, "cpu x86", "2026-12-01")
    assert (first.name, second.name) == ("cpu-x86-2026-12-01.json", "cpu-x86-2026-12-01-2.json")


def test_naive_sampling_skips_the_unconditional_pass_at_guidance_1() -> None:
    """As the authors' sampler and ddim_sample do: else the speed-up doubles at guidance 1."""
    calls = []

    class Model:
        def predict_mask(self, latents, t, cond, hint):
            calls.append(cond)
            return torch.zeros_like(latents)

    model = Model()
    with patch("siamdiff.bench.make_scheduler", return_value=_OneStep()):
        naive_sample(model, torch.zeros(1), "cond", "uncond", torch.zeros(1, 4, 2, 2), 1, 1.0)
        assert calls == ["cond"]
        naive_sample(model, torch.zeros(1), "cond", "uncond", torch.zeros(1, 4, 2, 2), 1, 9.0)
        assert calls == ["cond", "cond", "uncond"]


class _OneStep:
    init_noise_sigma = 1.0
    timesteps = torch.tensor([999])

    def set_timesteps(self, steps: int, device: object = None) -> None:
        pass

    def step(self, guided: torch.Tensor, t: torch.Tensor, latents: torch.Tensor):
        return SimpleNamespace(prev_sample=latents)
