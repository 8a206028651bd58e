"""Credentials never written down: the one redaction rule (pipelines.redaction)."""

from __future__ import annotations

import pytest

from pipelines.redaction import MASK, command_line, redact, redact_argv


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
