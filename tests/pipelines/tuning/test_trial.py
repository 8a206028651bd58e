"""One trial (``pipelines.tuning.trial``, ``pipelines.tuning.space.trial_config``): what reaches Tune,
and the sampled values entering the config as values."""

from __future__ import annotations

import math

import pytest

from instalign.config import ConfigError, load_config


def test_only_validated_reports_reach_tune_and_iterations_count_epochs():
    from pipelines.tuning.trial import validated_report

    assert validated_report({"step": 2, "epoch": 0, "epoch_step": 2, "val_gIoU": math.nan}, "val_gIoU") is None
    assert validated_report({"step": 2, "epoch": 0, "epoch_step": 2}, "val_gIoU") is None
    end_of_epoch = validated_report({"step": 8, "epoch": 2, "epoch_step": 0, "val_gIoU": 41.5}, "val_gIoU")
    assert end_of_epoch["training_iteration"] == 2 and end_of_epoch["val_gIoU"] == 41.5
    # train.max_steps stopped the run inside its third epoch: that epoch was begun, so it counts.
    assert validated_report({"step": 9, "epoch": 2, "epoch_step": 1, "val_cIoU": 3.0}, "val_cIoU")[
        "training_iteration"] == 3


def test_sampled_values_enter_the_config_as_values():
    """No text detour: a sampled float is the config's float, bit for bit, and is checked once."""
    from pipelines.tuning.space import trial_config

    base = load_config("tiny")
    lr = 0.00012345678901234567  # a value whose shortest text form is long
    cfg = trial_config(base, {"train.lr": lr, "loss.nt_weight": 2, "model.decoder": "mask2former",
                              "model.backbone.kwargs.drop_path_rate": 0.0})
    assert cfg.train.lr == lr and type(cfg.loss.nt_weight) is float and cfg.loss.nt_weight == 2.0
    assert cfg.model.decoder == "mask2former" and cfg.model.backbone.kwargs["drop_path_rate"] == 0.0
    assert base.model.decoder == "pot"  # the base is not touched
    with pytest.raises(ConfigError, match="train.no_such: unknown config key"):
        trial_config(base, {"train.no_such": 1})
    with pytest.raises(ConfigError, match="expected one of"):
        trial_config(base, {"model.decoder": "unet"})
