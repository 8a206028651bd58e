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


def _every_parser():
    from pipelines import cli
    from pipelines.bench import command as bench

    for verb in cli.VERBS:
        top = cli.build_parser(verb)
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        yield f"instalign {verb}", sub.choices[verb]
    for name in bench.BENCHES:
        yield f"instalign bench {name}", bench.build_parser(name)


def test_every_options_help_shows_its_default():
    """``--help`` of every verb and benchmark: an option with a value by default says which
    (appended by ``DefaultsShown`` unless the help already says it in words)."""
    silent = []
    for name, parser in _every_parser():
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or action.required or default is None
                    or default is argparse.SUPPRESS or isinstance(default, bool)):
                continue
            text = formatter._expand_help(action)
            if "default" not in text.lower():
                silent.append(f"{name} {action.option_strings[-1]}")
            elif "%(default)" not in (action.help or "") and "default" not in (action.help or "").lower():
                assert text.endswith(f"(default: {default})"), (name, text)
    assert not silent, f"options whose help hides their default: {silent}"


def test_defaults_shown_leaves_flags_none_and_worded_defaults_alone():
    parser = argparse.ArgumentParser(formatter_class=flags.DefaultsShown)
    parser.add_argument("--n", type=int, default=3, help="how many")
    parser.add_argument("--quiet", action="store_true", help="say less")
    parser.add_argument("--name", default=None, help="a name (absent: the run's)")
    parser.add_argument("--mode", default="a", help="the mode (default: a, the fast one)")
    text = " ".join(parser.format_help().split())
    assert "how many (default: 3)" in text
    assert "say less" in text and "say less (default" not in text
    assert "(absent: the run's)" in text and "(default: None)" not in text
    assert text.count("(default: a") == 1
