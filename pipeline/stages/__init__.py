"""Stage files, one per mode (plus ``common`` for shared loading stages). Importing this package imports
every module in it, which registers their stages and modes: a new mode needs no edit here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
