"""Data pipeline: ``cpt prepare`` (raw corpora → packed token chunks), the weighted streaming mix
(``PackedDataModule``) and the real offline sample corpus (``cpt data sample``). See docs/data.md.

Names are imported on first use so the command-line tools do not pay for Lightning's import.
"""

from importlib import import_module

_EXPORTS = {
    "PackedDataModule": "cpt_lightning.data.datamodule",
    "Source": "cpt_lightning.data.datamodule",
    "DataFacts": "cpt_lightning.data.manifest",
    "Manifest": "cpt_lightning.data.manifest",
    "check_compatible": "cpt_lightning.data.manifest",
    "position_ids_from_separators": "cpt_lightning.data.packing",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
