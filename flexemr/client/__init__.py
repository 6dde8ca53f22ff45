"""The ranker side: EmbeddingClient and the components it is made of."""
