"""Separation models, one file per architecture."""

from umxtools.models.umx import OpenUnmix

__all__ = ["OpenUnmix"]
