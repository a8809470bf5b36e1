"""``python -m trainfleet.cli [launch|doctor|train|ckpt|bench|status|logs|cancel|models|datasets] ...``
(what a submitted job's nodes run)."""
import sys

from trainfleet.cli.main import main

sys.exit(main())
