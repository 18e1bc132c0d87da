"""One loader for checkpoints and untrained methods, with its override rules, and the package docstring's example."""

import re

import pytest

import kvcondense
from kvcondense.cli import main
from kvcondense.errors import UsageError
from kvcondense.loader import Loaded, load


@pytest.fixture(scope="module")
def trained(tiny_dir, sample_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "sentinel"
    args = ["train", "--method", "sentinel", "--ratio", "0.5", "--model", str(tiny_dir), "--data", str(sample_path)]
    assert main([*args, "--steps", "1", "--block-tokens", "64", "--out", str(out)]) == 0
    return out


def test_a_checkpoint_loads_as_a_named_bundle_with_its_ratio_overridable(trained):
    got = load(trained, params={"ratio": 0.3, "placement": None})
    assert isinstance(got, Loaded) and got.label == "sentinel (trained)" and got.meta["method"]["name"] == "sentinel"
    assert got.method.ratio == 0.3 and got.method.max_span_words == got.meta["method"]["params"]["max_span_words"]
    assert set(got.token_ids) == {"<CL>", "<CR>"}
    assert load(trained, params={"window_share": 0.75}).method.window_share == 0.75  # an inference-time split


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "gist"}, "is a sentinel checkpoint, not gist"),
        ({"params": {"max_span_words": 3}}, "was trained with max_span_words=25"),
        ({"params": {"n_gist": 2}}, "takes no --n-gist"),
    ],
)
def test_a_checkpoint_refuses_what_contradicts_it(trained, kwargs, match, monkeypatch):
    import kvcondense.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(UsageError, match=match):
        load(trained, **kwargs)


def test_an_untrained_method_on_a_local_model(tiny_dir):
    got = load(method="gist", params={"n_gist": 2}, model=str(tiny_dir))
    assert got.label == "gist (untrained tokens)" and got.meta is None and len(got.token_ids) == 2
    assert load(method="streaming", params={"ratio": 0.75}, model=str(tiny_dir)).label == "streaming"
    with pytest.raises(UsageError, match="--method M"):
        load()


def test_the_package_docstring_example_runs(trained, tiny_dir):
    code = kvcondense.__doc__.split("\n\n", 1)[1]  # the example: everything after the first paragraph
    assert "load(" in code and "generate(" in code
    code = code.replace('"checkpoints/sentinel-r0.5"', repr(str(trained)))
    code = re.sub(r"max_new_tokens=\d+", "max_new_tokens=4", code)
    namespace: dict = {}
    exec(compile(code, "kvcondense docstring", "exec"), namespace)
    assert namespace["out"].new_tokens and namespace["out"].stored_slots > 0
