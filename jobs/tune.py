"""Search job: the hyperparameters of a train config with Ray Tune; the best config written as
a train config, the best model registered, a report with plots.

    raylm submit tune --config jobs/configs/tune_tiny.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the raylm next to this script

from raylm.runtime import prepare_env  # noqa: E402

prepare_env()  # before anything imports Ray: it reads the auth mode at import

from raylm.config import run_main  # noqa: E402
from raylm.tune.job import main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
