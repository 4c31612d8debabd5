"""Q8_0 GGUF storage: a round trip keeps names, shapes, tied weights and (within Q8_0 error)
values; a damaged file is refused."""

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from meestral.errors import MeestralError
from meestral.backbones.quantized import load_gguf, model_from_gguf, save_gguf


@pytest.fixture(scope="module")
def model():
    cfg = Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=512, state_size=32, expand=2, head_dim=32,
                       num_heads=4, n_groups=1, conv_kernel=4, chunk_size=16, tie_word_embeddings=True,
                       residual_in_fp32=True)
    torch.manual_seed(0)
    return Mamba2ForCausalLM(cfg).eval()


def test_round_trip(model, tmp_path):
    info = save_gguf(model, tmp_path / "m.gguf")
    assert info["quantised_params"] > 0 and info["float_params"] > 0
    back = model_from_gguf(tmp_path / "m.gguf")
    assert back.lm_head.weight.data_ptr() == back.backbone.embeddings.weight.data_ptr()  # still tied
    ref, got = model.state_dict(), back.state_dict()
    assert list(ref) == list(got)
    for name, t in ref.items():
        assert got[name].shape == t.shape
        err = float((got[name] - t).norm() / t.norm().clamp_min(1e-12))
        if t.dim() == 2:
            assert 0 < err < 0.01, name  # quantised: close, not equal
        else:
            assert err == 0, name  # norms, A_log, D, dt_bias, conv kernels stay float32
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


def test_damaged_file_is_refused(model, tmp_path):
    path = tmp_path / "m.gguf"
    save_gguf(model, path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(MeestralError, match="damaged"):
        load_gguf(path)


def test_not_ours_is_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(MeestralError):
        load_gguf(path)
