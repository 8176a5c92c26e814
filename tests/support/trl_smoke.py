"""Train on exported files with TRL, offline: `python -m tests.support.trl_smoke DIR` (run by
tests/test_export_trl.py in a process with HF_HUB_OFFLINE=1).

DIR holds `hf.jsonl` (messages), `hf-last.jsonl` (prompt/completion) and `hf-dpo.jsonl`
(preference pairs), as the exporter wrote them. Loads each with `datasets`, trains a byte-level
BPE tokenizer on the data with the real Qwen2.5 chat template, builds a tiny randomly initialised
Qwen2 model from a config, runs TRL's SFTTrainer (assistant-only loss; completion-only loss)
and DPOTrainer for a few steps, and prints one JSON object with what happened. Nothing is
downloaded.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

from tests.support.trainer_data import TEMPLATES, TEMPLATES_DIR, render


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _texts(directory: Path) -> list[str]:
    """Every conversation of the three files rendered with the Qwen2.5 template."""
    texts = []
    for record in _records(directory / "hf.jsonl"):
        texts.append(render("qwen2.5", record["messages"], record["tools"]))
    for record in _records(directory / "hf-dpo.jsonl"):
        for side in ("chosen", "rejected"):
            texts.append(render("qwen2.5", record["prompt"] + record[side], record["tools"]))
    return texts


def tokenizer_for(directory: Path) -> Any:
    """A byte-level BPE tokenizer trained on the data, with Qwen2.5's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_texts(directory), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=(TEMPLATES_DIR / TEMPLATES["qwen2.5"]).read_text(encoding="utf-8"),
    )


def tiny_model(vocab_size: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def _losses(trainer: Any) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def _trained_texts(tokenizer: Any, dataset: Any) -> list[str]:
    """Per row, the tokens that count in the loss (labels not -100), decoded."""
    texts = []
    for row in dataset:
        ids = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        texts.append(str(tokenizer.decode(ids)))
    return texts


def main(directory: Path) -> dict[str, Any]:
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    loaded = {}
    for name in ("hf", "hf-last", "hf-dpo"):
        path = directory / f"{name}.jsonl"
        dataset = datasets.load_dataset(
            "json", data_files=str(path), split="train", cache_dir=str(directory / "cache")
        )
        out[f"{name}_loaded_equal"] = [dict(r) for r in dataset] == _records(path)
        loaded[name] = dataset
    tokenizer = tokenizer_for(directory)
    common = {
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "max_length": 2048,
        "dataloader_num_workers": 0,
    }

    sft = SFTTrainer(
        model=tiny_model(len(tokenizer)),
        args=SFTConfig(output_dir=str(directory / "sft"), assistant_only_loss=True, **common),
        train_dataset=loaded["hf"],
        processing_class=tokenizer,
    )
    sft.train()
    out["sft_losses"] = _losses(sft)
    out["sft_trained_texts"] = _trained_texts(tokenizer, sft.train_dataset)

    last = SFTTrainer(
        model=tiny_model(len(tokenizer)),
        args=SFTConfig(output_dir=str(directory / "sft-last"), **common),
        train_dataset=loaded["hf-last"],
        processing_class=tokenizer,
    )
    last.train()
    out["last_losses"] = _losses(last)
    out["last_trained_texts"] = _trained_texts(tokenizer, last.train_dataset)

    policy = tiny_model(len(tokenizer))
    dpo = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),  # built from a config, so there is no path to reload
        args=DPOConfig(output_dir=str(directory / "dpo"), **common),
        train_dataset=loaded["hf-dpo"],
        processing_class=tokenizer,
    )
    dpo.train()
    out["dpo_losses"] = _losses(dpo)
    out["finite"] = all(
        math.isfinite(x) for k in ("sft_losses", "last_losses", "dpo_losses") for x in out[k]
    )
    return out


if __name__ == "__main__":
    result = main(Path(sys.argv[1]))
    print(json.dumps(result))
