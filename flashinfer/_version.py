"""The package version, in a leaf module: the JIT engine keys its cache on it without importing the API layer.

Scheme: ``<FlashInfer API level>+jit.<this implementation's release>`` (a PEP 440 local version label).

* The public part (``0.6.18``) is the FlashInfer release whose API this package implements for every name it
  exports: the same module paths, positional order, keywords, defaults and results (names it lacks are simply
  absent). Engines that gate features on ``flashinfer.__version__`` with ``packaging.version`` compare that part:
  ``Version("0.6.18+jit.0.2.0") >= Version("0.6.18")`` holds, and no release newer than the level claimed does.
* The local label (``+jit.0.2.0``) says that this is not FlashInfer's build: PyPI refuses local labels, so the
  string can never be mistaken for, or uploaded as, an upstream release. ``0.2.0`` counts this package's own
  releases (kernels, JIT engine, bug fixes) at a given API level.

``__flashinfer_api_version__`` and ``__implementation_version__`` give the two parts on their own. When the
implemented API follows a newer FlashInfer release, the public part moves to it.
"""

__flashinfer_api_version__ = "0.6.18"
__implementation_version__ = "0.2.0"
# Written out (not composed) so that packaging tools read it without executing this file (pyproject.toml).
__version__ = "0.6.18+jit.0.2.0"
