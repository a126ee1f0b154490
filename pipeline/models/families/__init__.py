"""One file per model family, each a :class:`~pipeline.models.families.base.FamilyDriver` registered by the
diffusers pipeline classes it drives. Adding a family = one file here (imported below) + its tiny pipeline and
oracle test. The import order below is the registration order: the order messages list supported classes in."""

from pipeline.models.families import sd, sdxl, pixart, sd3, flux, dit, ddpm  # noqa: F401, I001
from pipeline.models.attention import recorder_class
from pipeline.models.families.base import ALL_MODES, DRIVERS, FAMILIES, Family, FamilyDriver, call_default

__all__ = ["ALL_MODES", "DRIVERS", "FAMILIES", "Family", "FamilyDriver", "call_default", "recorder_class"]
