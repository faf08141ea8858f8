"""Search defaults, in a module without heavy imports so that the CLI can show them in --help.

Both were chosen on validation splits (docs/RESULTS.md, section "Retrieval")."""

DEFAULT_LAMBDA = 0.97  # score = lambda * similarity + (1 - lambda) * DICE / 100
DEFAULT_WEIGHTS = {"sketch": 0.9, "code": 0.05, "image": 0.05}  # the vector's parts (retrieval.vector.VectorRecipe)
