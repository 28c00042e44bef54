"""The OpenAI-compatible server: an API process (FastAPI) in front of an engine-core process
per served model.

Each engine core runs ``LLMEngine.step`` in a loop in its own process and talks to the API
process over ZeroMQ with the typed messages of ``tessera.messages.core``; tokenization,
detokenization and stop strings stay in the API process.
"""
