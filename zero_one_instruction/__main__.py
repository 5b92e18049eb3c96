"""`python -m zero_one_instruction`. The guard matters: vLLM spawns its engine process, and
a spawned child re-imports `__main__`."""

from .cli import main

if __name__ == "__main__":
    main()
