"""`python -m umxtools` (also what `torchrun -m umxtools` runs)."""

from umxtools.cli import main

if __name__ == "__main__":
    main()
