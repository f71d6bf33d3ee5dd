"""salt: pre-train a large language model with the help of a small one, in JAX."""
