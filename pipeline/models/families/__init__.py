"""One file per model family, each a :class:`~pipeline.models.families.base.FamilyDriver` registered by the
diffusers pipeline classes it drives. Adding a family = one file here (found and imported below) + its tiny pipeline
and oracle test. Registration order (the order messages and the family table list classes in): the families of
2024 first, in the order below, then every other module of this package by name."""

# isort: off
import importlib
import pkgutil

from pipeline.models.families import sd, sdxl, pixart, sd3, flux, dit, ddpm  # noqa: F401
from pipeline.models.attention import recorder_class
from pipeline.models.families.base import ALL_MODES, DRIVERS, FAMILIES, Family, FamilyDriver, call_default

# isort: on

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ALL_MODES", "DRIVERS", "FAMILIES", "Family", "FamilyDriver", "call_default", "recorder_class"]
