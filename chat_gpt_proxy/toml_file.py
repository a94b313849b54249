"""The operator's TOML files (ACCESS_TOKENS_FILE, PRICES_FILE, UPSTREAMS_FILE), read one way."""

from __future__ import annotations

import tomllib


def read_toml(path: str, error: type[ValueError]) -> dict:
    """``path`` parsed; ``error`` with one line naming the file when it cannot be read or is not TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise error("%s: cannot read it: %s" % (path, exc.strerror or exc)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error("%s: not valid TOML: %s" % (path, str(exc).replace("\n", " "))) from None
