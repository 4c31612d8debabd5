"""The mamba-ssm peer (tools/mamba_ssm_peer.py): our backbones' weights under mamba-ssm's names and
config; on CUDA with mamba-ssm installed, its `generate(cg=True)` decodes our full depth's greedy
tokens (the peer runs the same model, so its speed is comparable)."""

import pytest
import torch

from meestral.tools.mamba_ssm_peer import mamba_ssm_config, mamba_ssm_state_dict


@pytest.mark.parametrize("shape", ["mamba2", "mamba"])
def test_weights_and_config_map_onto_mamba_ssm_names(tiny, shape):
    bb = tiny(shape)
    sd = mamba_ssm_state_dict(bb)
    ours = bb.model.state_dict()
    assert len(sd) == len(ours)
    assert "backbone.embedding.weight" in sd and not any(k.startswith("backbone.embeddings.") for k in sd)
    assert torch.equal(sd["backbone.embedding.weight"], ours["backbone.embeddings.weight"])
    for i in range(bb.num_layers):  # every block's mixer and norm keep HF's names
        for k in (f"backbone.layers.{i}.norm.weight", f"backbone.layers.{i}.mixer.in_proj.weight",
                  f"backbone.layers.{i}.mixer.out_proj.weight", f"backbone.layers.{i}.mixer.A_log"):
            assert torch.equal(sd[k], ours[k])
    cfg = mamba_ssm_config(bb)
    c = bb.model.config
    assert (cfg["d_model"], cfg["n_layer"], cfg["vocab_size"]) == (c.hidden_size, c.num_hidden_layers, c.vocab_size)
    assert cfg["ssm_cfg"]["layer"] == ("Mamba2" if shape == "mamba2" else "Mamba1")
    assert cfg["ssm_cfg"]["d_state"] == c.state_size and cfg["tie_embeddings"] == c.tie_word_embeddings


def test_a_transformer_is_refused(tiny):
    pytest.importorskip("mamba_ssm")
    from meestral.tools.mamba_ssm_peer import mamba_ssm_model

    with pytest.raises(ValueError, match="Mamba models only"):
        mamba_ssm_model(tiny("mistral"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ["mamba2", "mamba"])
def test_cuda_mamba_ssm_generate_equals_our_full_depth(shape):
    pytest.importorskip("mamba_ssm")
    from meestral.backbones.loading import random_backbone
    from meestral.decoding.decoder import EarlyExitDecoder
    from meestral.decoding.sampling import SamplingOptions
    from meestral.tools.mamba_ssm_peer import mamba_ssm_generate, mamba_ssm_model

    bb = random_backbone(shape, device="cuda")
    ids = [1, 40, 50, 60, 70, 80]
    ours = EarlyExitDecoder(bb, engine="graph").generate([ids], SamplingOptions(max_new_tokens=12))[0].token_ids
    assert mamba_ssm_generate(mamba_ssm_model(bb), ids, 12) == ours
