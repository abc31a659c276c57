"""The gate's rules (verify.Gate, verify.measure) on logits made to order: one rule set for the
quantizer before it publishes and for `moegi-quantize verify`."""

from __future__ import annotations

import torch

from quantize import verify


def _logits(seed: int, tokens: int = 400, vocab: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, vocab, generator=g) * 3]


def _perturbed(reference: list[torch.Tensor], scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [r + scale * torch.randn(r.shape, generator=g) for r in reference]


def test_equal_to_round_to_nearest_passes_and_has_no_noise() -> None:
    ref = _logits(0)
    rtn = _perturbed(ref, 0.2, 1)
    gate = verify.measure(ref, rtn, rtn)
    assert gate.kl == gate.rtn_kl and gate.noise == 0.0
    assert gate.verdict() == verify.PASS  # moegi's own --method rtn checkpoint


def test_a_difference_within_the_noise_is_not_worse() -> None:
    ref = _logits(0)
    rtn, ckpt = _perturbed(ref, 0.2, 1), _perturbed(ref, 0.2, 2)  # same error, other draws
    gate = verify.measure(ref, ckpt, rtn)
    assert gate.noise > 0 and abs(gate.kl - gate.rtn_kl) < verify.WORSE_SIGMAS * gate.noise
    assert gate.verdict() == verify.PASS, gate.figures()


def test_clearly_worse_is_worse_and_far_worse_is_broken() -> None:
    ref = _logits(0)
    rtn = _perturbed(ref, 0.2, 1)
    worse = verify.measure(ref, _perturbed(ref, 0.25, 2), rtn)
    assert 1 < worse.kl / worse.rtn_kl < verify.BROKEN_FACTOR
    assert worse.kl - worse.rtn_kl > verify.WORSE_SIGMAS * worse.noise
    assert worse.verdict() == verify.WORSE and "standard errors" in worse.explain()
    assert not worse.publishable(False) and worse.publishable(True)
    broken = verify.measure(ref, _perturbed(ref, 0.6, 2), rtn)
    assert broken.verdict() == verify.BROKEN and not broken.publishable(True)


def test_better_than_round_to_nearest_but_past_the_limit_is_sensitive() -> None:
    ref = _logits(0)
    gate = verify.measure(ref, _perturbed(ref, 0.8, 2), _perturbed(ref, 1.2, 1))
    assert gate.kl < gate.rtn_kl and gate.kl > verify.MAX_MEAN_KL
    assert gate.verdict() == verify.SENSITIVE and "sensitive" in gate.explain()
