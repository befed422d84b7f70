"""Data pipeline: default corpus, tokenizer, preprocessing to Megatron .bin/.idx, datasets.

Modules are imported directly (`l3train.data.tokenizer`, ...) rather than re-exported
here, so that using the tokenizer does not pay for importing megatron-core.
"""
