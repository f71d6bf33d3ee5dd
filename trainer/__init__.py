"""salt: pre-train a large language model with the help of a small one, in JAX."""

# The name on the package index, where `salt` is SaltStack; the command and the import
# packages are salt's own.
DISTRIBUTION = 'salt-lm'
