"""Random-weight Hugging Face models, for tests and benchmarks.

Models are built with transformers ``from_config`` and saved with ``save_pretrained``, with a
byte-level tokenizer (256 byte tokens plus ``<s>`` and ``</s>``), so everything runs without
downloading weights or tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BOS_ID, EOS_ID = 256, 257


def write_byte_tokenizer(out: str | Path) -> None:
    """Write a byte-level BPE tokenizer with no merges: every byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<s>"], vocab["</s>"] = BOS_ID, EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out))


def build_random_model(
    model_type: str,
    out: str | Path,
    seed: int = 0,
    tokenizer: bool = True,
    randomize_norms: bool = False,
    dtype: str = "float32",
    generation: dict[str, Any] | None = None,
    **config: Any,
) -> Any:
    """Build, save and return a random HF model (in ``dtype``, eval mode).

    ``model_type`` is a Hugging Face ``model_type`` (``llama``, ``qwen3_moe``, ...) and
    ``config`` its config's fields. With ``randomize_norms`` the norm weights are drawn from
    U(0.5, 1.5) instead of ones, so a wrongly loaded norm changes the output. ``tokenizer``
    writes the byte-level tokenizer, whose 258 ids the vocabulary must hold; ``generation``
    sets fields of the saved generation config.
    """
    import torch
    import transformers

    if tokenizer and config.get("vocab_size", 0) < EOS_ID + 1:
        raise ValueError(f"vocab_size must be at least {EOS_ID + 1} for the byte tokenizer")
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.eval()
    if randomize_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    for key, value in (generation or {}).items():
        setattr(model.generation_config, key, value)
    out = Path(out)
    model.save_pretrained(str(out))
    if tokenizer:
        write_byte_tokenizer(out)
    return model
