"""Teacher AR models: LlamaGen (raster order), VAR (next-scale)."""
