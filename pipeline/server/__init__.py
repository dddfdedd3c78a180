"""OpenAI-compatible serving: model pool (one base, many adapters), batching engine, HTTP app."""
