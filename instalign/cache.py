"""Where InstAlign keeps what it builds or downloads once and reuses.

One root, ``$INSTALIGN_CACHE`` if set, else ``$XDG_CACHE_HOME/instalign``, else
``~/.cache/instalign``:

* ``tiny-roberta/`` — the tiny text encoder of the ``tiny`` preset (:mod:`instalign.modeling.tiny_text`);
* ``models/<name>/<version>/`` — registry models downloaded by ``evaluate`` / ``predict``
  (``pipelines.models.registry``), one copy per registered version.

Every entry is a sealed directory (:mod:`instalign.integrity`): written whole by one
process, checked on every use, rebuilt when damaged. Clearing the cache is always safe
(``rm -rf`` the root): entries are rebuilt or downloaded again on next use. Hugging Face
models and tokenizers keep their own cache (``$HF_HOME``, default ``~/.cache/huggingface``).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root (see the module docstring); not created here."""
    explicit = os.environ.get("INSTALIGN_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path(os.path.expanduser("~")) / ".cache"
    return base / "instalign"


__all__ = ["cache_root"]
