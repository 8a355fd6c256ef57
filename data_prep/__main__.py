"""`python -m data_prep ...` = `uniecg prep ...`."""
import argparse
import sys

from data_prep.arguments import add_arguments
from data_prep.prep import handle
from uniecg_jax.errors import UniECGError

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    add_arguments(parser)
    try:
        sys.exit(handle(parser.parse_args()))
    except UniECGError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        sys.exit(1)
