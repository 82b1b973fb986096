"""The model card: hub metadata that parses, a recipe that `rotq quantize --recipe` reads back,
and evaluations added in place (replaced, never duplicated) by an atomic rewrite."""

import os

import pytest
import yaml

from rotq.export import model_card
from rotq.export.model_card import BEGIN, END, ModelCard, add_evaluation, render, write
from rotq.quant.errors import RotqError
from rotq.quant.recipe import Recipe
from rotq.quant.scheme import preset

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _eval(text="wikitext2", engine="torch", ppl=37.8812, windows=40, seqlen=2048):
    # what `rotq eval --json` writes: Evaluation.to_dict(), extra keys included
    return {"model": "out", "text": text, "engine": engine, "quantized": True, "ppl": ppl, "nll": 3.6345,
            "tokens": windows * (seqlen - 1), "windows": windows, "seqlen": seqlen}


def _card(base=BASE, scheme="w4a4kv4", rotation="spinquant", fmt="rotq", evaluations=()):
    r = Recipe(scheme=scheme, format=fmt, rotation=rotation).resolved()
    recipe = r.to_dict() | {"a_clip": 0.8} if r.a_clip == "auto" else r.to_dict()
    return ModelCard(base_model=base, scheme=preset(scheme, rotation, 0), scheme_name=scheme, format=fmt,
                     recipe=recipe, calibration={"text": "wikisum", "nsamples": 64, "seqlen": 1024, "seed": 0},
                     method=r.method, rotation=rotation, evaluations=tuple(evaluations))


def _front(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _table(text):
    return text.split(BEGIN)[1].split(END)[0]


def test_front_matter_has_hub_metadata_and_model_index():
    text = render(_card(evaluations=[_eval()]))
    front = _front(text)
    assert front["base_model"] == BASE
    assert front["base_model_relation"] == "quantized"
    assert front["pipeline_tag"] == "text-generation"
    assert front["library_name"] == "vllm"
    assert {"rotq", "w4a4kv4", "int4", "quantized", "vllm", "spinquant"} <= set(front["tags"])
    assert "compressed-tensors" not in front["tags"] and "license" not in front
    [entry] = front["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"]["name"] == "wikitext2"
    assert result["metrics"][0]["type"] == "perplexity" and result["metrics"][0]["value"] == 37.8812
    assert "| wikitext2 | torch | 40 x 2048 | 81880 | 37.8812 |" in _table(text)


def test_body_states_the_scheme_and_how_to_serve():
    text = render(_card())
    assert "Activations: INT4, dynamic per token, symmetric, clip ratio 0.9" in text  # the scheme's, not the recipe's
    assert "KV cache: INT4, dynamic per (token, head), asymmetric, clip ratio 0.95" in text
    assert all(f"R{i} " in text for i in range(1, 5)) and "SpinQuant" in text
    assert "pip install rotq" in text and "--kv-cache-dtype int4_per_token_head" in text
    assert "model-index" not in _front(text) and "No evaluation recorded yet" in _table(text)


def test_compressed_tensors_card_serves_with_stock_vllm():
    text = render(_card(scheme="w4a16", rotation="hadamard", fmt="compressed-tensors"))
    assert "compressed-tensors" in _front(text)["tags"]
    assert "pip install rotq" not in text and "--kv-cache-dtype" not in text and "vllm serve MODEL" in text
    assert "Activations: 16-bit (not quantized)" in text and "KV cache: 16-bit (not quantized)" in text
    assert "R3" not in text  # no online Q/K Hadamard without a quantized KV cache


def test_unknown_base_model_is_omitted():
    text = render(_card(base=None, rotation="none"))
    front = _front(text)
    assert "base_model" not in front and front["base_model_relation"] == "quantized"
    assert "huggingface.co" not in text and "Rotations: none" in text


def test_recipe_block_reads_back_as_the_same_recipe(tmp_path):
    card = _card()
    block = render(card).split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == card.recipe
    (tmp_path / "recipe.yaml").write_text(block)
    assert Recipe.from_file(tmp_path / "recipe.yaml").to_dict() == card.recipe


def test_add_evaluation_adds_then_replaces_and_keeps_the_rest(tmp_path):
    path = write(_card(), tmp_path)
    # a hand edit to the front matter survives
    path.write_text(path.read_text().replace("---\n", "---\nlicense: apache-2.0\n", 1))
    before = path.read_text()
    outside = lambda text: (text.split("---\n", 2)[2].split(BEGIN)[0], text.split(END)[1])  # noqa: E731

    add_evaluation(tmp_path, _eval())
    add_evaluation(tmp_path, _eval(engine="vllm", ppl=38.0))
    add_evaluation(tmp_path, _eval(ppl=36.5))  # same text/engine/windows/seqlen: replaces the first
    text = path.read_text()
    front = _front(text)
    assert front["license"] == "apache-2.0" and front["base_model"] == BASE
    values = [(r["metrics"][0]["args"]["engine"], r["metrics"][0]["value"]) for r in front["model-index"][0]["results"]]
    assert values == [("torch", 36.5), ("vllm", 38.0)]
    rows = [line for line in _table(text).splitlines() if line.startswith("| wikitext2")]
    assert rows == ["| wikitext2 | torch | 40 x 2048 | 81880 | 36.5000 |",
                    "| wikitext2 | vllm | 40 x 2048 | 81880 | 38.0000 |"]
    assert outside(text) == outside(before)
    add_evaluation(tmp_path, _eval(windows=8))  # another window count is another run
    assert len(_front(path.read_text())["model-index"][0]["results"]) == 3
    assert os.listdir(tmp_path) == ["README.md"]


def test_rewrite_is_atomic(tmp_path, monkeypatch):
    path = write(_card(), tmp_path)
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(model_card.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        add_evaluation(tmp_path, _eval())
    assert path.read_text() == before and os.listdir(tmp_path) == ["README.md"]


def test_foreign_or_missing_card_is_refused(tmp_path):
    with pytest.raises(RotqError, match="does not exist"):
        add_evaluation(tmp_path, _eval())
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# Someone's model\n")
    with pytest.raises(RotqError, match="not written by rotq"):
        add_evaluation(tmp_path, _eval())
    (tmp_path / "README.md").write_text("# no front matter\n" + BEGIN + "\n" + END + "\n")
    with pytest.raises(RotqError, match="not written by rotq"):
        add_evaluation(tmp_path, _eval())


def test_incomplete_evaluation_is_refused(tmp_path):
    write(_card(), tmp_path)
    with pytest.raises(RotqError, match="lacks"):
        add_evaluation(tmp_path, {"ppl": 12.0})
