import sys

from sfllm.cli import main

sys.exit(main())
