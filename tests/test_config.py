"""The shared configuration (lightning_decor.config): one frozen, keyword-only object, checked once, read by both
front-ends and the engine."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from lightning_decor import DecorrelationCallback, Decorrelator
from lightning_decor.config import DEFAULTS, PLAN_ARGUMENTS, DecorConfig

from conftest import TinyModule, quiet_trainer


def test_the_configuration_is_frozen_keyword_only_and_checked_when_made() -> None:
    config = DecorConfig(decor_lr=1e-3, include=["net.*"])
    assert config.decor_lr == 1e-3 and config.include == ("net.*",)  # patterns kept as a tuple: nothing mutable
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.decor_lr = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        DecorConfig(1e-3)  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"Expected `sample_fraction` in \(0, 1\], but got 0"):
        DecorConfig(sample_fraction=0)
    with pytest.raises(TypeError, match=r"Expected `include` to be a list of name patterns \(str\), but got 'net'"):
        DecorConfig(include="net")  # type: ignore[arg-type]
    assert DEFAULTS == {f.name: f.default for f in dataclasses.fields(DecorConfig)}
    assert set(PLAN_ARGUMENTS) < set(DEFAULTS)


def test_both_front_ends_build_it_by_name_and_share_it_with_the_engine(tmp_path) -> None:
    dec = Decorrelator(nn.Linear(4, 4), decor_lr=1e-3, kappa=0.25)
    assert dec.config == DecorConfig(decor_lr=1e-3, kappa=0.25) and dec.decor_lr == 1e-3
    with pytest.raises(AttributeError):
        dec.decor_lr = 0.1  # type: ignore[misc]  # one copy: read-only on the front-end

    cb = DecorrelationCallback(decor_lr=0.02, max_overhead=None, fold_on_fit_end=False)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[cb]).fit(TinyModule())
    assert cb.engine is not None and cb.engine.config is cb.config  # the callback's object, not a copy
    assert cb.decor_lr == cb.engine.decor_lr == 0.02
    with pytest.raises(AttributeError):
        cb.decor_lr = 0.1  # type: ignore[misc]


def test_a_resume_is_refused_when_an_argument_that_shaped_the_plan_differs() -> None:
    saved = DecorConfig(max_overhead=0.1, include=["net.*"]).plan_arguments(None)
    assert saved["include"] == ["net.*"] and saved["plan"] == "auto"  # as checkpoints keep it
    DecorConfig(max_overhead=0.1, include=["net.*"], decor_lr=0.5).check_resume(saved, None)
    with pytest.raises(ValueError, match=r"`max_overhead` is 0.2 here and was 0.1 in the checkpoint"):
        DecorConfig(max_overhead=0.2, include=["net.*"]).check_resume(saved, None)
    with pytest.raises(ValueError, match=r"`plan` is a pinned plan here and was 'auto' in the checkpoint"):
        DecorConfig(max_overhead=0.1, include=["net.*"]).check_resume(saved, {"0": [4, "fused"]})


def test_the_memory_budget_is_checked_and_a_checkpoint_from_before_it_resumes() -> None:
    with pytest.raises(ValueError, match=r"Expected `max_memory` to be a finite number > 0, but got -1"):
        DecorConfig(max_memory=-1)
    assert DecorConfig(max_memory=None).memory_budget(10**12) is None
    assert DecorConfig(max_memory=2.0).memory_budget(10**12) == 2 * 10**12
    assert DecorConfig(max_memory=2.0).memory_budget(1000) == 2**30  # at least 1 GiB: small models keep a dense R
    older = {k: v for k, v in DecorConfig().plan_arguments(None).items() if k != "max_memory"}  # before it existed
    DecorConfig().check_resume(older, None)  # its plan is applied as saved: any budget resumes it
    DecorConfig(max_memory=None).check_resume(older, None)
    saved = DecorConfig(max_memory=2.0).plan_arguments(None)
    with pytest.raises(ValueError, match=r"`max_memory` is 8.0 here and was 2.0 in the checkpoint"):
        DecorConfig(max_memory=8.0).check_resume(saved, None)
