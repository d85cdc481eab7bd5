"""Generation: sampling from checkpoints, chat, the OpenAI-compatible server."""
