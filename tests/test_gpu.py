"""The GPU code paths of training (nccl, bf16, device placement, fused AdamW, per-block
compile): each strategy trains on one GPU worker and its export passes the logits check.
Skipped where there is no CUDA (CI and the 2-CPU machines); run on a GPU machine with
`pytest -m gpu`."""

from __future__ import annotations

import pytest

from conftest import STRATEGIES, train_tiny

pytestmark = pytest.mark.gpu

GPU = ["train.num_workers=1", "train.use_gpu=true", "train.precision=bf16"]


# each strategy, then FSDP2's CPUOffloadPolicy and ZeRO-3's optimizer + parameter offload
# (DeepSpeedCPUAdam, compiled on first use)
CASES = {**STRATEGIES, "fsdp-offload": STRATEGIES["fsdp"] + ["train.fsdp.cpu_offload=true"],
         "zero3-offload": STRATEGIES["zero3"] + ["train.deepspeed.offload_optimizer=true",
                                                 "train.deepspeed.offload_params=true"]}


@pytest.mark.parametrize("key", list(CASES))
def test_gpu_strategy_trains_in_bf16_and_exports(train_dataset, key):
    _, card = train_tiny(train_dataset, f"gpu-{key}", CASES[key] + GPU)
    curve = [loss for _, loss in card["loss_curve"]]
    assert curve[-1] < curve[0] - 0.3, curve
    check = card["export_check"]
    assert check["max_abs_diff"] <= check["tolerance"]


def test_gpu_compiled_blocks_keep_parameter_names(train_dataset):
    _, card = train_tiny(train_dataset, "gpu-compiled", STRATEGIES["fsdp"] + GPU + ["model.compile=true"])
    assert card["export_check"]["max_abs_diff"] <= card["export_check"]["tolerance"]


def test_gpu_serving_engine_matches_hf_and_keeps_per_request_sampling(tmp_path):
    """The serving engine on CUDA (the path `serve_bench.py --device cuda` measured): greedy
    output equals transformers' greedy `generate` on the GPU, and a sampled request gives the
    same text alone and inside a batch (per-row seeds on the CUDA generator)."""
    import torch

    from raylm.data.config import TokenizerConfig
    from raylm.data.tokenize import to_hf, train_bpe
    from raylm.serve.engine import GenRequest, LMEngine
    from raylm.train import models
    from raylm.train.config import ModelConfig

    tc = TokenizerConfig(vocab_size=300)
    tok = to_hf(train_bpe(["the king and the queen went to sea in a storm at night"] * 50, tc), tc)
    torch.manual_seed(0)
    model = models.build(ModelConfig(arch="llama", preset="tiny"), len(tok), 256, tok.eos_token_id, tok.pad_token_id)
    model.config.use_cache = True
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = LMEngine(tmp_path, num_gpus=1, dtype="float32")
    assert engine.device.type == "cuda"

    def run(reqs):
        out = {i: [] for i in range(len(reqs))}
        engine.generate(reqs, lambda evs: [out[i].extend(ev["tokens"]) for i, ev in evs.items()])
        return out

    prompt = engine.encode("the king")
    greedy = run([GenRequest(prompt, max_tokens=12, temperature=0)])[0]
    ids = torch.tensor([prompt], device="cuda")
    ref = engine.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert greedy == ref[:len(greedy)]
    sampled = GenRequest(engine.encode("a storm"), max_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    alone = run([sampled])[0]
    together = run([GenRequest(prompt, max_tokens=6, temperature=0), sampled])[1]
    assert alone == together
