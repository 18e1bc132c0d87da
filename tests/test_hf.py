"""Compression inside transformers' own generate: the same tokens as kvcondense's generate, real eviction,
sampling, stopping criteria, streamers, padded batches."""

import pytest
import torch
from conftest import TOKENS, Tok, prompt, tiny_model

from kvcondense.batch import generate_batch
from kvcondense.errors import UsageError
from kvcondense.generate import generate
from kvcondense.hf import CompressedDecoding, compressing
from kvcondense.methods import build_method


def sentinel():
    return build_method("sentinel", ratio=0.5, placement="recent")


@pytest.mark.parametrize("method", [sentinel, lambda: build_method("scored-heads", ratio=0.5)])
def test_model_generate_with_custom_generate_equals_kvcondense_and_evicts(method):
    """Sentinel, and scored-heads (whose prefill stores its scoring pass's read of the prompt). The attention mask
    is given: without it transformers would infer one from pad_token_id, which occurs in this random prompt."""
    model = tiny_model("llama")
    p = prompt(60, 1)
    ours = generate(model, Tok(), method(), TOKENS, p, 10, 16, progress=False)
    decoding = CompressedDecoding(method(), TOKENS, chunk_tokens=16)
    out = model.generate(
        p.ids[None],
        attention_mask=torch.ones(1, 60, dtype=torch.long),
        custom_generate=decoding,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert out[0, 60:].tolist() == ours.new_tokens
    stored = int(decoding.stream.cache.stored_slots()[0])
    # the last token is returned, not fed (nothing reads it): the cache is kvcondense's after 9 of the 10 tokens
    assert stored == ours.slots_per_step[-2] and stored < 60  # eviction really happened (full would hold 69)


def test_compressing_context_manager_samples_reproducibly_and_restores_generate():
    model = tiny_model("llama")
    ids = prompt(40, 2).ids[None]
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=40, pad_token_id=0, eos_token_id=None)
    with compressing(model, sentinel(), TOKENS, chunk_tokens=16) as decoding:
        torch.manual_seed(0)
        a = model.generate(ids, **kwargs)
        torch.manual_seed(0)
        b = model.generate(ids, **kwargs)
        assert decoding.stream is not None and int(decoding.stream.cache.stored_slots()[0]) < 40
    assert torch.equal(a, b)
    assert "generate" not in vars(model)  # the model's own generate is back
    plain = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert plain.shape == (1, 43)


def test_streamer_and_stopping_criteria_work():
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = tiny_model("llama")
    ids = prompt(30, 3).ids[None]

    class Streamer:
        def __init__(self):
            self.got = []

        def put(self, t):
            self.got.append(t.tolist())

        def end(self):
            self.got.append("end")

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 33, dtype=torch.bool)

    streamer = Streamer()
    with compressing(model, sentinel(), TOKENS):
        out = model.generate(
            ids,
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([AfterThree()]),
        )
    assert out.shape == (1, 33) and streamer.got[-1] == "end"
    assert streamer.got[0] == ids.tolist()  # generate puts the prompt
    assert [t for g in streamer.got[1:-1] for t in g] == out[0, 30:].tolist()  # then each token as it comes


def test_a_left_padded_batch_equals_each_row_alone():
    model = tiny_model("llama")
    rows = [prompt(50, 4), prompt(23, 5)]
    width = 50
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r.ids, 1
    out = model.generate(
        ids,
        attention_mask=mask,
        custom_generate=CompressedDecoding(sentinel(), TOKENS, chunk_tokens=16),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    alone, _ = generate_batch(model, Tok(), sentinel(), TOKENS, rows, max_new_tokens=8, chunk_tokens=16)
    assert out[:, width:].tolist() == alone


def test_unsupported_generation_settings_are_refused():
    model = tiny_model("llama")
    ids = prompt(20, 6).ids[None]
    decoding = CompressedDecoding(sentinel(), TOKENS)
    with pytest.raises(UsageError, match="beam search"):
        model.generate(ids, custom_generate=decoding, num_beams=2, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(UsageError, match="return_dict_in_generate"):
        model.generate(ids, custom_generate=decoding, return_dict_in_generate=True, max_new_tokens=2, pad_token_id=0)
