"""A local checkpoint's identity (the model part of every cache key) is a hash of its full content."""
import os
import shutil

import pytest
import torch
import transformers as T

from dissect_unlearning import models

MIB = 1 << 20


def tiny_config():
    # Big enough (about 5 MB) that the middle layers lie outside the file's first and last MiB.
    return T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture
def checkpoint(tiny_model, tmp_path):
    folder = tmp_path / "a"
    tiny_model.save_pretrained(folder)
    return folder


def weights(folder):
    return (folder / "model.safetensors").read_bytes()


def test_one_weight_element_changes_the_identity(tiny_model, checkpoint, tmp_path):
    weight = tiny_model.model.layers[3].mlp.up_proj.weight
    with torch.no_grad():
        old = weight[5, 7].item()
        weight[5, 7] += 1.0
        try:
            tiny_model.save_pretrained(tmp_path / "b")
        finally:
            weight[5, 7] = old
    a, b = weights(checkpoint), weights(tmp_path / "b")
    # Same size, same first and last MiB: only the full content tells the two apart.
    assert len(a) == len(b) > 3 * MIB and a[:MIB] == b[:MIB] and a[-MIB:] == b[-MIB:] and a != b
    assert models.identity(str(checkpoint)) != models.identity(str(tmp_path / "b"))


def test_the_same_content_in_two_folders_has_one_identity(tiny_model, checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "copy")
    tiny_model.save_pretrained(tmp_path / "saved-again")
    first = models.identity(str(checkpoint))
    assert first["kind"] == "local"
    assert models.identity(str(tmp_path / "copy")) == first == models.identity(str(tmp_path / "saved-again"))


def test_touching_a_file_keeps_the_identity(checkpoint):
    before = models.identity(str(checkpoint))
    for p in checkpoint.iterdir():
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert models.identity(str(checkpoint)) == before


def test_an_unchanged_checkpoint_is_not_read_again(checkpoint, monkeypatch):
    first = models.checkpoint_fingerprint(checkpoint)
    reads = []
    real = models._safetensors_tensor_hash
    monkeypatch.setattr(models, "_safetensors_tensor_hash", lambda path: reads.append(path) or real(path))
    assert models.checkpoint_fingerprint(checkpoint) == first
    assert reads == []


def test_a_rewritten_file_with_its_old_mtime_is_read_again(checkpoint):
    # What cp -p or rsync -t leave: other bytes, the same size and modification time.
    before = models.identity(str(checkpoint))
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = path.stat()
    tmp = checkpoint / "rewritten.tmp"
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert models.identity(str(checkpoint)) != before


def test_safetensors_metadata_does_not_count_but_other_files_do(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    before = models.identity(str(checkpoint))
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    tensors = load_file(checkpoint / "model.safetensors")
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt", "saved_by": "another tool"})
    assert weights(other) != weights(checkpoint)
    assert models.identity(str(other)) == before
    (other / ".notes").write_text("hidden files are not part of a checkpoint")
    assert models.identity(str(other)) == before
    # a chat template is not a weight, but it changes what the model is asked
    (other / "chat_template.jinja").write_text("{{ messages }}")
    assert models.identity(str(other)) != before
