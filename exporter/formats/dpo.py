"""OpenAI preference (DPO) format, from exchanges that have a shadow answer.

Shape: `{"input": {"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool},
"preferred_output": [assistant message], "non_preferred_output": [assistant message]}`.
The preferred output is the teacher's shadow answer, the non-preferred one the student's answer
that the app received (issue 4: a shadow is recorded beside a student answer, never returned).
`input.messages` are the exchange's request messages under the same rules as the chat format
(ids renumbered, arguments as JSON strings, ...), ending with a user or tool message; each output
is one assistant message (text or tool calls). Source: OpenAI fine-tuning guide, "preference
fine-tuning" (`method: {"type": "dpo"}`).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from exporter.messages import Rejected, normalize_message, normalize_tools, pair_and_renumber
from exporter.samples import response_message, set_system_prompt, without_tool_descriptions


def _comparable(message: dict[str, Any]) -> str:
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls") or ()
    ]
    return json.dumps([message.get("content", ""), calls], sort_keys=True)


def build_pair(
    request: dict[str, Any],
    student_response: dict[str, Any] | None,
    teacher_response: dict[str, Any] | None,
    *,
    system_prompt: str | None = None,
    drop_system: bool = False,
    strip_tool_descriptions: bool = False,
) -> dict[str, Any]:
    """The preference record for one request with two answers.

    request: the client's request body; student_response / teacher_response: `chat.completion`
    dicts (the answer returned, the shadow answer). Raises Rejected: 'no_shadow_answer',
    'incomplete' (no student answer), 'invalid_input' (the input ends with an assistant
    message), 'identical_answers', and every rule of `samples.build_conversation`.
    """
    raw = request.get("messages")
    if not isinstance(raw, list) or not raw:
        raise Rejected("unreadable", "request has no messages")
    teacher = response_message(teacher_response)
    student = response_message(student_response)
    if teacher is None:
        raise Rejected("no_shadow_answer", "the shadow answer has no message")
    if student is None:
        raise Rejected("incomplete", "the student answer has no message")
    inputs = [normalize_message(m, i) for i, m in enumerate(raw)]
    if inputs[-1]["role"] == "assistant":
        raise Rejected("invalid_input", "the input ends with an assistant message")
    outputs = []
    for answer in (teacher, student):
        message = normalize_message({**answer, "role": "assistant"}, len(inputs))
        outputs.append(pair_and_renumber([*copy.deepcopy(inputs), message]))
    preferred, non_preferred = outputs[0][-1], outputs[1][-1]
    if _comparable(preferred) == _comparable(non_preferred):
        raise Rejected("identical_answers", "the teacher and the student answered the same")
    tools = normalize_tools(request)
    declared = {t["function"]["name"] for t in tools}
    for message in [*outputs[0], non_preferred]:
        for call in message.get("tool_calls") or ():
            if call["function"]["name"] not in declared:
                raise Rejected(
                    "undeclared_tool",
                    f"tool call to {call['function']['name']!r}, which the request's tools lack",
                )
    input_messages = set_system_prompt(outputs[0][:-1], system_prompt, drop_system)
    record_input: dict[str, Any] = {"messages": input_messages}
    if tools:
        record_input["tools"] = (
            without_tool_descriptions(tools) if strip_tool_descriptions else tools
        )
        parallel = request.get("parallel_tool_calls")
        if isinstance(parallel, bool):
            record_input["parallel_tool_calls"] = parallel
    return {
        "input": record_input,
        "preferred_output": [preferred],
        "non_preferred_output": [non_preferred],
    }
