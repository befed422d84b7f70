"""Checkpoints: atomic, verifiable (manifest with checksums), resumable with explicit rules for
config changes. `store` saves and loads, `manifest` verifies, `config_change` decides which
config keys may change on resume."""

from l3train.checkpoint.manifest import MANIFEST, read_manifest, verify
from l3train.checkpoint.store import (
                                      Resumed,
                                      checkpoint_root,
                                      clear_abandoned_staging,
                                      latest_tag,
                                      list_tags,
                                      load_latest_checkpoint,
                                      no_space_message,
                                      refuse_existing_checkpoints,
                                      run_identity,
                                      save_checkpoint,
                                      tag_for_step,
                                      verify_on_ranks,
)

__all__ = ["MANIFEST", "Resumed", "checkpoint_root", "clear_abandoned_staging", "latest_tag", "list_tags",
           "load_latest_checkpoint", "no_space_message", "read_manifest", "refuse_existing_checkpoints",
           "run_identity", "save_checkpoint", "tag_for_step", "verify", "verify_on_ranks"]
