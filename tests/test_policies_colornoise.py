"""ColorMAE noise masking: exact counts, spectra of the colours, determinism, noise banks, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from policy_checks import check_determinism

from maskkit.noise_bank import main
from maskkit.plan import MaskPlan, num_visible
from maskkit.policies import get_policy_class
from maskkit.policies.colornoise import (
    COLORS,
    ColorNoisePolicy,
    color_filter,
    load_noise_bank,
    make_noise_bank,
)
from maskkit.policies.random import RandomPolicy

# tiny tensors: one torch thread is much faster than several contending ones on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 14


def radial_power(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Radially averaged power spectrum of masks [M, N]: mean |FFT2(mask - mean)|^2 per integer radius."""
    m = mask.reshape(-1, side, side).double()
    m = m - m.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(m).abs().pow(2).mean(dim=0)  # [S, S]
    k = torch.fft.fftfreq(side, dtype=torch.float64) * side
    radius = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round().long().reshape(-1)
    total = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(0, radius, power.reshape(-1))
    count = torch.zeros_like(total).index_add_(0, radius, torch.ones_like(power.reshape(-1)))
    return total / count  # [R]; R = 11 at side 14 (radius 0 .. 10)


def peaks_at_mid_frequencies(profile: torch.Tensor) -> bool:
    """Power peaks at radius 2..5 of 0..10, at least 1.5x both the lowest (1) and the highest (>= 8) bands."""
    mid = profile[2:6].max()
    ends = torch.maximum(profile[1], profile[8:].mean())
    return bool(profile[1:].argmax() + 1 in range(2, 6)) and bool(mid > 1.5 * ends)


@pytest.fixture(scope="module")
def profiles() -> dict[str, torch.Tensor]:
    tokens = torch.zeros(500, SIDE * SIDE, 1)
    out = {
        "random": radial_power(
            RandomPolicy(0.75)(tokens, generator=torch.Generator().manual_seed(0)).mask, SIDE
        )
    }
    for color in ("green", "red", "blue", "purple"):
        plan = ColorNoisePolicy(0.75, color=color)(tokens, generator=torch.Generator().manual_seed(0))
        out[color] = radial_power(plan.mask, SIDE)
    return out


def test_green_masks_peak_at_mid_frequencies_and_random_masks_do_not(profiles):
    assert peaks_at_mid_frequencies(profiles["green"])
    assert not peaks_at_mid_frequencies(profiles["random"])
    flat = profiles["random"][1:]
    assert flat.max() < 1.15 * flat.min()  # white: flat spectrum


def test_other_colours_have_their_spectral_shape(profiles):
    red, blue, purple = profiles["red"], profiles["blue"], profiles["purple"]
    assert red[1:].argmax() == 0 and red[1] > 5 * red[4:].mean()  # low-pass
    assert blue[1:].argmax() >= 8 and blue[8:].mean() > 2 * blue[1:3].mean()  # high-pass
    assert purple[2:6].mean() < 0.7 * min(purple[1], purple[8:].mean())  # band-stop
    for color in ("red", "blue", "purple"):
        assert not peaks_at_mid_frequencies(profiles[color])


def test_filters_are_the_documented_transfer_functions():
    fine, coarse = color_filter("white", SIDE), color_filter("red", SIDE)
    assert torch.equal(fine, torch.ones(SIDE, SIDE)) and coarse[0, 0] == 1.0
    green = color_filter("green", SIDE)
    assert torch.allclose(green + color_filter("purple", SIDE), torch.ones_like(green))
    assert torch.allclose(
        color_filter("red", SIDE) + color_filter("blue", SIDE), color_filter("purple", SIDE)
    )
    assert green[0, 0] == 0.0 and green.max() > 0.7


@pytest.mark.parametrize("color", COLORS)
@pytest.mark.parametrize("n,ratio", [(196, 0.75), (64, 0.6), (49, 0.9)])
def test_exact_hidden_count(color, n, ratio):
    plan = ColorNoisePolicy(ratio, color=color)(
        torch.zeros(8, n, 1), generator=torch.Generator().manual_seed(0)
    )
    assert plan.mask.sum(dim=1).tolist() == [float(n - num_visible(n, ratio))] * 8
    assert plan.mask.dtype == torch.get_default_dtype()


def test_noise_and_generator_determinism():
    tokens = torch.zeros(4, 196, 2)
    policy = ColorNoisePolicy()
    noise = torch.rand(4, 196, generator=torch.Generator().manual_seed(0))
    a, c = check_determinism(policy, tokens, noise, seed=3)
    assert torch.equal(
        c.mask, policy(tokens, noise=torch.rand(4, 196, generator=torch.Generator().manual_seed(3))).mask
    )
    # white noise is random masking
    w = ColorNoisePolicy(color="white")(tokens, noise=noise)
    r = RandomPolicy()(tokens, noise=noise)
    assert torch.equal(w.mask, r.mask) and torch.equal(w.ids_keep, r.ids_keep)
    with pytest.raises(ValueError, match=r"noise must have shape \(4, 196\)"):
        policy(tokens, noise=torch.rand(4, 195))


def test_noise_bank_round_trip(tmp_path):
    bank = make_noise_bank("green", 16, 32, seed=1)
    assert bank.shape == (32, 16, 16) and bank.dtype == torch.float32
    assert torch.equal(bank, make_noise_bank("green", 16, 32, seed=1))
    assert not torch.equal(bank, make_noise_bank("green", 16, 32, seed=2))

    out = tmp_path / "bank.pt"
    assert main(["--color", "green", "--grid", "16", "--count", "32", "--seed", "1", "--out", str(out)]) == 0
    assert torch.equal(load_noise_bank(str(out), "green"), bank)

    policy = ColorNoisePolicy(0.75, bank=str(out))
    assert "bank" not in policy.state_dict()
    tokens = torch.zeros(6, 196, 1)  # a 14x14 grid cropped from 16x16 patterns
    a = policy(tokens, generator=torch.Generator().manual_seed(0))
    b = policy(tokens, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.mask, b.mask) and a.mask.sum(dim=1).tolist() == [147.0] * 6
    noise = torch.rand(6, 196, generator=torch.Generator().manual_seed(1))
    assert torch.equal(policy(tokens, noise=noise).mask, policy(tokens, noise=noise.clone()).mask)
    # with draws (pattern 0, no shift, identity symmetry) the mask thresholds pattern 0's top-left crop
    noise[:, :4] = 0.0
    crop = bank[0, :14, :14].reshape(1, 196).expand(6, -1).contiguous()
    assert torch.equal(policy(tokens, noise=noise).mask, MaskPlan.from_scores(crop, 0.75).mask)
    # a quarter-turn symmetry (transpose, draw 0.5 -> 4) thresholds the transposed crop
    noise[:, 3] = 0.5
    crop_t = bank[0, :14, :14].t().reshape(1, 196).expand(6, -1).contiguous()
    assert torch.equal(policy(tokens, noise=noise).mask, MaskPlan.from_scores(crop_t, 0.75).mask)

    # a bare tensor works too; a bank of another colour or a too-small grid is refused
    torch.save(bank, tmp_path / "bare.pt")
    assert ColorNoisePolicy(bank=str(tmp_path / "bare.pt")).bank.shape == (32, 16, 16)
    with pytest.raises(ValueError, match="holds 'green' noise but the policy's color is 'red'"):
        ColorNoisePolicy(color="red", bank=str(out))
    with pytest.raises(ValueError, match="smaller than the 18x18 patch grid"):
        policy(torch.zeros(1, 324, 1))


@pytest.mark.slow
def test_noise_bank_command_runs_as_a_module(tmp_path):
    # the documented command, in a fresh interpreter: the bank it writes is make_noise_bank's
    out = tmp_path / "bank.pt"
    cmd = [sys.executable, "-m", "maskkit.noise_bank", "--color", "blue", "--grid", "6", "--count", "3",
           "--seed", "4", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"saved 3 blue noise patterns of 6x6 to {out}"
    saved = torch.load(out, weights_only=True)
    assert (saved["color"], saved["grid"], saved["seed"]) == ("blue", 6, 4)
    assert torch.equal(load_noise_bank(str(out), "blue"), make_noise_bank("blue", 6, 3, seed=4))
    assert get_policy_class("colornoise") is ColorNoisePolicy


def test_noise_bank_command_bad_input(tmp_path, capsys):
    out = tmp_path / "bank.pt"
    assert main(["--count", "0", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == "Error: count must be a positive integer, got 0"
    assert main(["--sigma-fine", "2", "--sigma-coarse", "1", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip().startswith("Error: sigma_coarse (1.0) must exceed sigma_fine")
    with pytest.raises(SystemExit) as stop:
        main(["--color", "pink", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("Error: argument --color: invalid choice")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--count", "2", "--grid", "4", "--out", str(blocker / "bank.pt")]) == 1
    assert capsys.readouterr().err.startswith(f"Error: cannot write noise bank {blocker / 'bank.pt'}")
    assert not out.exists()


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="noise color must be one of"):
        ColorNoisePolicy(color="pink")
    with pytest.raises(ValueError, match="sigma_coarse .* must exceed sigma_fine"):
        ColorNoisePolicy(sigma_fine=2.0, sigma_coarse=1.0)
    with pytest.raises(ValueError, match="sigma_fine must be a positive number"):
        ColorNoisePolicy(sigma_fine=0.0)
    with pytest.raises(ValueError, match="cannot read noise bank"):
        ColorNoisePolicy(bank=str(tmp_path / "missing.pt"))
    torch.save(torch.zeros(3, 4, 5), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"must hold patterns of shape \[count, S, S\]"):
        ColorNoisePolicy(bank=str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="noise color must be one of"):
        make_noise_bank("pink", 14, 4, 0)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        make_noise_bank("green", 14, 0, 0)
    with pytest.raises(ValueError, match="N = 12 is not a square"):
        ColorNoisePolicy()(torch.zeros(1, 12, 1))
