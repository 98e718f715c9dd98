"""`python -m memvp_peft.bench`: the same run as the console script `memvp-bench`."""

from .cli import main

if __name__ == "__main__":
    from memvp_peft_console import quiet_third_party_output

    quiet_third_party_output()  # as `memvp-bench` does
    main()
