"""l3train: pretraining language models with Large Lookup Layers (L³)."""

__version__ = "0.1.0"

import warnings

from l3train.utils import megatron_import

# megatron-core warns on every import that the optional apex/Transformer Engine kernels
# are absent; l3train treats apex as optional by design, so the warning is noise.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
# Its import, seconds in every process that touches it, without the parts l3train never runs.
megatron_import.install()
