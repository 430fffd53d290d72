"""Oracle test: our loss and metrics equal `trl.experimental.orpo.ORPOTrainer`'s on the same model and pairs.

TRL tokenises the pairs itself (`tokenize_row`: BOS + prompt, answer + EOS, labels -100 on the prompt)
and pads them with its own collator; we tokenise with `data.build_datasets` and lay out the batch with
`PaddedCollator`. The test first checks both produce the same token ids (BOS / EOS handling), then
compares every metric TRL logs, and the gradient, in float32 on CPU. TRL's NLL covers all non-pad
chosen tokens (prompt + completion), so ours runs with nll_scope = prompt_completion.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from helpers import orpo_forward  # noqa: E402

from orpo_dist.builtin import case_rule_pairs  # noqa: E402
from orpo_dist.config import DataConfig  # noqa: E402
from orpo_dist.layouts import PaddedCollator  # noqa: E402
from orpo_dist.loss import PAIR_METRICS as METRICS  # noqa: E402

BETA = 0.2


def _pairs() -> list[dict[str, str]]:
    """Pairs whose prompt, chosen and rejected lengths all differ, so padding and masks matter."""
    return case_rule_pairs(n=4, seed=3) + [
        {"prompt": "Say yes: ", "chosen": "yes, of course", "rejected": "no"},
        {
            "prompt": "A much longer prompt than the others, to pad the rest\n",
            "chosen": "ok",
            "rejected": "not ok at all",
        },
    ]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tokenizer, tmp_path_factory):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from orpo_dist.data import build_datasets

    tmp = tmp_path_factory.mktemp("trl_oracle")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a less uniform model than the fresh init, so the metrics are not all ~equal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()

    pairs = _pairs()
    args = ORPOConfig(
        output_dir=str(tmp / "trl"),
        beta=BETA,
        bf16=False,
        fp16=False,
        report_to=[],
        max_length=256,
        use_cpu=True,
        remove_unused_columns=False,
        dataset_num_proc=None,
    )
    trainer = ORPOTrainer(
        model=model, args=args, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(pairs)
    )
    trl_rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    trl_batch = trainer.data_collator(trl_rows)

    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    ours_ds, _, _ = build_datasets(
        DataConfig(data_path=str(path), max_length=256, max_prompt_length=128, eval_split=0.0),
        tokenizer,
        seed=0,
    )
    assert ours_ds["id"] == list(range(len(pairs)))  # same order as TRL's rows
    our_batch = PaddedCollator(tokenizer.pad_token_id, "prompt_completion")(list(ours_ds))
    return trainer, model, trl_rows, trl_batch, list(ours_ds), our_batch


def test_same_token_ids_as_trl(setup, tokenizer):
    _, _, trl_rows, _, ours, _ = setup
    for t, o in zip(trl_rows, ours):
        assert (
            o["prompt_ids"][0] == tokenizer.bos_token_id
            and o["prompt_ids"].count(tokenizer.bos_token_id) == 1
        )
        assert o["chosen_ids"][-1] == o["rejected_ids"][-1] == tokenizer.eos_token_id
        assert t["chosen_input_ids"] == o["prompt_ids"] + o["chosen_ids"]
        assert t["rejected_input_ids"] == o["prompt_ids"] + o["rejected_ids"]
        n = len(o["prompt_ids"])
        assert t["chosen_labels"] == [-100] * n + o["chosen_ids"]
        assert t["rejected_labels"] == [-100] * n + o["rejected_ids"]


def _ours(model, batch, chunk_size):
    parts = orpo_forward(model, batch, chunk_size)
    pairs = parts.pairs
    metrics = {k: (v / pairs).item() for k, v in parts.metric_sums(BETA).items()}
    metrics["nll_loss"] = (parts.nll_sum / parts.nll_tokens).item()
    return parts.loss(BETA), metrics


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_loss_and_metrics_equal_trl(setup, chunk_size):
    trainer, model, _, trl_batch, _, our_batch = setup
    with torch.no_grad():
        trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch)
        loss, metrics = _ours(model, our_batch, chunk_size)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for key in ["nll_loss", *METRICS]:
        assert metrics[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    # the batch is not degenerate: the comparison would catch a sign or a normalisation slip
    assert 0 < trl_metrics["rewards/accuracies"] < 1
    assert abs(trl_metrics["log_odds_chosen"]) > 1e-3


def test_gradient_equals_trl(setup):
    trainer, model, _, trl_batch, _, our_batch = setup
    params = list(model.parameters())
    model.zero_grad()
    trainer.get_batch_loss_metrics(model, trl_batch)[0].backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad()
    _ours(model, our_batch, 16)[0].backward()
    got = [p.grad.clone() for p in params]
    model.zero_grad()
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
