"""The package version and the versions of the libraries a run depends on (recorded in run summaries,
shown by `kt-sft info`)."""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"

_DEPENDENCIES = ("kt-sft-train", "kt-sft-kernels", "torch", "transformers", "peft", "accelerate")


def library_versions() -> dict[str, str]:
    """Installed version of kt-sft and of each library it depends on ("not installed" when absent)."""
    versions = {}
    for name in _DEPENDENCIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
