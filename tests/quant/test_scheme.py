import pytest

from rotq.quant.scheme import FORMAT_VERSION, PRESETS, UNROTATED_CLIP_MAX_SHRINK, Scheme, SchemeError, WeightArgs, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_round_trip(name, rotation):
    s = preset(name, rotation, seed=3)
    assert Scheme.from_dict(s.to_dict()) == s
    assert Scheme.from_dict({"quant_method": "rotq", **s.to_dict()}) == s


def test_w4a4kv4_defaults_follow_design():
    s = preset("w4a4kv4", "hadamard")
    assert (s.weights.bits, s.weights.symmetric, s.weights.group_size, s.weights.clip_search) == (4, True, None, True)
    assert (s.activations.bits, s.activations.symmetric, s.activations.clip_ratio) == (4, True, 0.9)
    assert (s.kv_cache.bits, s.kv_cache.symmetric, s.kv_cache.clip_ratio) == (4, False, 0.95)
    assert s.rotation.r1 and s.rotation.r2 and s.rotation.r3 and s.rotation.r4
    assert s.ignore == ("lm_head",)
    assert not preset("w4a16", "hadamard").rotation.r3  # R3 only serves a KV quantizer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_weight_clip_range_follows_the_rotation(name):
    assert preset(name, "none").weights.clip_max_shrink == UNROTATED_CLIP_MAX_SHRINK == 0.2
    for rotation in ("hadamard", "spinquant"):
        assert preset(name, rotation).weights.clip_max_shrink == WeightArgs.clip_max_shrink == 0.8
    assert preset(name, "none").weights.bits == PRESETS[name].weights.bits  # only the range changes


def test_unknown_keys_are_named():
    d = preset("w4a16").to_dict()
    d["weights"]["groupsize"] = 64
    with pytest.raises(SchemeError, match=r"quantization_config.weights has unknown field\(s\) \['groupsize'\]"):
        Scheme.from_dict(d)
    d = preset("w4a16").to_dict() | {"extra": 1}
    with pytest.raises(SchemeError, match="extra"):
        Scheme.from_dict(d)


def test_versions_and_methods():
    d = preset("w4a16").to_dict()
    with pytest.raises(SchemeError, match="format_version is 99"):
        Scheme.from_dict(d | {"format_version": 99})
    with pytest.raises(SchemeError, match="quant_method is 'gptq'"):
        Scheme.from_dict(d | {"quant_method": "gptq"})
    assert Scheme.from_dict(d).format_version == FORMAT_VERSION


@pytest.mark.parametrize("bad,match", [
    ({"weights": {"bits": 1}}, "weights.bits"),
    ({"weights": {"group_size": 12}}, "group_size"),
    ({"activations": {"clip_ratio": 1.5}}, "activations.clip_ratio"),
    ({"kv_cache": {"bits": 16}}, "kv_cache.bits"),
    ({"rotation": {"kind": "spin"}}, "rotation.kind"),
    ({"rotation": {"r1": True}}, "kind 'hadamard'"),
])
def test_invalid_fields(bad, match):
    d = preset("w4a16").to_dict()
    for k, v in bad.items():
        d[k] = v
    with pytest.raises(SchemeError, match=match):
        Scheme.from_dict(d)


def test_unknown_preset_and_rotation():
    with pytest.raises(SchemeError, match="unknown scheme 'w5a5'.*w4a4kv4"):
        preset("w5a5")
    with pytest.raises(SchemeError, match="unknown rotation"):
        preset("w4a4", "spinquant-ish")
