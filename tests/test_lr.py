"""bb.scale_lr: the linear and square-root rules, and the errors that name the fix."""

import pytest

import bigbatch as bb


def test_scale_lr():
    assert bb.scale_lr(0.1, 256, 1024) == pytest.approx(0.4)
    assert bb.scale_lr(0.1, 256, 1024, rule="sqrt") == pytest.approx(0.2)
    with pytest.raises(bb.ConfigError, match="rule must be"):
        bb.scale_lr(0.1, 1, 2, rule="cubic")
    with pytest.raises(bb.ConfigError, match="from_batch must be an integer >= 1, got 0"):
        bb.scale_lr(0.1, 0, 2)
