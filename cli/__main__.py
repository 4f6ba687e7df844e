"""``python -m apar_spec.cli`` (and ``accelerate launch -m apar_spec.cli bench ...``) runs the CLI."""

from .app import main

if __name__ == "__main__":  # pragma: no cover - exercised by the data-parallel test through a subprocess
    main()
