"""nyxray: merge large language models on a Ray cluster, object storage to object storage.

Recipes are mergekit's YAML; on the CPU the output is byte-identical to mergekit 0.1.5's.
The public API is :func:`merge`, :func:`plan`, :func:`sweep`, :func:`verify` and
:func:`release_actors`.
"""

__version__ = "0.1.0"

from .api import merge, plan, release_actors, sweep, verify  # noqa: E402

__all__ = ["merge", "plan", "release_actors", "sweep", "verify", "__version__"]
