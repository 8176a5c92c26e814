"""Understudy's exporter: recorded trajectories -> training files (OpenAI JSONL, TRL, LLaMA-Factory, DPO).

Layout: `messages` and `samples` (pure sample building), `formats/` (one module per output
format), `validate` and `validate_file` (pure validation), `tokens` (offline token counts, limits,
prices), `reader` (rows from the database), `building` (rows -> rendered, token-counted lines, what
each worker runs), `api` (the pipeline the CLI and the dashboard share),
`options` (export options and summary), `cli` and `commands` (argparse and the four commands),
`report` (rich output), `upload` (openai SDK). Nothing runs at import; the CLI imports a
command's libraries (SQLAlchemy, rich, the openai SDK) only when that command runs.
"""
