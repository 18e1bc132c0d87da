"""The decode engine: the one token loop, sampling, stop strings, streaming, clones."""

import re
from pathlib import Path

import pytest
import torch
from conftest import TOKENS, Tok, prompt, tiny_model

import kvcondense
from kvcondense.engine import Sampling, Stream, generate_step
from kvcondense.errors import UsageError
from kvcondense.generate import generate
from kvcondense.methods import build_method

SRC = Path(kvcondense.__file__).parent


def sentinel():
    return build_method("sentinel", ratio=0.5, min_line_words=1, max_span_words=6)


def test_one_decode_loop_in_the_library():
    """Only the engine asks a method for its decode policy or steps one; decode.py is gone."""
    assert not (SRC / "decode.py").exists()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if path.name == "engine.py" or path.parent.name == "methods":
            continue
        assert not re.search(r"\.decode_policy\(|policy\.step\(|policies\[", text), path
        assert "feed_ragged" not in text, path


def test_sampling_is_reproducible_with_a_seed_and_varies_without_it():
    model = tiny_model("llama")
    p = prompt(40, 1)

    def run(seed, temperature=1.5):
        sampling = Sampling(temperature=temperature, top_k=50, top_p=0.95, seed=seed)
        return generate(model, Tok(), sentinel(), TOKENS, p, 16, 16, progress=False, sampling=sampling).new_tokens

    assert run(1) == run(1)
    assert len({tuple(run(s)) for s in range(4)}) > 1  # different seeds draw different text
    greedy = generate(model, Tok(), sentinel(), TOKENS, p, 16, 16, progress=False).new_tokens
    assert run(7, temperature=0.0) == greedy  # temperature 0 is greedy, whatever the seed


def test_top_k_one_is_greedy():
    model = tiny_model("llama")
    p = prompt(30, 2)
    greedy = generate(model, Tok(), sentinel(), TOKENS, p, 12, 16, progress=False).new_tokens
    top1 = Sampling(temperature=2.0, top_k=1, seed=3)
    assert generate(model, Tok(), sentinel(), TOKENS, p, 12, 16, progress=False, sampling=top1).new_tokens == greedy


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_sampling_settings_are_one_line(bad):
    with pytest.raises(UsageError):
        Sampling(**bad)


def test_stop_strings_cut_the_text_and_the_streamer_sees_every_token():
    model = tiny_model("llama")
    p = prompt(30, 3)
    full = generate(model, Tok(), sentinel(), TOKENS, p, 12, 16, progress=False)
    stop = str(full.new_tokens[4])  # Tok decodes ids as space-separated numbers

    class Streamer:
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, ids):
            self.got += ids.tolist()

        def end(self):
            self.ended = True

    streamer = Streamer()
    cut = generate(model, Tok(), sentinel(), TOKENS, p, 12, 16, progress=False, stop=[stop], streamer=streamer)
    first = next(i for i, t in enumerate(full.new_tokens) if stop in str(t))
    assert cut.new_tokens == full.new_tokens[: first + 1]
    assert stop not in cut.text and streamer.got == cut.new_tokens and streamer.ended


def test_a_clone_continues_like_the_original_and_leaves_it_alone():
    model = tiny_model("llama")
    stream = Stream(model, sentinel(), TOKENS)
    logits = stream.prefill(prompt(40, 4), chunk_tokens=16)
    twin = stream.clone()
    a = list(generate_step(stream, logits, 10))
    b = list(generate_step(twin, logits, 10))
    assert a == b and stream.seen == twin.seen
    assert torch.equal(stream.cache.stored_slots(), twin.cache.stored_slots())


def test_the_step_refuses_a_wrong_number_of_tokens():
    model = tiny_model("llama")
    stream = Stream(model, sentinel(), TOKENS)
    stream.prefill(prompt(20, 5), chunk_tokens=16)
    with pytest.raises(ValueError, match="2 tokens for 1 rows"):
        stream.step([1, 2])


def test_prefill_starts_a_stream_and_refuses_a_used_one():
    model = tiny_model("llama")
    stream = Stream(model, sentinel(), TOKENS)
    stream.prefill(prompt(20, 7), chunk_tokens=8)
    with pytest.raises(ValueError, match="empty cache"):
        stream.prefill(prompt(20, 8), chunk_tokens=8)


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("qwen2", "sdpa"), ("gpt2", "sdpa"), ("llama", "eager")])
def test_a_full_attention_prompt_is_one_causal_pass_with_the_chunked_logits(family, attn):
    """On sdpa, a prompt that frees nothing before its end is read in one forward with no mask of ours (the
    model's causal kernel) and gives the logits and keys of the masked chunks it replaces; eager (whose causal
    mask would be an n x n tensor) and a compressing prompt keep the chunks."""
    from kvcondense.cache import EvictingCache
    from kvcondense.forward import can_feed_causally, chunk_bounds, feed
    from kvcondense.layout import text_layout
    from kvcondense.methods import FullAttention

    model = tiny_model(family, attn)
    one_pass = attn == "sdpa"
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("attention_mask")), with_kwargs=True)
    text = prompt(90, 4)
    stream = Stream(model, FullAttention(), TOKENS)
    logits = stream.prefill(text, chunk_tokens=16, keep_logits=True)
    assert (len(calls) == 1 and calls[0] is None) if one_pass else (len(calls) == 6 and None not in calls)
    layout = text_layout(text.ids)
    assert layout.is_causal() and can_feed_causally(model, layout) == one_pass
    assert not can_feed_causally(model, text_layout(torch.zeros(0, dtype=torch.long)))  # nothing to feed
    assert stream.cache.physical_length == len(layout)
    cache, chunked = EvictingCache(model.config.num_hidden_layers), []
    for lo, hi in chunk_bounds(layout, 16):  # the masked path, chunk by chunk
        chunked.append(feed(model, cache, layout.slice(lo, hi), lo)[0])
    torch.testing.assert_close(logits, torch.cat(chunked), rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(stream.cache.layers, cache.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-4)
    calls.clear()
    Stream(model, sentinel(), TOKENS).prefill(text, chunk_tokens=16)
    hook.remove()
    assert len(calls) > 1 and all(mask is not None for mask in calls)
    assert not sentinel().layout(text, TOKENS).is_causal()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_sliding_window_model_is_not_fed_causally_past_its_window(attn):
    """The model's own causal mask would apply its sliding window, which kvcondense's masks never do: a prompt
    longer than the window keeps the masked chunks (and the logits of the parallel forward); a shorter one does not."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kvcondense.forward import can_feed_causally, parallel_forward
    from kvcondense.layout import text_layout
    from kvcondense.methods import FullAttention
    from kvcondense.models import attention_window

    model = tiny_model("mistral", attn)
    assert attention_window(model) == 16 and attention_window(tiny_model("llama")) is None
    shape = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    no_layer_slides = Qwen2Config(**shape, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert attention_window(AutoModelForCausalLM.from_config(no_layer_slides)) is None
    for n, one_pass in ((40, False), (16, attn == "sdpa")):
        text = prompt(n, 5)
        assert can_feed_causally(model, text_layout(text.ids)) == one_pass
        logits = Stream(model, FullAttention(), TOKENS).prefill(text, chunk_tokens=16, keep_logits=True)
        with torch.no_grad():
            reference = parallel_forward(model, [text_layout(text.ids)]).logits[0]
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [0, -3])
def test_a_chunk_of_no_tokens_is_one_clear_error_not_a_hang(chunk):
    from kvcondense.scoring import token_scores

    with pytest.raises(UsageError, match="at least one token"):
        Stream(tiny_model("llama"), sentinel(), TOKENS).prefill(prompt(40, 1), chunk_tokens=chunk)
    with pytest.raises(UsageError, match="at least one token"):
        token_scores(tiny_model("llama"), prompt(20, 1).ids, 4, chunk_tokens=chunk)


def test_a_token_outside_the_vocabulary_is_refused_before_the_stream_moves():
    model, p = tiny_model("llama"), prompt(20, 0)
    stream, fresh = Stream(model, sentinel(), TOKENS), Stream(model, sentinel(), TOKENS)
    stream.prefill(p), fresh.prefill(p)
    for bad in (model.config.vocab_size, -1):
        with pytest.raises(UsageError, match="outside the model's vocabulary"):
            stream.step([bad])
    torch.testing.assert_close(stream.step([5]).logits, fresh.step([5]).logits)  # the same position as a fresh one


def test_a_stack_decodes_on_copies_of_its_rows_policies():
    model = tiny_model("llama")
    rows = [Stream(model, sentinel(), TOKENS) for _ in range(2)]
    for i, row in enumerate(rows):
        row.prefill(prompt(12 + 5 * i, i))
    alone = rows[0].clone()
    stacked = Stream.stack(rows)
    for token in range(5, 25):  # long enough to open and close spans
        stacked.step([token, token + 1])
    for token in range(5, 25):  # the source row is where it was: it decodes as its clone does
        torch.testing.assert_close(rows[0].step([token]).logits, alone.step([token]).logits)


def test_stream_misuse_is_one_clear_error():
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="empty prompt"):
        Stream(model, sentinel(), TOKENS).prefill(prompt(0, 0))
    with pytest.raises(ValueError, match="stack one or more prefilled one-row streams"):
        Stream.stack([])
    with pytest.raises(ValueError, match="stack one or more prefilled one-row streams"):
        Stream.stack([Stream(model, sentinel(), TOKENS)])  # never prefilled
    repeated = Stream(model, sentinel(), TOKENS)
    repeated.prefill(prompt(10, 0))
    with pytest.raises(ValueError, match="at least once"):
        repeated.repeat(0)
    repeated.repeat(2)
    with pytest.raises(ValueError, match="not a repeated or stacked one"):
        Stream.stack([repeated])


def test_bad_generation_settings_are_one_clear_line():
    from kvcondense.batch import generate_batch

    model = tiny_model("llama")
    for bad in ({"max_new_tokens": -1}, {"stop": [""]}, {"stop": "x"}):
        with pytest.raises(UsageError, match="max_new_tokens must be|non-empty strings"):
            generate(model, Tok(), sentinel(), TOKENS, prompt(10, 0), progress=False, **bad)
    with pytest.raises(UsageError, match="max_new_tokens must be"):
        generate_batch(model, Tok(), sentinel(), TOKENS, [prompt(10, 0)], -1)
    with pytest.raises(UsageError, match="a batch needs prompts"):
        generate_batch(model, Tok(), sentinel(), TOKENS, [], 4)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UsageError, match="temperature"):
            Sampling(temperature=bad)
    with pytest.raises(UsageError, match="top-p"):
        Sampling(top_p=float("nan"))


@pytest.mark.parametrize(
    "name,params,match",
    [("sentinel", {"decode_span": 0}, "decode_span"), ("local", {"ratio": 1e-5}, "1/10000")],
)
def test_method_settings_that_would_break_later_are_refused_at_once(name, params, match):
    with pytest.raises(UsageError, match=match):
        build_method(name, **params)


def test_an_unknown_method_is_one_line_in_every_entry():
    from kvcondense.methods import check_params

    with pytest.raises(UsageError, match="unknown method 'bogus'"):
        check_params("bogus", {})


def test_positions_past_the_context_are_counted_on_the_layout_and_a_learned_table_is_never_overrun():
    """Gist tokens take positions of their own: a prompt within the context as text can run past it as a layout.
    A model with learned absolute positions (GPT-2) cannot extrapolate: past its table is one line, not an
    IndexError, even with allow_long_context, in the prompt and while decoding."""
    gist = build_method("gist")
    with pytest.raises(UsageError, match="compressed prompt takes"):
        generate(tiny_model("llama"), Tok(), gist, TOKENS, prompt(400, 0), 12, progress=False)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(UsageError, match="past the model's 512 learned positions"):
        generate(gpt2, Tok(), gist, TOKENS, prompt(400, 0), 12, progress=False, allow_long_context=True)
    stream = Stream(gpt2, build_method("local"), TOKENS)
    logits = stream.prefill(prompt(505, 1))
    with pytest.raises(UsageError, match="position 512 is past"):
        for _ in generate_step(stream, logits, 20):
            pass
