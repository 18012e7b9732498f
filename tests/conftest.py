"""Shared fixtures: an isolated cache, tiny random models built from a config, and the real default model."""
from __future__ import annotations

import os

import pytest
import torch

WORDS = ("the a of is what who where when which capital city country france paris austria vienna harry potter "
         "wrote author school hogwarts mario brother luigi star wars jedi ring frodo question answer i don't know "
         "yes no and in on it was by for to from with that this are be has have not as at an or his her their "
         "user assistant system red green blue one two three four five six seven eight nine ten . , ? ! : ' \n").split(" ")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own cache root, so tests never see (or pollute) a user's cache."""
    root = tmp_path_factory.mktemp("dissect-cache")
    old = os.environ.get("DISSECT_UNLEARNING_CACHE")
    os.environ["DISSECT_UNLEARNING_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("DISSECT_UNLEARNING_CACHE", None)
    else:
        os.environ["DISSECT_UNLEARNING_CACHE"] = old


def make_tiny_tokenizer():
    """A word-level tokenizer with a chat template, built in memory (no files, no hub)."""
    from tokenizers import Tokenizer, models as tmodels, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted({w for w in WORDS if w}))}
    tk = Tokenizer(tmodels.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    tok.padding_side = "left"
    return tok


def make_tiny_llama(n_layers: int = 4, seed: int = 0, vocab_size: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    return model, tok


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    """(model, tokenizer): a 4-layer random Llama (hidden 32, MLP 64) with a word-level tokenizer."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model (provisioned into the session cache on first use)."""
    from dissect_unlearning import models

    return models.load(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny random Llama + tokenizer: a local checkpoint folder, usable wherever a model name is."""
    model, tok = make_tiny_llama()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
