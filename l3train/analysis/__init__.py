"""Offline analyses behind the inspection CLIs (tools/): measurements and their tables."""
