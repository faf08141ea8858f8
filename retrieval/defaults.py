"""Search defaults, in a module without heavy imports so that the CLI can show them in --help.

All were chosen on validation splits (docs/RESULTS.md, sections "Retrieval" and "Sketches drawn from memory")."""

DEFAULT_LAMBDA = 0.97  # score = lambda * similarity + (1 - lambda) * DICE / 100
DEFAULT_WEIGHTS = {"sketch": 0.9, "code": 0.05, "image": 0.05}  # the vector's parts (retrieval.vector.VectorRecipe)
DEFAULT_CANDIDATES = 100  # FAISS candidates re-ranked (DICE and alignment)
# The alignment stage (retrieval.align.Alignment): share of the final score, decay in pixels, the
# reduction it matches at, and the transforms tried (degrees, scale factors, largest shift as a fraction of the side).
DEFAULT_ALIGNMENT = {"weight": 0.5, "tau": 2.0, "reduction": 2,
                     "grid": {"rotations": (-15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0), "scales": (0.8, 0.9, 1.0, 1.1, 1.25), "shift": 0.12}}
