"""Tiny Hugging Face models built from configs (no hub access)."""

import torch

transformers = __import__("pytest").importorskip("transformers")


def _decoder(family, **overrides):
    """A 3-layer decoder of a Llama-like family ("Llama", "Mistral", "Qwen2")."""
    options = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg = getattr(transformers, f"{family}Config")(**{**options, **overrides})
    return getattr(transformers, f"{family}ForCausalLM")(cfg)


def llama():
    return _decoder("Llama")


def mistral():
    return _decoder("Mistral")


def qwen2():
    return _decoder("Qwen2")


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


MODELS = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "gpt2": gpt2, "bert": bert}
TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": "all-linear",
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value"],
}


def make(name, seed=0):
    torch.manual_seed(seed)
    m = MODELS[name]()
    m.eval()
    return m


def batch(name, seed=1, n=2, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, t), generator=g)
    if name == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (n,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def char_tokenizer():
    """A character-level tokenizer for the tiny decoders (vocab 64 at most; no hub access), with
    pad / bos / eos tokens and a chat template, as trainers that tokenize text (TRL) need."""
    import string
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from study_gsm8k import char_tokenizer as make

    tok = make(string.ascii_lowercase + string.digits + " .,?:+-=#\n")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tok


def chat_llama(seed=0):
    """The tiny Llama with the char tokenizer's special tokens."""
    torch.manual_seed(seed)
    return _decoder("Llama", max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
