"""`python -m memvp_peft.bench`: the same run as the console script `memvp-bench`."""

from .cli import main

if __name__ == "__main__":
    main()
