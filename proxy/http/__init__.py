"""What speaks HTTP: the recorded APIs (chat completions), the pass-through, the upstream
client, the teacher, OpenAI-shaped errors, the running proxy's state and its metrics."""
