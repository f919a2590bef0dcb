"""Fixtures shared by the synthetic-world tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def interrupt_pretraining(monkeypatch) -> Callable[[int], Callable[[], None]]:
    """interrupt(n) makes CLIP pretraining raise KeyboardInterrupt (Ctrl-C) at its n-th optimizer
    step from now; calling what it returns puts the real step back."""
    from clipcount.synthetic import pretrain

    def interrupt(n: int) -> Callable[[], None]:
        real_step, calls = pretrain._step, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_step(*args, **kwargs)

        monkeypatch.setattr(pretrain, "_step", interrupted)
        return lambda: monkeypatch.setattr(pretrain, "_step", real_step)

    return interrupt
