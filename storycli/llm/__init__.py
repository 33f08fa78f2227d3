"""`storydiff plan`: write a story file with a language model, or name every character reference
in an existing one.

One job per module, imported in this order (never the CLI): `schema` (the JSON contract the
model must answer in), `prompts` (what it is asked), `client` (one OpenAI-compatible HTTP call,
its failures as one sentence), `planner` (ask, validate, retry with the problem), `to_story`
(a plan as story YAML that validates), `resolve` (pronouns → `[Name]` tags, edited in place).

httpx is an optional dependency (`pip install 'storydiff[llm]'`), imported only when a request
is made; nothing else in storydiff talks to the network.
"""
