"""Remote code of exported L³ models: copied next to the weights by
l3train.checkpoint.huggingface and imported by transformers (`trust_remote_code=True`),
never by l3train. A package only so that installing l3train ships these files."""
