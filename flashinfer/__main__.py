"""``python -m flashinfer``: see :mod:`flashinfer.cli`."""

if __name__ == "__main__":  # guard: spawned prewarm workers re-import the main module
    from flashinfer.cli import main

    raise SystemExit(main())
