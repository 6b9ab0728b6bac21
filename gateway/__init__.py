"""gateway: a low-level streaming gateway for OpenAI-compatible LLM APIs."""
