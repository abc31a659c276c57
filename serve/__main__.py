"""`python -m serve`: the moegi server (vLLM's engine core is spawned, hence the guard)."""

from serve.cli import main

if __name__ == "__main__":
    main()
