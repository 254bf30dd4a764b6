"""NNX decoder (GPT-2 and Llama blocks) with token-level Q, V and LM heads.

``build(cfg)`` returns a ``QTransformer``; see ``jaxrl_lm.models.model`` for its methods.
"""

from jaxrl_lm.models.heads import valid_vocab_mask
from jaxrl_lm.models.model import QTransformer, build
from jaxrl_lm.models.transformer import KVCache

__all__ = ["KVCache", "QTransformer", "build", "valid_vocab_mask"]
