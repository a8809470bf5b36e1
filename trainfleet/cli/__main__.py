"""``python -m trainfleet.cli [launch|doctor|train|ckpt|bench|status|logs|cancel|models|datasets] ...``
(what a submitted job's nodes run)."""
from trainfleet.cli.common import exit_now
from trainfleet.cli.main import main

exit_now(main())
