"""Everything that talks to a model: vLLM server processes, the agent and judge clients, the embedding scorer.

Imports nothing heavy here; each module imports vllm/openai/torch/sentence-transformers where it needs them.
"""
