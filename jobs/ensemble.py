"""Ensemble job: members trained as Tune trials (or taken from a search or the registry),
combined (mean, weighted, logit mean, stacking, boosting, soup) and registered as one model.

    raylm submit ensemble --config jobs/configs/ensemble_authors.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the raylm next to this script

from raylm.runtime import prepare_env  # noqa: E402

prepare_env()  # before anything imports Ray: it reads the auth mode at import

from raylm.config import run_main  # noqa: E402
from raylm.tune.ensemble_job import main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
