"""Exit heads: persistence (round trip, identity checks, corruption, atomic save), argument
checks and the training-free confidences."""

import json
import math
import os

import pytest
import torch

from meestral.decoding.decoder import EarlyExitDecoder, SamplingOptions
from meestral.decoding.config import ExitConfig
from meestral.errors import MeestralError
from meestral.decoding.heads import KINDS, ExitHeads, check_exit_points, check_thresholds

L = 6  # every tiny shape used here has 6 layers (mistral-sw: 4)


# ---- helpers ----------------------------------------------------------------------------------
def randomize_classifiers(heads, seed=0):
    """Give every exit point's classifier its own random weights (an untrained head is all zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.classifiers.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return heads


def random_inputs(bb, heads, n=5, seed=0):
    """(h, aux, prev_h) of shape [n, d] for every exit point, plus the logits of h."""
    g = torch.Generator().manual_seed(seed)
    d = bb.hidden_size
    out = []
    for _ in heads.exit_points:
        h = torch.randn(n, d, generator=g) * 3
        aux = torch.randn(n, d, generator=g) if bb.aux_dim() else None
        prev = h + torch.randn(n, d, generator=g)
        out.append((h, aux, prev, bb.logits(h)))
    return out


def confidences(heads, inputs):
    return [heads.confidence(j, h, aux, prev, lg) for j, (h, aux, prev, lg) in enumerate(inputs)]


# ---- save / load round trip --------------------------------------------------------------------
ROUND_TRIP = [
    ("mistral", "hidden", 0),
    ("mistral", "hidden", 8),  # MLP classifier
    ("mamba2", "hidden", 0),
    ("mamba", "hidden+aux", 0),
    ("mamba2", "hidden+aux", 8),
]


@pytest.mark.parametrize("shape,features,mlp", ROUND_TRIP)
def test_classifier_round_trip_keeps_every_head(tiny, tmp_path, shape, features, mlp):
    bb = tiny(shape)
    heads = randomize_classifiers(ExitHeads("classifier", [0, 2, 4], bb, features=features, mlp_hidden=mlp))
    sd = {k: v.clone() for k, v in heads.state_dict().items()}
    # Sanity: the heads really differ from each other, so "every head got head 0's weights" shows.
    w = [sd[k] for k in sorted(sd) if k.endswith("weight") and k.startswith("classifiers.")]
    per_head = len(w) // 3
    for j in (1, 2):
        assert not torch.equal(w[0], w[j * per_head])

    inputs = random_inputs(bb, heads)
    before = confidences(heads, inputs)
    heads.save(tmp_path / "h")
    loaded = ExitHeads.load(tmp_path / "h", bb)

    assert loaded.kind == "classifier"
    assert loaded.exit_points == [0, 2, 4]
    assert loaded.features == features and loaded.mlp_hidden == mlp
    assert loaded.meta() == heads.meta()
    got = loaded.state_dict()
    assert set(got) == set(sd)
    for j in range(3):
        mine = {k: v for k, v in sd.items() if k.startswith(f"classifiers.{j}.")}
        assert mine, f"no parameters for head {j}"
        for k, v in mine.items():
            assert torch.equal(got[k], v), f"head {j}: {k} did not round-trip to its own values"
    after = confidences(loaded, inputs)
    for j, (a, b) in enumerate(zip(before, after)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"confidence of head {j} changed")
    # And the heads still give different confidences on the same input.
    h, aux = inputs[0][0], inputs[0][1]
    assert not torch.allclose(loaded.confidence(0, h, aux), loaded.confidence(1, h, aux))


@pytest.mark.parametrize("shape", ["mistral", "mamba"])
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "classifier"])
def test_training_free_round_trip(tiny, tmp_path, shape, kind):
    bb = tiny(shape)
    heads = ExitHeads(kind, [3, 1], bb)
    inputs = random_inputs(bb, heads)
    before = confidences(heads, inputs)
    heads.save(tmp_path / "h")
    loaded = ExitHeads.load(tmp_path / "h", bb)
    assert loaded.kind == kind
    assert loaded.exit_points == [1, 3]
    assert loaded.meta() == heads.meta()
    assert loaded.identity == bb.identity()
    for a, b in zip(before, confidences(loaded, inputs)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_save_twice_is_atomic_and_leaves_nothing_behind(tiny, tmp_path):
    bb = tiny("mistral")
    parent = tmp_path / "parent"
    first = randomize_classifiers(ExitHeads("classifier", [1, 3], bb), seed=1)
    second = randomize_classifiers(ExitHeads("classifier", [1, 3], bb), seed=2)
    first.save(parent / "heads")
    second.save(parent / "heads")
    assert sorted(os.listdir(parent)) == ["heads"], "temp or .old folders left in the parent directory"
    assert sorted(os.listdir(parent / "heads")) == ["heads.json", "heads.safetensors"]
    loaded = ExitHeads.load(parent / "heads", bb)
    for k, v in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), "the second save did not replace the first"


# ---- features="hidden+aux" ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["mamba", "mamba2"])
def test_hidden_plus_aux_on_mamba_uses_both(tiny, shape):
    bb = tiny(shape)
    heads = randomize_classifiers(ExitHeads("classifier", [1, 3], bb, features="hidden+aux"))
    assert heads.feature_dim == bb.hidden_size + bb.aux_dim()
    g = torch.Generator().manual_seed(3)
    h, aux = torch.randn(4, bb.hidden_size, generator=g), torch.randn(4, bb.aux_dim(), generator=g)
    base = heads.confidence(0, h, aux)
    assert base.shape == (4,)
    assert ((0 <= base) & (base <= 1)).all()
    assert not torch.allclose(heads.confidence(0, h, torch.randn(aux.shape, generator=g)), base), "aux ignored"
    assert not torch.allclose(heads.confidence(0, torch.randn(h.shape, generator=g), aux), base), "hidden ignored"


@pytest.mark.parametrize("shape", ["mamba", "mamba2"])
def test_hidden_plus_aux_heads_drive_the_decoder(tiny, shape):
    bb = tiny(shape)
    heads = ExitHeads("classifier", [1, 3], bb, features="hidden+aux")
    with torch.no_grad():
        heads.classifiers[0].bias.fill_(10.0)  # always confident at the first exit point
    dec = EarlyExitDecoder(bb, ExitConfig(heads=heads, thresholds=0.5))
    gen = dec.generate([[1, 40, 50, 60]], SamplingOptions(max_new_tokens=4))[0]
    assert [s.exit_layer for s in gen.stats if not s.prefill] == [1, 1, 1]


@pytest.mark.parametrize("shape", ["mistral", "llama"])
def test_hidden_plus_aux_refused_on_transformer(tiny, shape):
    with pytest.raises(MeestralError, match="hidden\\+aux"):
        ExitHeads("classifier", [1, 3], tiny(shape), features="hidden+aux")


# ---- loading onto another backbone -------------------------------------------------------------
@pytest.mark.parametrize("src,dst,key", [
    (("mistral", 1), ("mistral", 0), "fingerprint"),  # same shape, other weights
    (("mistral", 0), ("llama", 0), "arch"),
    (("mamba", 0), ("mamba2", 0), "arch"),
    (("mistral", 0), ("mistral-sw", 0), "num_layers"),  # same arch, 4 layers instead of 6
])
@pytest.mark.parametrize("kind", ["classifier", "softmax"])
def test_load_onto_another_backbone_is_refused(tiny, tmp_path, src, dst, key, kind):
    a, b = tiny(*src), tiny(*dst)
    ExitHeads(kind, [1, 2], a).save(tmp_path / "h")
    with pytest.raises(MeestralError) as e:
        ExitHeads.load(tmp_path / "h", b)
    msg = str(e.value)
    assert a.name in msg and b.name in msg, msg
    assert key in msg, msg


def test_decoder_refuses_heads_of_another_backbone(tiny):
    heads = ExitHeads("softmax", [1], tiny("mistral", 1))
    with pytest.raises(MeestralError):
        EarlyExitDecoder(tiny("mistral"), ExitConfig(heads=heads, thresholds=0.5))


# ---- corrupted folders -------------------------------------------------------------------------
@pytest.fixture
def saved(tiny, tmp_path):
    bb = tiny("mistral")
    folder = randomize_classifiers(ExitHeads("classifier", [1, 3], bb)).save(tmp_path / "h")
    return bb, folder


def _drop(key):
    def mutate(folder):
        meta = json.loads((folder / "heads.json").read_text())
        del meta[key]
        (folder / "heads.json").write_text(json.dumps(meta))
    return mutate


def _truncate(folder):
    p = folder / "heads.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


CORRUPTIONS = {
    "json_not_json": lambda f: (f / "heads.json").write_text("{this is not json"),
    "json_empty": lambda f: (f / "heads.json").write_text(""),
    "json_a_list": lambda f: (f / "heads.json").write_text("[1, 2]"),
    "json_no_kind": _drop("kind"),
    "json_no_exit_points": _drop("exit_points"),
    "json_no_backbone": _drop("backbone"),
    "safetensors_truncated": _truncate,
    "safetensors_random": lambda f: (f / "heads.safetensors").write_bytes(os.urandom(256)),
    "safetensors_missing": lambda f: (f / "heads.safetensors").unlink(),
    "no_heads_json": lambda f: (f / "heads.json").unlink(),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_heads_folder_raises_meestral_error(saved, name):
    bb, folder = saved
    CORRUPTIONS[name](folder)
    with pytest.raises(MeestralError) as e:
        ExitHeads.load(folder, bb)
    assert str(folder) in str(e.value)


def _flip_a_weight_byte(folder):
    """Flip one byte inside the tensor data (past the safetensors header): still a valid file."""
    p = folder / "heads.safetensors"
    data = bytearray(p.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 3] ^= 0x40
    p.write_bytes(bytes(data))


def test_flipped_weight_bytes_are_caught_by_the_checksum(saved):
    bb, folder = saved
    from safetensors.torch import load_file

    before = {k: v.clone() for k, v in load_file(str(folder / "heads.safetensors")).items()}  # not a view of the file
    _flip_a_weight_byte(folder)
    after = load_file(str(folder / "heads.safetensors"))  # it parses: only the checksum can tell
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(MeestralError, match="does not match the checksum"):
        ExitHeads.load(folder, bb)


def test_heads_saved_without_a_checksum_still_load(saved):
    """Folders written before checksums existed (no sha256 in heads.json) load as before."""
    bb, folder = saved
    meta = json.loads((folder / "heads.json").read_text())
    (folder / "heads.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    assert ExitHeads.load(folder, bb).exit_points == [1, 3]


def test_folder_that_does_not_exist(tiny, tmp_path):
    with pytest.raises(MeestralError, match="heads.json"):
        ExitHeads.load(tmp_path / "nothing here", tiny("mistral"))


def test_heads_json_random_bytes(saved):
    bb, folder = saved
    (folder / "heads.json").write_bytes(b"\x96\xff\x00\x81" + os.urandom(60))
    with pytest.raises(MeestralError):
        ExitHeads.load(folder, bb)


def test_heads_json_backbone_not_a_dict(saved):
    bb, folder = saved
    meta = json.loads((folder / "heads.json").read_text())
    (folder / "heads.json").write_text(json.dumps({**meta, "backbone": "random:mistral"}))
    with pytest.raises(MeestralError):
        ExitHeads.load(folder, bb)


def test_heads_json_mlp_hidden_not_a_number(saved):
    bb, folder = saved
    meta = json.loads((folder / "heads.json").read_text())
    (folder / "heads.json").write_text(json.dumps({**meta, "mlp_hidden": "eight"}))
    with pytest.raises(MeestralError):
        ExitHeads.load(folder, bb)


def test_heads_json_is_a_directory(saved):
    bb, folder = saved
    (folder / "heads.json").unlink()
    (folder / "heads.json").mkdir()
    with pytest.raises(MeestralError):
        ExitHeads.load(folder, bb)


# ---- check_exit_points -------------------------------------------------------------------------
@pytest.mark.parametrize("points", [[-1], [L - 1], [L], [99], [0, L - 1]], ids=str)
def test_exit_points_out_of_range(points):
    with pytest.raises(MeestralError, match="out of range"):
        check_exit_points(points, L)


@pytest.mark.parametrize("points", [[1, 1], [3, 1, 3]], ids=str)
def test_exit_points_duplicated(points):
    with pytest.raises(MeestralError, match="twice"):
        check_exit_points(points, L)


def test_exit_points_empty():
    with pytest.raises(MeestralError, match="no exit points"):
        check_exit_points([], L)


@pytest.mark.parametrize("points", [["a"], [None], None, [[1]]], ids=str)
def test_exit_points_not_integers(points):
    with pytest.raises(MeestralError, match="integers"):
        check_exit_points(points, L)


def test_exit_points_fractional_refused():
    with pytest.raises(MeestralError):
        check_exit_points([1.5], L)


def test_exit_points_sorted_and_edges():
    assert check_exit_points([4, 0, 2], L) == [0, 2, 4]
    assert check_exit_points([0, L - 2], L) == [0, L - 2]
    assert check_exit_points((3, 1), L) == [1, 3]


def test_heads_keep_exit_points_sorted(tiny):
    assert ExitHeads("static", [3, 0, 2], tiny("mistral")).exit_points == [0, 2, 3]


# ---- check_thresholds --------------------------------------------------------------------------
@pytest.mark.parametrize("th", [float("nan"), -0.1, 1.5, float("inf"), [0.5, float("nan"), 0.5]], ids=str)
def test_thresholds_out_of_range(th):
    with pytest.raises(MeestralError, match="outside"):
        check_thresholds(th, 3)


@pytest.mark.parametrize("th", [[0.1, 0.2], [0.1, 0.2, 0.3, 0.4], []], ids=str)
def test_thresholds_wrong_count(th):
    with pytest.raises(MeestralError, match="thresholds for 3 exit points"):
        check_thresholds(th, 3)


def test_thresholds_broadcast_and_pass_through():
    assert check_thresholds(0.7, 3) == [0.7, 0.7, 0.7]
    assert check_thresholds(1, 2) == [1.0, 1.0]
    assert check_thresholds([0.25], 3) == [0.25, 0.25, 0.25]
    assert check_thresholds([0.0, 0.5, 1.0], 3) == [0.0, 0.5, 1.0]
    assert all(isinstance(t, float) for t in check_thresholds([1, 0], 2))


# ---- constructor -------------------------------------------------------------------------------
def test_unknown_kind_and_features(tiny):
    bb = tiny("mistral")
    with pytest.raises(MeestralError, match="unknown head kind"):
        ExitHeads("entropy", [1], bb)
    with pytest.raises(MeestralError, match="unknown head features"):
        ExitHeads("classifier", [1], bb, features="aux")


def test_untrained_classifier_is_not_confident(tiny):
    bb = tiny("mistral")
    heads = ExitHeads("classifier", [1, 3], bb)
    h = torch.randn(7, bb.hidden_size)
    for j in range(2):
        assert (heads.confidence(j, h) < 0.05).all()


# ---- training-free confidences -----------------------------------------------------------------
def test_softmax_and_margin_hand_computed(tiny):
    bb = tiny("mistral")
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    z = math.exp(2) + math.exp(1) + 1
    p1, p2 = math.exp(2) / z, math.exp(1) / z
    h = torch.zeros(2, bb.hidden_size)
    soft = ExitHeads("softmax", [1], bb).confidence(0, h, logits=logits)
    marg = ExitHeads("margin", [1], bb).confidence(0, h, logits=logits)
    torch.testing.assert_close(soft, torch.tensor([p1, 1 / 3]))
    torch.testing.assert_close(marg, torch.tensor([p1 - p2, 0.0]))
    # order of the logits does not matter
    torch.testing.assert_close(ExitHeads("margin", [1], bb).confidence(0, h, logits=logits[:, [2, 0, 1]]),
                               marg)


def test_saturation_hand_computed(tiny):
    bb = tiny("mistral")
    heads = ExitHeads("saturation", [1], bb)
    d = bb.hidden_size
    e0, e1 = torch.zeros(d), torch.zeros(d)
    e0[0], e1[1] = 1.0, 1.0
    h = torch.stack([e0, e0, 3 * e0, e0])
    prev = torch.stack([e0 + e1, e0, e0, -e0])
    got = heads.confidence(0, h, prev_h=prev)
    torch.testing.assert_close(got, torch.tensor([1 / math.sqrt(2), 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("kind", ["softmax", "margin", "saturation", "static"])
def test_confidences_are_in_unit_interval(tiny, kind):
    bb = tiny("mamba2")
    heads = ExitHeads(kind, [1, 3], bb)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, bb.hidden_size, generator=g) * 10
    prev = torch.randn(64, bb.hidden_size, generator=g) * 10
    logits = torch.randn(64, bb.vocab_size, generator=g) * 20
    c = heads.confidence(1, h, None, prev, logits)
    assert c.shape == (64,)
    assert torch.isfinite(c).all() and (c >= 0).all() and (c <= 1).all()
    if kind == "static":
        assert (c == 1).all()
