"""Image normalisation, CNN embeddings, vector index and embedding worker."""
