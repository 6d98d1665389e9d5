"""Pipeline job: prepare_data -> train -> tune -> ensemble -> evaluate -> deploy from one config,
each stage skipped when its output for the same inputs exists.

    raylm submit pipeline --config jobs/configs/pipeline_demo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the raylm next to this script

from raylm.runtime import prepare_env  # noqa: E402

prepare_env()  # before anything imports Ray: it reads the auth mode at import

from raylm.config import run_main  # noqa: E402
from raylm.pipeline import main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
