"""``python -m nanogpt_core`` runs the ``gpt`` command (for ``accelerate launch -m``)."""

from nanogpt_core.cli import main

if __name__ == "__main__":
    main()
