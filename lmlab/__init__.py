"""lmlab: the modern LLM stack, end to end, in one readable package.

    lmlab.model      the configurable transformer, KV cache, checkpoints, HF conversion, counting
    lmlab.tokenizer  tokenizers that travel with checkpoints
    lmlab.infer      sampling and generation
    lmlab.cli        the `lmlab` command
"""

__version__ = "0.1.0"
