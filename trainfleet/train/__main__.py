"""``python -m trainfleet.train``: an entry point, so it may reach up to the CLI that parses the
recipe's options (argparse lives only in ``trainfleet/cli``)."""
import sys

from trainfleet.cli.train import main

sys.exit(main())
