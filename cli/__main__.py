"""``python -m trimkit.cli``: the ``trimkit`` command (what ``torchrun -m trimkit.cli train ...`` runs)."""
from trimkit.cli import main

if __name__ == "__main__":
    main()
