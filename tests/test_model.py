"""Model loading decisions that need no model: the precision warning."""

import pytest

from cram_sweep.engine import model


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_bf16_warns_once_with_the_alternative(monkeypatch, fast_bf16):
    monkeypatch.setattr(model, "has_fast_bf16", lambda device: fast_bf16)
    warning = model.slow_bf16_warning("bf16", "cpu")
    if fast_bf16:
        assert warning is None
    else:
        assert "25x slower" in warning and "precision=auto or fp32" in warning and "\n" not in warning
    assert model.slow_bf16_warning("fp32", "cpu") is None
