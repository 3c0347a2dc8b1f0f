"""Where Nexus keeps what it writes outside a run directory: datasets and tool caches."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/nexus, else ~/.cache/nexus."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "nexus"


def keep_tool_caches_in_cache_dir() -> None:
    """numba (the scan kernels), matplotlib (the report's plot) and torch's optimizers would
    write beside the package, into ~/.config/matplotlib and $TMPDIR/torchinductor_<user>;
    nexus writes only to --out_dir and its cache directory. Call before those are imported."""
    root = cache_dir()
    os.environ.setdefault("NUMBA_CACHE_DIR", str(root / "numba"))
    os.environ.setdefault("MPLCONFIGDIR", str(root / "matplotlib"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "torchinductor"))
