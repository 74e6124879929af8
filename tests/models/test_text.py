"""Text encoding: Wan's zero padding, the prompt cache, loading from a transformers folder.

pytest tests/models/test_text.py
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import TinyTextEncoder
from engine.models.checkpoints.validate import CheckpointError
from engine.models.text_encoder import TextEncoder, clean_prompt

SPEC = TinyTextEncoder(d_model=32)


def test_states_are_zero_past_the_prompt():
    encoder = TextEncoder.random(SPEC, text_len=24, device="cpu")
    states = encoder.encode(["a red circle", "a blue square moving up and to the left"])
    assert states.shape == (2, 24, 32)
    length = len(b"a red circle") + 1  # byte tokens + EOS
    assert states[0, :length].abs().sum(-1).min() > 0
    assert torch.all(states[0, length:] == 0)
    assert states[1].abs().sum(-1).gt(0).sum() > length


def test_cache_returns_same_states_without_recomputing(monkeypatch):
    encoder = TextEncoder.random(SPEC, text_len=16, device="cpu")
    first = encoder.encode("a green triangle")
    calls = []
    original = encoder._encode_uncached
    monkeypatch.setattr(encoder, "_encode_uncached", lambda prompts: calls.append(prompts) or original(prompts))
    assert torch.equal(encoder.encode("a green triangle"), first)
    assert calls == []
    encoder.encode(["a green triangle", "something new"])
    assert calls == [["something new"]]


def test_prompt_cleaning():
    assert clean_prompt("  a &amp; b \n\t c ") == "a & b c"


def test_loads_from_a_pipeline_folder(tmp_path):
    original = TextEncoder.random(SPEC, text_len=16, device="cpu")
    original.encoder.save_pretrained(str(tmp_path / "text_encoder"))
    original.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    for folder in (tmp_path, tmp_path / "text_encoder"):  # pipeline root, or the encoder folder
        loaded = TextEncoder.from_folder(folder, text_len=16, device="cpu")
        assert torch.equal(loaded.encode("a red circle"), original.encode("a red circle"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a transformers umT5 folder"):
        TextEncoder.from_folder(tmp_path, text_len=16, device="cpu")


def test_wan_native_repo_is_refused_with_advice(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "WanModel", "model_type": "t2v"}')
    with pytest.raises(FileNotFoundError, match="Wan2.1-T2V-1.3B-Diffusers"):
        TextEncoder.from_folder(tmp_path, text_len=16, device="cpu")


def test_loads_magis_t5_folder_as_t5(tmp_path):
    """MAGI-1 ships T5 v1.1 (model_type t5: one relative-position table, in layer 0), not umT5."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )
    T5EncoderModel(config).save_pretrained(str(tmp_path / "text_encoder"))
    ByT5Tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
    loaded = TextEncoder.from_folder(tmp_path, text_len=16, device="cpu")
    assert isinstance(loaded.encoder, T5EncoderModel)
    reference = T5EncoderModel.from_pretrained(str(tmp_path / "text_encoder"))
    tokens = loaded.tokenizer("a red circle", return_tensors="pt")
    expected = reference(input_ids=tokens.input_ids).last_hidden_state[0]
    assert torch.allclose(loaded.encode("a red circle")[0, : expected.shape[0]], expected, atol=1e-5)


def test_missing_tokenizer_folder_is_one_line(tmp_path):
    original = TextEncoder.random(SPEC, text_len=16, device="cpu")
    original.encoder.save_pretrained(str(tmp_path / "text_encoder"))
    with pytest.raises(FileNotFoundError, match="nonexistent: no such tokenizer folder") as info:
        TextEncoder.from_folder(tmp_path, text_len=16, device="cpu", tokenizer_dir=tmp_path / "nonexistent")
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: not a tokenizer folder") as info:
        TextEncoder.from_folder(tmp_path, text_len=16, device="cpu", tokenizer_dir=tmp_path / "empty")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("problem", ["int8", "nan"])
def test_encoder_weights_go_through_the_value_check(tmp_path, problem):
    original = TextEncoder.random(SPEC, text_len=16, device="cpu")
    original.encoder.save_pretrained(str(tmp_path / "text_encoder"))
    original.tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    path = tmp_path / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    key = "encoder.final_layer_norm.weight"
    state[key] = state[key].to(torch.int8) if problem == "int8" else state[key] * torch.nan
    save_file(state, str(path), metadata={"format": "pt"})
    expected = "is int8, not float32" if problem == "int8" else "has 32 NaN/inf values of 32"
    # the dtype is read from the file's header, the values from the loaded encoder (its folder)
    with pytest.raises(CheckpointError, match=rf"text_encoder(/model\.safetensors)?: tensor {key} {expected}"):
        TextEncoder.from_folder(tmp_path, text_len=16, device="cpu")
