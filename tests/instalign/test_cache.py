"""Where InstAlign caches what it builds or downloads (``instalign.cache``): one root, by precedence."""

from __future__ import annotations

from pathlib import Path

from instalign.cache import cache_root


def test_the_root_is_instalign_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("INSTALIGN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "instalign"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "instalign"
    monkeypatch.setenv("INSTALIGN_CACHE", "~/mine")
    assert cache_root() == tmp_path / "home" / "mine"  # ~ expanded
    assert not (tmp_path / "home").exists()  # not created by asking


def test_an_empty_variable_counts_as_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("INSTALIGN_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == Path(tmp_path) / "instalign"
