"""Parallel training: how the model and its L³ tables are split across ranks. L³ routing
is static, so `shard_plan` decides before training which rank owns which token's rows."""
