"""Credentials never written down: the one redaction rule (pipelines.core.redaction)."""

from __future__ import annotations

import pytest

from pipelines.core.redaction import MASK, command_line, redact, redact_argv


@pytest.mark.parametrize("text, secret", [
    ("s3://AKIAKEY:wJalrSECRET@bucket/ray_results", "wJalrSECRET"),
    ("s3://AKIAKEY:wJalrSECRET@bucket/ray_results", "AKIAKEY"),
    ("https://mlflow.example/api?token=abc123&x=1", "abc123"),
    ("https://bucket.s3/x?X-Amz-Signature=deadbeef&X-Amz-Date=1", "deadbeef"),
    ("postgresql://user:pw0rd@db:5432/mlflow", "pw0rd"),
    ("AWS_SECRET_ACCESS_KEY=hunter2 instalign train", "hunter2"),
    ("instalign train --aws-secret-access-key hunter2 --name x", "hunter2"),
    ("instalign train --token='a b c' --name x", "a b c"),
    ("--api-key \"k e y\"", "k e y"),
])
def test_secrets_are_masked(text, secret):
    out = redact(text)
    assert secret not in out and MASK in out


@pytest.mark.parametrize("text", ["gs://bucket/data/grefcoco", "sqlite:////tmp/mlflow.db", "--name tokenizer-run",
                                  "/data/grefcoco/instances.json", "model.text_encoder.name=roberta-base"])
def test_plain_text_is_kept(text):
    assert redact(text) == text


def test_argv_hides_the_word_after_a_secret_flag():
    argv = ["instalign", "train", "--token", "abc", "--storage-path", "s3://k:s@b/p", "--name", "run1"]
    assert redact_argv(argv) == ["instalign", "train", "--token", MASK, "--storage-path", f"s3://{MASK}@b/p",
                                 "--name", "run1"]
    line = command_line(argv)
    assert "abc" not in line and ":s@" not in line and "run1" in line


@pytest.mark.parametrize("text, secret, kept", [
    ("http://user:SECRET@127.0.0.1:5000/api", "SECRET", "http://***@127.0.0.1:5000/api"),
    ("https://host/x?key=SECRET&page=2", "SECRET", "&page=2"),
    ("https://host/x?a=1&access_token=SECRET", "SECRET", "?a=1&access_token=***"),
    ("https://host/x?password=SECRET", "SECRET", "password=***"),
    ("https://host/x?secret=SECRET#frag", "SECRET", "#frag"),
    ("https://host/x?token=SECRET", "SECRET", "token=***"),
    ("Authorization: Bearer eyJSECRET.x-y_z", "eyJSECRET", "Authorization: Bearer ***"),
    ("{'Authorization': 'Basic dXNlcjpTRUNSRVQ='}", "dXNlcjpTRUNSRVQ", "'Authorization': 'Basic ***'"),
    ("headers Authorization=SECRET sent", "SECRET", "sent"),
    ("sent with Bearer SECRET.tok to the API", "SECRET", "Bearer *** to the API"),
    ("instalign x --password SECRET --name a", "SECRET", "--name a"),
    ("instalign x --passphrase SECRET --name a", "SECRET", "--passphrase ***"),
    ("instalign x --key SECRET --name a", "SECRET", "--key ***"),
    ("instalign x --token SECRET --name a", "SECRET", "--token ***"),
    ("instalign x --password=SECRET", "SECRET", "--password=***"),
    ("instalign x --passphrase=SECRET", "SECRET", "--passphrase=***"),
    ("instalign x --key=SECRET", "SECRET", "--key=***"),
    ("instalign x --token=SECRET", "SECRET", "--token=***"),
])
def test_each_credential_pattern(text, secret, kept):
    out = redact(text)
    assert secret not in out and kept in out, out


@pytest.mark.parametrize("text", ["https://host/x?keyboard=us&monkey=2", "--keyboard us", "the bearer of news",
                                  "--key-file /etc/ssl/site.pem"])
def test_names_that_only_contain_key_are_kept(text):
    assert redact(text) == text


@pytest.mark.parametrize("text", ["model.text_encoder.max_tokens=20", "max_tokens=77", "tokenizer=/models/roberta",
                                  "num_tokens=12", "author=someone", "https://host/x?max_tokens=20"])
def test_counts_and_names_that_only_start_with_a_secret_word_are_kept(text):
    # everything a verb prints goes through redact(): a config override must read as typed
    assert redact(text) == text


@pytest.mark.parametrize("text", ["access_token=abc123", "HF_TOKEN=abc123", "auth=abc123", "--auth-token=abc123",
                                  "https://host/x?token=abc123", "oauth_token=abc123"])
def test_secret_words_still_hide_their_values(text):
    assert "abc123" not in redact(text)


@pytest.mark.parametrize("flag", ["--password", "--passphrase", "--key", "--token"])
def test_argv_hides_the_value_of_each_secret_flag(flag):
    assert redact_argv(["instalign", "x", flag, "SECRET", "--name", "a"]) == ["instalign", "x", flag, MASK, "--name", "a"]
    assert "SECRET" not in " ".join(redact_argv(["instalign", "x", f"{flag}=SECRET"]))


def test_output_is_redacted_as_written(capsys):
    """Whatever prints inside ``redacted_output`` — print, a log record, a traceback — is redacted."""
    import logging
    import sys

    from pipelines.core.redaction import redacted_output

    with redacted_output():
        print("tracking at http://user:SECRET@host:5000", "and", "?token=SECRET2")
        print("error: --password SECRET3", file=sys.stderr)
        logging.getLogger("instalign-test").error("Authorization: Bearer SECRET4")  # Python's last-resort handler
        assert sys.stdout.isatty() is False and sys.stderr.encoding
        try:
            raise ValueError("cannot reach http://user:SECRET5@host")
        except ValueError:
            sys.excepthook(*sys.exc_info())  # what the interpreter does with an uncaught error
    out, err = capsys.readouterr()
    for secret in ("SECRET", "SECRET2", "SECRET3", "SECRET4", "SECRET5"):
        assert secret not in out + err
    assert "http://***@host:5000 and ?token=***" in out and "Traceback" in err and "ValueError" in err


def test_write_json_redacts_a_batch_summary(tmp_path):
    """``OUT/summary.json`` of batch predict is written by ``write_json``: its fields quote --data and --model."""
    import json

    from pipelines.core.redaction import write_json

    summary = {"model": "models:/m@champion", "data": "s3://AKIAKEY:SECRET@bucket/pairs.parquet?token=SECRET2",
               "out": "/tmp/out", "rows": 3, "reasons": {"missing_image": 1}, "metrics": {"gIoU": 50.0}}
    write_json(tmp_path / "summary.json", summary)
    text = (tmp_path / "summary.json").read_text()
    assert "SECRET" not in text and "AKIAKEY" not in text
    assert json.loads(text) == {**summary, "data": "s3://***@bucket/pairs.parquet?token=***"}


def test_ray_serve_error_bodies_are_redacted():
    from pipelines.serving.guard import error_response

    body = error_response(400, "cannot read s3://AKIA:SECRET@bucket/img.jpg", "INVALID_PARAMETER_VALUE").body.decode()
    assert "SECRET" not in body and "s3://***@bucket/img.jpg" in body
