"""Generation with a KV cache, and L³ tables resident, in host memory or on disk (docs/inference.md).

- `config.InferenceConfig`: placement, prefetch, staging size and sampling of a request.
- `loading`: open a consolidated or training checkpoint, build the model with its tables placed.
- `engine.Generator`: batched prefill + incremental decoding, streaming the tokens.
- `placement`, `staging`, `row_sources`, `disk_tables`: the row backend that stages the rows
  of a step's tokens, the prefetcher, and where the rows are read from.
- `kv_cache`, `sampling`: the attention cache and the token draw.
"""
