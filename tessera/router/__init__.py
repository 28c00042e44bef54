"""``tessera router``: one OpenAI-compatible endpoint in front of running Tessera servers."""
