"""The command-line flags shared by the verbs (``pipelines.core.flags``): one definition each."""

from __future__ import annotations

import argparse
import logging
import os

import pytest

from pipelines.core import flags


def parser_with(*adders) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for add in adders:
        add(parser)
    return parser


def test_model_takes_the_older_checkpoint_name_too():
    parser = parser_with(flags.add_model)
    assert parser.parse_args(["--model", "models:/m@champion"]).model == "models:/m@champion"
    assert parser.parse_args(["--checkpoint", "/ckpt"]).model == "/ckpt"


def test_log_level_is_case_blind_and_limited_to_the_levels(capsys):
    parser = parser_with(flags.add_log_level)
    assert parser.parse_args(["--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args([]).log_level is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "LOUD"])
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def test_defaults_that_differ_between_verbs_are_arguments():
    parser = parser_with(lambda p: flags.add_tracking(p, experiment="instalign-tune"),
                         lambda p: flags.add_max_failures(p, default=3),
                         lambda p: flags.add_config(p, default="tiny"), flags.add_overrides,
                         flags.add_data_order, flags.add_worker_resources, flags.add_address,
                         lambda p: flags.add_run_name(p, what="search"))
    args = parser.parse_args(["train.epochs=1", "model.num_queries=5"])
    assert (args.experiment, args.max_failures, args.config) == ("instalign-tune", 3, "tiny")
    assert args.overrides == ["train.epochs=1", "model.num_queries=5"]
    assert (args.data_order, args.gpus_per_worker, args.cpus_per_worker, args.address, args.tracking_uri,
            args.name, args.storage_path) == ("streaming", None, None, None, None, None, None)
    assert "resumes that search" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-order", "random"])


def test_setup_logging_sets_the_format_and_the_level_of_instalign_and_ray(monkeypatch):
    from pipelines.core import ray_logs

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    for name in (ray_logs.LOG_LEVEL_ENV, "RAY_DATA_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)  # put back after the test
    flags.setup_logging("WARNING")  # WARNING: Ray's loggers stay at their default level
    assert root.level == logging.WARNING
    assert root.handlers[0].formatter._fmt == flags.LOG_FORMAT
    assert os.environ[ray_logs.LOG_LEVEL_ENV] == os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"
