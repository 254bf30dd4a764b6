"""NNX decoder (GPT-2 and Llama blocks) with token-level Q, V and LM heads.

``build(cfg)`` returns a ``QTransformer``; see ``jaxrl_lm.models.model`` for its methods. ``split_model`` splits
one into its static graph and its ``Params`` dict; ``model_graphdef`` gives the graph without building weights.
Format conversion (Hugging Face, GGUF) lives in ``jaxrl_lm.interop``.
"""

from jaxrl_lm.models.heads import valid_vocab_mask
from jaxrl_lm.models.model import Params, QTransformer, build, model_graphdef, split_model
from jaxrl_lm.models.transformer import KVCache

__all__ = ["KVCache", "Params", "QTransformer", "build", "model_graphdef", "split_model", "valid_vocab_mask"]
