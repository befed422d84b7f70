"""l3train: pretraining language models with Large Lookup Layers (L³)."""

__version__ = "0.1.0"
