"""spade_edge.runtime: the lean part of spade-edge (never imports torch).

Holds what every other piece shares: the preprocessing contract, typed errors, the artifact
container, runners (inference backends), matchers (kNN backends) and SPADE scoring.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
