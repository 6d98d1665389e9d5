"""int8 on CPU: torch.ao's quantize_dynamic (what raylm serves with) vs torchao's quantize_
(what torch recommends instead) vs fp32, HF `generate` of 32 greedy tokens on a random-init
Llama (125M shape by default), one torch thread. Prints one JSON line.

torchao is not a raylm dependency: put it beside the venv first, e.g.
    pip install --target /tmp/tao torchao --no-deps
    PYTHONPATH=/tmp/tao python benchmarks/int8_backends.py
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise SystemExit("torchao is not installed: see this file's docstring") from None
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                      num_key_value_heads=a.hidden // 64, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 8192, (1, 64))

    def seconds(m) -> float:
        with torch.inference_mode():
            m.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            t0 = time.perf_counter()
            for _ in range(a.repeats):
                m.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
        return (time.perf_counter() - t0) / a.repeats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    tao = copy.deepcopy(model)
    quantize_(tao, Int8DynamicActivationInt8WeightConfig())
    print(json.dumps({"benchmark": "int8_backends", "device": "cpu (1 thread)", "layers": a.layers, "hidden": a.hidden,
                      "tokens": a.tokens, "fp32_s": round(seconds(model), 3),
                      "torch_ao_quantize_dynamic_s": round(seconds(ao), 3), "torchao_int8_s": round(seconds(tao), 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
