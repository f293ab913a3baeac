"""Image normalisation, CNN embeddings, the vector index and the embedding worker (next milestone)."""
