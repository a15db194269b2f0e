"""Where the weights that ship with Chorus live.

In a checkout (and an editable install) they are the repository's `weights/` folder; a wheel installs
that folder as the package `chorus.weights` (see pyproject.toml).
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def shipped_weights(name: str) -> Path:
    """The folder weights/<name> of the installed package or the checkout (the first that exists).

    When neither exists the checkout's path is returned, so an error message can name where it belongs."""
    for root in (PACKAGE_ROOT / "weights", PACKAGE_ROOT.parent / "weights"):
        if (root / name).is_dir():
            return root / name
    return PACKAGE_ROOT.parent / "weights" / name


def resolve_shipped(name, kind: str = ""):
    """A model argument: `default` is the shipped model, `default-<x>` a shipped world model, weights/<kind><x>
    (`--refiner default-refiner` → weights/refiner, `--controlnet default-layout` → weights/controlnet-layout);
    anything else is a path."""
    text = str(name)
    if text == "default" and not kind and not Path(text).exists():
        return shipped_weights("default")
    if text.startswith("default-") and not Path(text).exists():
        return shipped_weights(kind + text[len("default-"):])
    return name


def resolve_controlnet(name):
    """A ControlNet argument: `default-<condition>` names a shipped world ControlNet (weights/controlnet-<condition>);
    anything else is a path."""
    return resolve_shipped(name, "controlnet-")
