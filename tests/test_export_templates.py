"""Every exported Hugging Face sample rendered through the real tool-calling chat templates of
`shared/chat-templates/` (Qwen2.5, Hermes, Llama 3.1 JSON, Mistral), the way transformers renders
them: every call, its arguments and every result appear in the text, in order (issue 14).

The samples come from the real CLI reading a database written the way the recorder writes it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import TemplateError

from tests.support.exporter import read_jsonl
from tests.support.inprocess import run_exporter as run_cli
from tests.support.trainer_data import (
    TEMPLATES,
    TEMPLATES_DIR,
    build_db,
    has_parallel_calls,
    missing_in_order,
    render,
)

EXPORTS = {
    "hf": ("--format", "hf"),
    "hf-last": ("--format", "hf", "--train-on", "last"),
    "axolotl": ("--format", "axolotl", "--train-on", "tool-calls"),
    "hf-dpo": ("--format", "hf-dpo"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """name -> records the CLI wrote for each export in EXPORTS (validated by the CLI too)."""
    directory = tmp_path_factory.mktemp("templates")
    db = directory / "understudy.db"
    asyncio.run(build_db(db))
    out: dict[str, list[dict[str, Any]]] = {}
    for name, flags in EXPORTS.items():
        path = directory / f"{name}.jsonl"
        result = run_cli("export", "--db", str(db), "--out", str(path), "--json", *flags)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        # tool-calls only: conversations without a tool call have nothing to train
        allowed = {"nothing_to_train"} if "tool-calls" in flags else set()
        assert set(summary["dropped"]) <= allowed and summary["written"] > 0, summary
        fmt = flags[1]
        check = run_cli("validate", str(path), "--format", fmt, "--min-samples", "1")
        assert check.returncode == 0, check.stdout
        out[name] = read_jsonl(path)
    return out


def conversations_of(name: str, record: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The message lists a trainer renders for one record of export `name`."""
    if name == "hf-dpo":
        return [record["prompt"] + record["chosen"], record["prompt"] + record["rejected"]]
    if "prompt" in record:
        return [record["prompt"] + record["completion"]]
    return [record["messages"]]


def test_the_templates_are_the_shared_ones() -> None:
    for file in TEMPLATES.values():
        assert (TEMPLATES_DIR / file).is_file(), f"missing {TEMPLATES_DIR / file}"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_every_call_argument_and_result_renders_in_order(
    exported: dict[str, list[dict[str, Any]]], name: str, template: str
) -> None:
    records = exported[name]
    rendered = skipped = 0
    for record in records:
        for messages in conversations_of(name, record):
            if template == "llama3.1" and has_parallel_calls(messages):
                # the template's own limit (see the templates' README), not the data's
                with pytest.raises(TemplateError, match="single tool-calls"):
                    render(template, messages, record["tools"])
                skipped += 1
                continue
            text = render(template, messages, record["tools"])
            assert missing_in_order(text, messages, template) == [], (name, template, text)
            rendered += 1
    assert rendered >= len(records) - skipped and rendered > 0


def test_mistral_takes_the_renumbered_ids_and_would_refuse_the_old_ones(
    exported: dict[str, list[dict[str, Any]]],
) -> None:
    record = next(r for r in exported["hf"] if any(m.get("tool_calls") for m in r["messages"]))
    ids = [c["id"] for m in record["messages"] for c in m.get("tool_calls") or ()]
    assert ids == [f"call{n:05d}" for n in range(1, len(ids) + 1)]
    text = render("mistral", record["messages"], record["tools"])
    assert all(f'"id": "{i}"' in text and f'"call_id": "{i}"' in text for i in ids)
    old = json.loads(json.dumps(record).replace('"call00001"', '"call_1"'))
    with pytest.raises(TemplateError, match="alphanumeric strings with length >= 9"):
        render("mistral", old["messages"], old["tools"])


def test_parallel_results_stay_in_order_under_qwen_grouping(
    exported: dict[str, list[dict[str, Any]]],
) -> None:
    record = next(r for r in exported["hf"] if has_parallel_calls(r["messages"]))
    text = render("qwen2.5", record["messages"], record["tools"])
    # Qwen groups consecutive tool results in one user turn, each in its own tool_response
    assert text.count("<tool_response>") == 3
    assert "<|im_start|>user\n<tool_response>\nrefunded 1000\n</tool_response>\n" in text
    assert "<tool_response>\nrefunded 1001\n</tool_response><|im_end|>" in text


def test_axolotl_training_flags_follow_train_on(
    exported: dict[str, list[dict[str, Any]]],
) -> None:
    for record in exported["axolotl"]:
        for message in record["messages"]:
            expected = message["role"] == "assistant" and bool(message.get("tool_calls"))
            assert message["training"] is expected


def test_template_file_path_is_where_ci_finds_it(tmp_path: Path) -> None:
    # CI lays shared/ beside the clone: the default path must not depend on the machine
    assert TEMPLATES_DIR.name == "chat-templates" and TEMPLATES_DIR.parent.name == "shared"


def test_the_order_check_catches_a_lost_or_moved_result(
    exported: dict[str, list[dict[str, Any]]],
) -> None:
    record = next(r for r in exported["hf"] if has_parallel_calls(r["messages"]))
    messages = record["messages"]
    text = render("qwen2.5", messages, record["tools"])
    assert missing_in_order(text, messages, "qwen2.5") == []
    assert missing_in_order(text.replace("refunded 1001", ""), messages, "qwen2.5") != []
    swapped = text.replace("refunded 1000", "@@").replace("refunded 1001", "refunded 1000")
    assert missing_in_order(swapped.replace("@@", "refunded 1001"), messages, "qwen2.5") != []
    renamed = text.replace('"name": "refund_order"', '"name": "other"')
    assert missing_in_order(renamed, messages, "qwen2.5") != []
