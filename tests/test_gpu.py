"""The GPU code paths of training (nccl, bf16, device placement, fused AdamW, per-block
compile): each strategy trains on one GPU worker and its export passes the logits check.
Skipped where there is no CUDA (CI and the 2-CPU machines); run on a GPU machine with
`pytest -m gpu`."""

from __future__ import annotations

import pytest

from conftest import STRATEGIES, train_tiny

pytestmark = pytest.mark.gpu

GPU = ["train.num_workers=1", "train.use_gpu=true", "train.precision=bf16"]


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_gpu_strategy_trains_in_bf16_and_exports(train_dataset, key):
    _, card = train_tiny(train_dataset, f"gpu-{key}", STRATEGIES[key] + GPU)
    curve = [loss for _, loss in card["loss_curve"]]
    assert curve[-1] < curve[0] - 0.3, curve
    check = card["export_check"]
    assert check["max_abs_diff"] <= check["tolerance"]


def test_gpu_compiled_blocks_keep_parameter_names(train_dataset):
    _, card = train_tiny(train_dataset, "gpu-compiled", STRATEGIES["fsdp"] + GPU + ["model.compile=true"])
    assert card["export_check"]["max_abs_diff"] <= card["export_check"]["tolerance"]
