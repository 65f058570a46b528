"""Image tokenizers: LlamaGen VQ-8/16 and VAR's multi-scale VQVAE."""
