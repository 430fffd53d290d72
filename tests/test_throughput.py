"""The FLOPs model and MFU arithmetic (orpo_dist.throughput), checked on CPU with a fake GPU name."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from orpo_dist import throughput
from orpo_dist.config import Config, TrainConfig
from orpo_dist.loss import PAIR_METRICS
from orpo_dist.metrics import MetricsLog, MetricWindow
from orpo_dist.throughput import FlopsModel, flops_model, flops_per_token, peak_tflops_for


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_full_fine_tune_is_6_flops_per_matmul_weight(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    cfg = model.config
    h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    # per layer: q and o (h x h), k and v (h x kv), gate, up and down (h x inter); then the output head
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * vocab
    assert flops_per_token(model) == 6 * n  # not the embedding (a lookup), nor norms


def test_lora_is_4_per_frozen_weight_plus_6_per_adapter_weight(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = _tiny(tiny_model_dir)
    full = flops_per_token(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    adapters = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert adapters > 0
    assert flops_per_token(lora) == pytest.approx(full / 6 * 4 + 6 * adapters)


def test_peak_by_device_name_or_override():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0  # not the SXM figure
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA L40S") == 362.0 and peak_tflops_for("NVIDIA L4") == 121.0
    assert peak_tflops_for("NVIDIA GeForce GTX 1080") is None
    assert peak_tflops_for("NVIDIA GeForce GTX 1080", 100.0) == 100.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", 500.0) == 500.0


def test_mfu_arithmetic():
    # 8 GPUs at 989.4 TFLOP/s; 6e9 FLOPs per token (a 1B full fine-tune); 100k tokens/s over all GPUs
    got = FlopsModel(flops_per_token=6e9, peak_tflops=989.4).mfu(tokens_per_second=1e5, devices=8)
    assert got == pytest.approx(6e14 / (8 * 989.4e12))


def test_mfu_only_on_a_gpu_with_a_known_peak(monkeypatch):
    model, said = nn.Linear(10, 20), []
    assert flops_model(model, torch.device("cpu"), 989.4, said.append) is None  # CPU: never
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    got = flops_model(model, torch.device("cuda"), None, said.append)
    assert got == FlopsModel(6 * 200, 989.4) and not said
    monkeypatch.setattr(throughput.torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert flops_model(model, torch.device("cuda"), None, said.append) is None
    assert said == [
        "mfu: not logged: no peak known for 'Mystery GPU'; set peak_tflops (dense bf16 TFLOP/s of one GPU)"
    ]
    assert flops_model(model, torch.device("cuda"), 100.0, said.append) == FlopsModel(1200, 100.0)


def test_the_logged_row_has_mfu_and_data_wait(tmp_path):
    accelerator = types.SimpleNamespace(num_processes=1, is_main_process=True, device=torch.device("cpu"))
    cfg = Config(train=TrainConfig(output_dir=str(tmp_path)))

    def window() -> MetricWindow:  # 2 pairs, 3000 tokens
        w = MetricWindow(0.1)
        w.add({**{k: torch.tensor(0.5) for k in PAIR_METRICS}, "nll_sum": torch.tensor(4.0),
               "nll_tokens": torch.tensor(8.0), "or_sum": torch.tensor(1.0), "pairs": torch.tensor(2.0),
               "num_tokens": torch.tensor(3000.0)})  # fmt: skip
        return w

    log = MetricsLog(accelerator, cfg, FlopsModel(flops_per_token=1e9, peak_tflops=1.0))
    row = log.log_train(window(), seconds=2.0, data_wait=0.25, step=1)
    assert row["tokens_per_second"] == 1500.0
    assert row["mfu"] == pytest.approx(1500 * 1e9 / 1e12)
    assert row["data_wait_seconds"] == 0.25
    no_gpu = MetricsLog(accelerator, cfg).log_train(window(), seconds=2.0, data_wait=0.0, step=2)
    assert "mfu" not in no_gpu and no_gpu["data_wait_seconds"] == 0.0
