"""Every module in this package is one method family; importing it registers the method.

A new method is a new file here: nothing else in the package changes.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
