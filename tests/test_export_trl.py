"""Exported files train with TRL as meant (issue 14): `datasets` loads each file row for row;
TRL's SFTTrainer (assistant-only loss on `hf`, completion-only loss on `hf --train-on last`) and
DPOTrainer (`hf-dpo`) run a few steps on a tiny randomly initialised model with a tokenizer
trained on the data. Nothing is downloaded (HF_HUB_OFFLINE=1); needs the `train` extra.

The training runs in its own process (`tests.support.trl_smoke`) so that the offline switches are set
before huggingface_hub reads them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.exporter import ROOT, read_jsonl
from tests.support.inprocess import run_exporter as run_cli
from tests.support.trainer_data import build_db

pytestmark = pytest.mark.e2e  # trains a model in a process

EXPORTS = {
    "hf": ("--format", "hf"),
    "hf-last": ("--format", "hf", "--train-on", "last"),
    "hf-dpo": ("--format", "hf-dpo"),
}


def test_trl_sft_and_dpo_train_on_the_exported_files(tmp_path: Path) -> None:
    db = tmp_path / "understudy.db"
    asyncio.run(build_db(db, variants=4))
    for name, flags in EXPORTS.items():
        result = run_cli(
            "export", "--db", str(db), "--out", str(tmp_path / f"{name}.jsonl"), *flags
        )
        assert result.returncode == 0, result.stderr
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    run = subprocess.run(
        [sys.executable, "-m", "tests.support.trl_smoke", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["hf_loaded_equal"] and out["hf-last_loaded_equal"] and out["hf-dpo_loaded_equal"]
    for key in ("sft_losses", "last_losses", "dpo_losses"):
        assert len(out[key]) == 3, out
    assert out["finite"], out
    assert out["dpo_losses"][-1] < out["dpo_losses"][0]  # the preference is being learned

    # assistant-only loss trains every call and answer, never a user turn or a tool result
    records = read_jsonl(tmp_path / "hf.jsonl")
    assert len(out["sft_trained_texts"]) == len(records)
    for record, trained in zip(records, out["sft_trained_texts"], strict=True):
        for message in record["messages"]:
            if message["role"] == "assistant":
                for call in message.get("tool_calls") or ():
                    arguments = json.dumps(call["function"]["arguments"], ensure_ascii=False)
                    assert f'"name": "{call["function"]["name"]}"' in trained
                    assert arguments in trained
                if message["content"]:
                    assert message["content"] in trained
            elif message["role"] in ("tool", "user"):
                assert message["content"] not in trained

    # --train-on last: the completion, and only it, is trained
    last = read_jsonl(tmp_path / "hf-last.jsonl")
    assert [t.removesuffix("<|im_end|>\n") for t in out["last_trained_texts"]] == [
        r["completion"][0]["content"] for r in last
    ]
