"""The Recipe: the one home of every option's default and check (quant/recipe.py)."""

import dataclasses

import pytest

from rotq.quant.cli import build_parser, recipe_from_args
from rotq.quant.errors import RotqError
from rotq.quant.gptq import GPTQOptions
from rotq.quant.recipe import DEFAULT_METHOD, DEFAULT_ROTATION, Recipe


def test_scheme_dependent_defaults_resolve_by_activations():
    a4 = Recipe().resolved()
    assert (a4.rotation, a4.method, a4.a_clip) == (DEFAULT_ROTATION[True], DEFAULT_METHOD[True], "auto")
    w4 = Recipe(scheme="w4a16").resolved()
    assert (w4.rotation, w4.method, w4.a_clip) == (DEFAULT_ROTATION[False], DEFAULT_METHOD[False], None)
    assert Recipe(method="qep").resolved().method == "qep+gptq"  # canonical spelling, parsed once
    assert Recipe().percdamp == GPTQOptions.percdamp and Recipe().block_size == GPTQOptions.block_size
    unrotated = Recipe(scheme="w4a16", rotation="none")
    assert unrotated.resolved().build_scheme().weights.clip_max_shrink == 0.2
    assert dataclasses.replace(unrotated, w_clip_max_shrink=0.8).resolved().build_scheme().weights.clip_max_shrink == 0.8
    assert w4.build_scheme().weights.clip_max_shrink == 0.8


def test_values_are_coerced_and_checked_by_type():
    assert Recipe(a_clip="0.8").a_clip == 0.8 and Recipe(percdamp=1).percdamp == 1.0
    assert isinstance(Recipe(percdamp=1).percdamp, float)
    with pytest.raises(RotqError, match="--nsamples must be an integer"):
        Recipe(nsamples="64")
    with pytest.raises(RotqError, match="--act-order must be true or false"):
        Recipe(act_order="yes")
    with pytest.raises(RotqError, match="--a-clip must be a ratio in"):
        Recipe(a_clip=1.5)
    with pytest.raises(RotqError, match="--nsamples must be at least 1"):
        Recipe(nsamples=0)
    with pytest.raises(RotqError, match="unknown scheme 'w5a5'"):
        Recipe(scheme="w5a5")
    with pytest.raises(RotqError, match="unknown method 'awq'"):
        Recipe(method="awq")


@pytest.mark.parametrize("changes, match", [
    (dict(scheme="w4a16", a_clip=0.9), "keeps them 16-bit"),
    (dict(method="gptq", qep_alpha=0.1), "--qep-alpha does not apply to --method gptq"),
    (dict(method="gptaq", foem_beta=0.1), "--foem-beta does not apply"),
    (dict(rotation="hadamard", rotation_steps=3), "for --rotation spinquant only"),
    (dict(rotation_file="r.safetensors", rotation_lr=1.0), "--rotation-file reuses learned rotations"),
    (dict(offload="scratch", a_clip=0.9), "--offload cannot learn SpinQuant"),
    (dict(offload="scratch", rotation="hadamard"), "--offload cannot fit --a-clip auto"),
    (dict(offload="scratch", rotation="hadamard", a_clip=0.9, refine="lsi", cross_layer=1), "--cross-layer needs"),
])
def test_combinations_are_refused_once_with_the_flag_named(changes, match):
    with pytest.raises(RotqError, match=match):
        Recipe(**changes).resolved()


def test_method_options_put_gptaq_alpha_where_its_solver_reads_it():
    foem = Recipe(method="gptaq+foem", gptaq_alpha=0.1, foem_variant="6a", foem_beta=0.01).method_options()
    assert (foem.foem.variant, foem.foem.beta, foem.foem.alpha, foem.gptaq.alpha) == ("6a", 0.01, 0.1, 0.25)
    assert Recipe(method="gptaq", gptaq_alpha=0.1).method_options().gptaq.alpha == 0.1
    rescomp = Recipe(method="gptaq+rescomp", gptaq_alpha=0.1, rescomp_alpha2=0.5).method_options()
    assert (rescomp.rescomp.alpha, rescomp.rescomp.alpha2, rescomp.gptaq.alpha) == (0.1, 0.5, 0.25)
    assert Recipe(method="qep+gptaq", qep_alpha=0.0).method_options().qep.alpha == 0.0


def test_unknown_keys_are_refused_by_name(tmp_path):
    with pytest.raises(RotqError, match=r"unknown key\(s\) \['nsample'\]"):
        Recipe.from_mapping({"nsample": 3})
    path = tmp_path / "r.yaml"
    path.write_text("- a list\n")
    with pytest.raises(RotqError, match="must be a mapping"):
        Recipe.from_file(path)


def test_flags_recipe_file_and_defaults_layer(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("scheme: w4a16\nw_bits: 8\nmethod: rtn\n")
    args = build_parser().parse_args(["quantize", "m", "-o", "o", "--recipe", str(path), "--w-bits", "3",
                                      "--no-act-order"])
    r = recipe_from_args(args)
    assert (r.scheme, r.w_bits, r.method, r.act_order, r.nsamples) == ("w4a16", 3, "rtn", False, Recipe.nsamples)


def test_help_shows_every_recipe_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Recipe):
        assert "--" + f.name.replace("_", "-") in text
    assert f"calibration sequences (default: {Recipe.nsamples})" in text
    assert "experimental options" in text
