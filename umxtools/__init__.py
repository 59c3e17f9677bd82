"""umxtools: a config-free command toolbox for music source separation research.

Each pipeline stage is a module (audio, transforms, datasets, cache, loaders, ...) and a thin
Click command in :mod:`umxtools.cli`. Artifacts carry their own metadata; there are no config files.
"""

__version__ = "0.1.0"
