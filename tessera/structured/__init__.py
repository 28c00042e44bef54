"""Structured outputs: a grammar (JSON schema, regex, choice, Lark/GBNF) per request, applied as
a token mask in the sampler so every completion follows it.

``spec`` is the request-side description (pure Python, travels with ``SamplingParams``);
``grammar`` turns it into the grammar engine's input and checks it; ``compiler`` compiles and
caches grammars off the step loop; ``matchers`` follows each constrained sequence's tokens and
fills its row of the step's token mask.
"""
