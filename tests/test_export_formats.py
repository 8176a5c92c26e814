"""The open-model formats: hf rendered through a real tool-aware chat template (jinja2, Hermes/Qwen
style) without losing a tool call, ShareGPT's alternation and parallel calls, DPO pairs."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from exporter.formats import axolotl, hf, hf_dpo, sharegpt
from exporter.formats.dpo import build_pair
from exporter.options import ExportOptions, OptionsError, trainer_notes
from exporter.samples import Rejected, apply_options, build_conversation
from exporter.validate import validate_record

# A chat template in the style of Qwen2.5 / Hermes 2 Pro: tools in the system turn, calls as
# <tool_call>{"name", "arguments": OBJECT}</tool_call>, results as <tool_response> in a user turn.
QWEN_STYLE_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif -%}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for tool_call in message.tool_calls %}<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user
{% endif %}<tool_response>
{{ message.content }}
</tool_response>
{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}
{%- endif %}
{%- endfor %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
        },
    },
]


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def conversation(final: str = "Sunny, 21:00.") -> Any:
    request = {
        "model": "gpt-4.1-mini",
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": "You are a travel agent."},
            {"role": "user", "content": "Weather and time in Paris and Oslo? <b>now</b>"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    call("x1", "get_weather", {"city": "Paris"}),
                    call("x2", "get_weather", {"city": "Oslo"}),
                ],
            },
            {"role": "tool", "tool_call_id": "x1", "content": "Paris: sunny"},
            {
                "role": "tool",
                "tool_call_id": "x2",
                "content": [{"type": "text", "text": "Oslo: snow"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("x3", "get_time", {"tz": "Europe/Paris"})],
            },
            {"role": "tool", "tool_call_id": "x3", "content": "21:00"},
        ],
    }
    response = {
        "choices": [{"message": {"role": "assistant", "content": final}, "finish_reason": "stop"}]
    }
    return build_conversation(request, response)


def render_template(record: dict[str, Any]) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env.from_string(QWEN_STYLE_TEMPLATE).render(
        messages=record["messages"], tools=record["tools"]
    )


def test_hf_renders_through_a_tool_aware_chat_template_without_losing_a_call() -> None:
    record = hf.render(conversation())
    assert validate_record(record, "hf") == []
    text = render_template(record)
    rendered_calls = [
        json.loads(block) for block in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text)
    ]
    assert rendered_calls == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "get_time", "arguments": {"tz": "Europe/Paris"}},
    ]
    assert re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text) == [
        "Paris: sunny",
        "Oslo: snow",
        "21:00",
    ]
    assert text.count("<|im_start|>user\n<tool_response>") == 2  # parallel results share one turn
    assert "<|im_start|>assistant\nSunny, 21:00.<|im_end|>" in text
    assert '"name": "get_weather"' in text.split("</tools>")[0]


def test_hf_record_shape() -> None:
    record = hf.render(apply_options(conversation()))
    assert set(record) == {"messages", "tools"}
    assistant = record["messages"][2]
    assert assistant["content"] == "" and "weight" not in assistant
    assert assistant["tool_calls"][0] == {
        "id": "call00001",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert record["messages"][3] == {
        "role": "tool",
        "tool_call_id": "call00001",
        "name": "get_weather",
        "content": "Paris: sunny",
    }
    assert record["tools"] == TOOLS
    assert (
        hf.render(
            build_conversation(
                {"messages": [{"role": "user", "content": "q"}]},
                {"choices": [{"message": {"role": "assistant", "content": "a"}}]},
            )
        )["tools"]
        == []
    )


def test_hf_train_on_last_is_trl_prompt_completion() -> None:
    full = hf.render(apply_options(conversation()))
    record = hf.render(apply_options(conversation(), train_on="last"))
    assert set(record) == {"prompt", "completion", "tools"}
    assert record["prompt"] == full["messages"][:-1]
    assert record["completion"] == [{"role": "assistant", "content": "Sunny, 21:00."}]
    assert validate_record(record, "hf") == []
    with pytest.raises(ValueError, match="only the last one"):
        hf.render(apply_options(conversation(), train_on="tool-calls"))


def test_axolotl_marks_every_message_trained_or_not() -> None:
    for train_on, trained in (
        ("all", [False, False, True, False, False, True, False, True]),
        ("tool-calls", [False, False, True, False, False, True, False, False]),
        ("final", [False, False, False, False, False, False, False, True]),
        ("last", [False, False, False, False, False, False, False, True]),
    ):
        record = axolotl.render(apply_options(conversation(), train_on=train_on))
        assert [m["training"] for m in record["messages"]] == trained, train_on
        assert validate_record(record, "axolotl") == []
        hf_view = [{k: v for k, v in m.items() if k != "training"} for m in record["messages"]]
        assert hf_view == hf.render(apply_options(conversation()))["messages"]
    broken = axolotl.render(apply_options(conversation(), train_on="final"))
    broken["messages"][1]["training"] = "yes"
    assert any("training must be true or false" in e for e in validate_record(broken, "axolotl"))


def test_sharegpt_alternates_with_parallel_calls_as_a_list() -> None:
    record = sharegpt.render(conversation())
    assert validate_record(record, "sharegpt") == []
    assert record["system"] == "You are a travel agent."
    assert [t["from"] for t in record["conversations"]] == [
        "human",
        "function_call",
        "observation",
        "function_call",
        "observation",
        "gpt",
    ]
    assert json.loads(record["conversations"][1]["value"]) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
    ]
    assert json.loads(record["conversations"][3]["value"]) == {
        "name": "get_time",
        "arguments": {"tz": "Europe/Paris"},
    }
    # parallel results: one observation holding the JSON array of results, in call order,
    # with no model family's tags
    assert json.loads(record["conversations"][2]["value"]) == ["Paris: sunny", "Oslo: snow"]
    assert "tool_response" not in json.dumps(record)
    assert record["conversations"][4]["value"] == "21:00"
    assert json.loads(record["tools"]) == [t["function"] for t in TOOLS]


def test_sharegpt_refuses_what_it_cannot_hold() -> None:
    base = conversation()
    with_text = apply_options(base)
    with_text.messages[2]["content"] = "Let me check."
    with pytest.raises(Rejected, match="text beside tool calls"):
        sharegpt.render(with_text)
    two_users = build_conversation(
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"choices": [{"message": {"role": "assistant", "content": "c"}}]},
    )
    with pytest.raises(Rejected, match="expected gpt or function_call"):
        sharegpt.render(two_users)


def test_dpo_pair_teacher_preferred_student_not() -> None:
    request = {
        "model": "gpt-4.1-mini",
        "tools": TOOLS,
        "parallel_tool_calls": True,
        "messages": [
            {"role": "developer", "content": "sys"},
            {"role": "user", "content": "Weather in Paris?"},
        ],
    }
    student = {
        "choices": [
            {"message": {"role": "assistant", "content": "Probably sunny.", "refusal": None}}
        ]
    }
    teacher = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("t1", "get_weather", {"city": "Paris"})],
                }
            }
        ]
    }
    record = build_pair(request, student, teacher)
    assert validate_record(record, "dpo") == []
    assert record["input"]["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    assert record["input"]["parallel_tool_calls"] is True
    assert record["preferred_output"] == [
        {"role": "assistant", "tool_calls": [call("call00001", "get_weather", {"city": "Paris"})]}
    ]
    assert record["non_preferred_output"] == [{"role": "assistant", "content": "Probably sunny."}]
    trl = hf_dpo.render_pair(record)
    assert validate_record(trl, "hf-dpo") == []
    assert trl == {
        "prompt": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        "chosen": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call00001",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            }
        ],
        "rejected": [{"role": "assistant", "content": "Probably sunny."}],
        "tools": TOOLS,
    }
    with pytest.raises(Rejected, match="identical_answers"):
        build_pair(request, student, student)
    with pytest.raises(Rejected, match="no_shadow_answer"):
        build_pair(request, student, None)


def test_train_on_is_refused_where_the_trainer_cannot_express_it() -> None:
    accepted = {
        "openai": {"all", "final", "tool-calls", "last"},
        "axolotl": {"all", "final", "tool-calls", "last"},
        "hf": {"all", "last"},
        "sharegpt": {"all", "last"},
        "dpo": {"all"},
        "hf-dpo": {"all"},
    }
    for fmt, choices in accepted.items():
        for train_on in ("all", "final", "tool-calls", "last"):
            options = ExportOptions(format=fmt, train_on=train_on)
            if train_on in choices:
                options.check()
                continue
            with pytest.raises(OptionsError) as info:
                options.check()
            message = str(info.value)
            assert f"--train-on {train_on}" in message and "\n" not in message
            assert ("preference pair" in message) == fmt.endswith("dpo")
            if fmt in ("hf", "sharegpt"):
                assert "--format axolotl" in message
    assert trainer_notes("sharegpt", "last") == [
        "LLaMA-Factory: set mask_history: true to train the last turn only"
    ]
    assert "message_field_training: training" in trainer_notes("axolotl", "final")[0]
    assert "completion" in trainer_notes("hf", "last")[0]
    assert trainer_notes("openai", "final") == [] and trainer_notes("sharegpt", "all") == []
