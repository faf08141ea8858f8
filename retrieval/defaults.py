"""Search defaults, in a module without heavy imports so that the CLI can show them in --help.

All were chosen on validation splits (docs/RESULTS.md, sections "Retrieval" and "Sketches drawn
from memory"). A bundle may name its own vector weights, chosen on its own validation data, in
`BUNDLE/search.json` (`retrieval.vector.bundle_recipe`); DEFAULT_WEIGHTS serve the others."""

DEFAULT_LAMBDA = 0.97  # score = lambda * similarity + (1 - lambda) * DICE / 100
# The vector's parts (retrieval.vector.VectorRecipe), chosen on vocalfolds `val` and a phantom's `val`
DEFAULT_WEIGHTS = {"sketch": 0.9, "code": 0.05, "image": 0.05}
DEFAULT_CANDIDATES = 100  # FAISS candidates re-ranked (DICE and alignment)
# The alignment stage (retrieval.align.Alignment): its share of the final score, the decay of
# exp(-d / tau) in pixels, the reduction it matches at, and the transforms it tries (rotations in
# degrees, scale factors, the largest shift as a fraction of the side).
DEFAULT_ALIGNMENT = {"weight": 0.3, "tau": 0.5, "reduction": 4,
                     "grid": {"rotations": (-10.0, 0.0, 10.0), "scales": (0.85, 1.0, 1.2), "shift": 0.12}}
