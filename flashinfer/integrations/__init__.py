"""Integrations with model frameworks. Each submodule imports its framework lazily: importing
``flashinfer.integrations`` never needs one installed.

- :mod:`flashinfer.integrations.transformers`: an attention backend for Hugging Face transformers
  (``register()``, then ``attn_implementation="fi_attention"``). Install with ``pip install 'flashinfer[transformers]'``.
"""

__all__ = ["transformers"]
