"""A tiny BERT embedding model written as a GGUF at test time (random weights, 97 KB).

Real enough for llama.cpp to load and run: BERT's tensors and hyperparameters, a WordPiece
vocabulary of 64 tokens ("w0" .. "w58" and the specials) and, unless told otherwise, mean
pooling. Its vectors mean nothing; the tests compare them with llama-cpp-python's own
``Llama(embedding=True)`` on the same file.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

WORDS = [f"w{i}" for i in range(59)]


def write_tiny_bert(
    path: Path, *, pooling: gguf.PoolingType | None = gguf.PoolingType.MEAN, n_ctx: int = 128
) -> Path:
    rng = np.random.default_rng(0)
    n_embd, n_ff, n_layer = 32, 64, 2
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + ["\u2581" + w for w in WORDS]  # llama.cpp's WordPiece: word starts marked
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    if pooling is not None:
        w.add_pooling_type(pooling)
    w.add_token_type_count(2)
    w.add_tokenizer_model("bert")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * len(WORDS))
    w.add_pad_token_id(0)
    w.add_unk_token_id(1)
    w.add_bos_token_id(2)  # [CLS]
    w.add_eos_token_id(3)  # [SEP]
    w.add_sep_token_id(3)
    w.add_mask_token_id(4)

    def random(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    def norm(name: str, size: int) -> None:
        w.add_tensor(f"{name}.weight", np.ones(size, np.float32))
        w.add_tensor(f"{name}.bias", np.zeros(size, np.float32))

    random("token_embd.weight", len(vocab), n_embd)
    random("token_types.weight", 2, n_embd)
    random("position_embd.weight", n_ctx, n_embd)
    norm("token_embd_norm", n_embd)
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            random(f"blk.{i}.{name}.weight", n_embd, n_embd)
            random(f"blk.{i}.{name}.bias", n_embd)
        norm(f"blk.{i}.attn_output_norm", n_embd)
        norm(f"blk.{i}.layer_output_norm", n_embd)
        random(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        random(f"blk.{i}.ffn_up.bias", n_ff)
        random(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        random(f"blk.{i}.ffn_down.bias", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
