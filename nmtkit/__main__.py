"""`python -m nmtkit ...` (also what `torchrun -m nmtkit` runs)."""

from nmtkit.cli import main

if __name__ == "__main__":
    main()
