"""Evaluation job: a registry model + a dataset split -> report.json / report.html beside the
model, headline metrics in its model card.

    raylm submit evaluate --config jobs/configs/evaluate_authors.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the raylm next to this script

from raylm.runtime import prepare_env  # noqa: E402

prepare_env()  # before anything imports Ray: it reads the auth mode at import

from raylm.config import run_main  # noqa: E402
from raylm.evaluate.job import main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
