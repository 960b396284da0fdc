"""mergekit YAML configs: the supported subset means what it means in mergekit, and
everything else is refused by name."""

import pytest

from lattice.learn.mergespec import MergeSpec, MergeSpecError

A, B, C = "a" * 64, "b" * 64, "c" * 64
NAMES = {"base": A, "one": B, "two": C}


def resolve(ref):
    if ref in NAMES:
        return NAMES[ref]
    if ref in NAMES.values():
        return ref
    raise MergeSpecError(f"no model {ref!r}")


TIES = """
models:
  - model: base
  - model: one
    parameters:
      density: [1, 0.7, 0.1]   # a gradient over the layers
      weight:
        - filter: mlp
          value: 0.5
        - value: 1.0
  - model: two
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: base
parameters:
  normalize: true
  lambda: 0.9
dtype: bfloat16
"""


def test_a_ties_config_resolves_per_tensor_with_filters_and_gradients():
    spec = MergeSpec.from_yaml(TIES, resolve)
    assert (spec.method, spec.base, spec.models, spec.dtype) == ("ties", A, (B, C), "BF16")
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["model.embed_tokens.weight"]
    layers = spec.layer_count(names)
    assert layers == 5
    shared, per = spec.resolve("model.layers.0.mlp.up_proj.weight", layers)
    assert shared == {"lambda": 0.9, "normalize": True, "rescale": False, "int8_mask": False}
    assert per[0] == {"weight": 0.5, "density": 1.0} and per[1] == {"weight": 0.3, "density": 0.5}
    _, per = spec.resolve("model.layers.2.self_attn.q_proj.weight", layers)  # t = 0.5
    assert per[0] == {"weight": 1.0, "density": 0.7}
    _, per = spec.resolve("model.layers.3.mlp.down_proj.weight", layers)  # t = 0.75: between 0.7 and 0.1
    assert per[0]["density"] == pytest.approx(0.4)
    _, per = spec.resolve("model.embed_tokens.weight", layers)  # outside the layers: t = 0
    assert per[0]["density"] == 1.0


def test_the_canonical_form_round_trips_and_normalizes_numbers():
    spec = MergeSpec.from_yaml(TIES, resolve)
    again = MergeSpec.from_json(spec.to_json())
    assert again == spec and again.canonical() == spec.canonical()
    ints = MergeSpec.from_arguments("ties", [B], base=A, density=1)
    floats = MergeSpec.from_arguments("ties", [B], base=A, density=1.0)
    assert ints.canonical() == floats.canonical()  # 1 and 1.0 are one spec, one model id


@pytest.mark.parametrize("text,match", [
    ("models: [{model: one}]\nmerge_method: passthrough", "passthrough"),
    ("slices: []\nmerge_method: ties", "'slices'"),
    ("models: [{model: one}]\nmerge_method: linear\ntokenizer_source: union", "'tokenizer_source'"),
    ("models: [{model: one}]\nmerge_method: linear\nchat_template: chatml", "'chat_template'"),
    ("models: [{model: one, layer_range: [0, 4]}]\nmerge_method: linear", "layer_range"),
    ("models: [{model: one}]\nmerge_method: linear\nparameters: {density: 0.5}", "'density'"),
    ("models: [{model: one}]\nmerge_method: linear\nfrobnicate: 1", "frobnicate"),
    ("models: [{model: one+lora}]\nmerge_method: linear", "LoRA"),
    ("models: [{model: one}]\nmerge_method: ties", "base"),
    ("models: [{model: one}]\nmerge_method: linear\nbase_model: two", "base"),
    ("models: [{model: one}, {model: two}]\nmerge_method: slerp\nbase_model: base\nparameters: {t: 0.5}", "slerp"),
    ("models: [{model: one}]\nmerge_method: linear\ndtype: int8", "int8"),
    ("models: [{model: nobody}]\nmerge_method: linear", "nobody"),
    ("a: &x [1]\nb: *x", "aliases"),
    ("models: [{model: one, parameters: {weight: yes please}}]\nmerge_method: linear", "weight"),
])
def test_unsupported_configs_are_refused_by_name(text, match):
    with pytest.raises(MergeSpecError, match=match):
        MergeSpec.from_yaml(text, resolve)


def test_parameter_ranges_are_checked_per_tensor():
    spec = MergeSpec.from_yaml("models: [{model: one, parameters: {density: [1, 0]}}]\nmerge_method: ties\n"
                               "base_model: base", resolve)
    spec.resolve("model.layers.0.w", 2)
    with pytest.raises(MergeSpecError, match=r"'model.layers.1.w'.*density"):
        spec.resolve("model.layers.1.w", 2)
    slerp = MergeSpec.from_arguments("slerp", [B], base=A)
    with pytest.raises(MergeSpecError, match="'t' is required"):
        slerp.resolve("w", 0)
    della = MergeSpec.from_arguments("della", [B], base=A, density=0.9, epsilon=0.15)
    with pytest.raises(MergeSpecError, match="density ± epsilon"):
        della.resolve("w", 0)


def test_a_client_request_map_becomes_the_same_spec_as_the_arguments():
    request = {"method": "ties", "models": ["one", "two"], "base": "base", "weights": [1, 0.5],
               "dtype": "bfloat16", "parameters": {"density": 0.5}}
    spec = MergeSpec.from_request(request).with_ids(resolve)
    assert spec == MergeSpec.from_arguments("ties", [B, C], base=A, weights=[1.0, 0.5], dtype="bfloat16",
                                            density=0.5)
    for bad, match in [({**request, "seed": 1}, "unknown spec field"),
                       ({**request, "weights": [1, "x"]}, "weights"),
                       ({**request, "parameters": {"base": A}}, "'base' is not a parameter of ties"),
                       ({**request, "models": "one"}, "models"),
                       ({**request, "models": ["x"] * 65}, "more than 64 models"),
                       ([request], "a map")]:
        with pytest.raises(MergeSpecError, match=match):
            MergeSpec.from_request(bad)
