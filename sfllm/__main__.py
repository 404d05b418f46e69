import sys

from sfllm.cli import main

if __name__ == "__main__":  # not when a spawned process (sfllm.bench.background_flood) imports it
    sys.exit(main())
