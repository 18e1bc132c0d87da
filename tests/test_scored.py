"""The scoring pass and the sentinel ``scored`` placement: scores equal the attention they claim to be, the
placement keeps the highest-scoring tokens raw within the budget, and the engine, evaluation and training run it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_equivalent, decode_with_policy, tiny_model

from kvcondense.engine import Stream
from kvcondense.errors import UsageError
from kvcondense.forward import parallel_forward
from kvcondense.layout import NEVER, Kind
from kvcondense.methods import TokenizedText, build_method
from kvcondense.methods.placements import scored_spans
from kvcondense.scoring import POOL, head_scores, method_layout, repeat_scores, token_scores, with_scores

TOKENS = {"<CL>": 94, "<CR>": 95}


def text(n=120, seed=0):
    ids = torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(seed))
    return TokenizedText(ids, torch.arange(n), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_are_the_last_queries_attention(family):
    """Against the eager model's own attention probabilities: the last w rows, summed over heads and rows, averaged
    over layers, averaged over POOL neighbours."""
    model = tiny_model(family, attn="eager")
    ids, w = text(50).ids, 6
    with torch.no_grad():
        att = model(input_ids=ids[None], output_attentions=True).attentions  # per layer (1, H, T, T)
    want = torch.stack([a[0, :, -w:].sum((0, 1)) for a in att]).mean(0)
    want = F.avg_pool1d(want[None, None], POOL, stride=1, padding=POOL // 2, count_include_pad=False)[0, 0]
    got = token_scores(tiny_model(family), ids, w)  # through sdpa: the scores come from the wrapper
    assert got.shape == (50,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    chunked = token_scores(tiny_model(family), ids, w, chunk_tokens=7)  # the text before the window through a cache
    torch.testing.assert_close(chunked, want, atol=1e-5, rtol=1e-4)
    on_eager = token_scores(model, ids, w, chunk_tokens=7)  # an eager model: its own mask function, not sdpa's
    torch.testing.assert_close(on_eager, want, atol=1e-5, rtol=1e-4)
    assert abs(float(torch.stack([a[0, :, -w:].sum((0, 1)) for a in att]).mean(0).sum()) - w * att[0].shape[1]) < 1e-3


def test_repeat_scores_are_the_replays_largest_attention():
    """KVzip's score against the eager model's own attention over text + instruction + text: per layer and KV head,
    the maximum over the replay's queries and the query heads of the group, on the first copy's keys."""
    model = tiny_model("llama", attn="eager")
    ids, ask = text(30).ids, torch.tensor([91, 92, 93])
    replay = torch.cat([ids, ask, ids])
    with torch.no_grad():
        att = model(input_ids=replay[None], output_attentions=True).attentions  # per layer (1, H, L, L)
    kv = model.config.num_key_value_heads
    want = torch.stack([a[0, :, 30:, :30].amax(1).view(kv, -1, 30).amax(1) for a in att])
    got = repeat_scores(tiny_model("llama"), ids, ask, chunk_tokens=7)
    assert got.shape == (model.config.num_hidden_layers, kv, 30)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_scores_depend_on_the_text():
    model = tiny_model("llama")
    assert not torch.allclose(token_scores(model, text(40, 0).ids, 4), token_scores(model, text(40, 1).ids, 4))


@pytest.mark.parametrize("kept", [0.5, 0.25, 0.125])
def test_scored_spans_fit_the_budget_and_keep_the_top_tokens(kept):
    n, sinks, window = 1024, 4, 32
    scores = torch.rand(n, generator=torch.Generator().manual_seed(1))
    scores[500] = 10.0  # the best token stays raw whatever the budget
    spans = scored_spans(scores, kept, sinks, window, 32)
    covered = torch.zeros(n, dtype=torch.bool)
    for a, b in spans:
        assert sinks <= a < b < n - window  # 2+ tokens, inside the older region
        assert not bool(covered[a : b + 1].any())  # no overlap
        covered[a : b + 1] = True
    slots = int((~covered).sum()) + len(spans)  # raw tokens + one <CR> per span
    assert slots <= kept * n and slots >= kept * n - 2
    assert not bool(covered[500])
    raw_older = ~covered[sinks : n - window]
    if bool(raw_older.any()) and bool((~raw_older).any()):  # raw tokens score higher than condensed ones on average
        older = scores[sinks : n - window]
        assert float(older[raw_older].mean()) > float(older[~raw_older].mean())


def test_scored_spans_reach_low_budgets_by_longer_spans():
    n = 512
    spans = scored_spans(torch.rand(n), 0.05, 4, 8, 16)  # 25 slots for 500 older tokens: spans of 20+ tokens
    assert spans and max(b - a + 1 for a, b in spans) > 16
    assert n - sum(b - a + 1 for a, b in spans) + len(spans) <= 0.05 * n
    near_full = scored_spans(torch.rand(n), 0.99, 4, 8, 16)  # 5 slots to free: a few short spans
    assert 0 < sum(b - a for a, b in near_full) <= 0.01 * n + 1
    assert scored_spans(torch.rand(n), 0.5, 400, 111, 16) == []  # one older token: nothing to condense


def test_scored_layout_needs_scores_and_the_engine_scores():
    model = tiny_model("llama")
    m = build_method("sentinel", ratio=0.5, placement="scored", score_window=8, span_tokens=6)
    assert m.scoring().window == 8 and build_method("sentinel").scoring() is None
    with pytest.raises(UsageError, match="scored placement reads token scores"):
        m.layout(text(), TOKENS)
    scored = with_scores(model, m, text())
    assert with_scores(model, m, scored) is scored  # scored once
    lay = method_layout(model, m, text(), TOKENS)
    assert torch.equal(lay.input_ids, m.layout(scored, TOKENS).input_ids)
    assert abs(lay.kept_slots() / 120 - 0.5) < 0.02
    raw = (lay.kinds == Kind.TEXT) & (lay.expire == NEVER)
    assert bool(raw[-8:].all())  # the observation window stays raw
    stream = Stream(model, m, TOKENS)
    stream.prefill(text(), chunk_tokens=16)
    assert torch.equal(stream.layouts[0].input_ids, lay.input_ids)
    assert int(stream.cache.stored_slots()[0]) == lay.kept_slots()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scored_placement_is_equivalent_with_eviction(family):
    """The backbone for the new placement: parallel masked forward = incremental with real eviction, prompt and
    generated text alike."""
    model = tiny_model(family)
    m = build_method("sentinel", ratio=0.6, placement="scored", score_window=8, span_tokens=6)
    lay = method_layout(model, m, text(), TOKENS)
    for chunk in (1, 7, 64):
        assert_equivalent(model, lay, chunk)
    tokens = torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    full, got, rows, _, _ = decode_with_policy(model, lay, m.decode_policy(lay, TOKENS), tokens)
    with torch.no_grad():
        parallel = parallel_forward(model, [full]).logits[0]
    assert (parallel[rows] - got).abs().max() < 1e-4


def test_placement_is_an_inference_parameter(tmp_path):
    from kvcondense.methods import override

    trained = build_method("sentinel", ratio=0.5, placement="recent")
    run = override(trained, {"placement": "scored", "span_tokens": 16, "ratio": 0.75}, "checkpoint x")
    assert (run.placement, run.span_tokens, run.ratio) == ("scored", 16, 0.75)
    with pytest.raises(UsageError):
        build_method("sentinel", placement="scored", span_tokens=1)


def test_evict_at_end_keeps_spans_visible_to_the_prompt_only():
    """``evict="end"``: a span's text is read by the rest of the prompt and gone after it; the same slots are kept
    at the end as with ``close``; parallel = incremental, continuation included."""
    from kvcondense.layout import with_continuation
    from kvcondense.masks import layout_visibility

    model = tiny_model("llama")
    close = build_method("sentinel", ratio=0.5, placement="recent")
    end = build_method("sentinel", ratio=0.5, placement="recent", evict="end")
    a, b = close.layout(text(), TOKENS), end.layout(text(), TOKENS)
    assert torch.equal(a.input_ids, b.input_ids) and a.kept_slots() == b.kept_slots()
    member = int(torch.nonzero((b.kinds == Kind.TEXT) & (b.expire != NEVER))[0])
    assert not bool(layout_visibility(a)[-1, member]) and bool(layout_visibility(b)[-1, member])  # the last token
    after = torch.randint(0, 90, (12,), generator=torch.Generator().manual_seed(4))
    lay = with_continuation(b, after)
    vis = layout_visibility(lay)
    assert not bool(vis[len(b) :, member].any())  # the continuation reads what the prompt left
    assert int(lay.targets[len(b) - 1]) == int(after[0])  # the last prompt token predicts the continuation
    assert torch.equal(lay.position_ids[len(b) :], torch.arange(12) + int(b.position_ids.max()) + 1)
    for chunk in (1, 9, 200):
        assert_equivalent(model, lay, chunk)
    with pytest.raises(UsageError, match="unknown evict"):
        build_method("sentinel", evict="later")


def test_training_on_scored_prompts_with_a_continuation(tiny_dir, sample_path, tmp_path):
    """The scoring pass runs inside training (its layout comes from the model at each step), the method lays out
    the block's start only, and each step logs a finite KL."""
    from kvcondense.checkpoint import read_log, read_meta
    from kvcondense.lora import LoraSettings
    from kvcondense.train import TrainConfig, train

    params = {"ratio": 0.5, "placement": "scored", "evict": "end", "score_window": 4, "span_tokens": 6,
              "lora_scope": "special"}  # fmt: skip
    cfg = TrainConfig(method="sentinel", method_params=params, model=str(tiny_dir), data=str(sample_path),
                      out=str(tmp_path / "scored"), steps=6, batch_size=2, block_tokens=64, lr=1e-2, save_every=0,
                      objective="kl", continuation_tokens=16, lora=LoraSettings(dropout=0.0))  # fmt: skip
    train(cfg)
    log = read_log(cfg.out)
    assert len(log) == 6 and all(r["loss_kl"] == r["loss_kl"] for r in log)  # finite
    assert read_meta(cfg.out)["training"]["continuation_tokens"] == 16
    with pytest.raises(UsageError, match="continuation-tokens"):
        TrainConfig(block_tokens=64, continuation_tokens=64)


def test_scored_eviction_keeps_the_budget_and_the_top_tokens():
    """The training-free ablation: the prompt is read whole, then sinks + window + the best-scored tokens stay."""
    from kvcondense.masks import layout_visibility

    t = text(200)
    t.scores = torch.rand(200, generator=torch.Generator().manual_seed(2))
    t.scores[50] = 5.0
    m = build_method("scored", ratio=0.75, score_window=8)
    lay = m.layout(t, {})
    kept = lay.expire == NEVER
    assert int(kept.sum()) == 50 == lay.kept_slots()
    assert bool(kept[:4].all()) and bool(kept[-23:].all()) and bool(kept[50])  # window: (50 - 4) / 2 tokens
    assert bool(layout_visibility(lay)[-1].all())  # every prompt token is read before anything is dropped
    older = t.scores[4:-23]
    assert float(older[kept[4:-23]].min()) >= float(older[~kept[4:-23]].max())
    with pytest.raises(UsageError, match="reads token scores"):
        m.layout(text(), {})


@pytest.mark.parametrize("per_head", [False, True])
def test_scored_eviction_trains_a_lora_that_reads_the_pruned_cache(tiny_dir, sample_path, tmp_path, per_head):
    """``train --method scored``: the LoRA learns to read a prompt pruned by the scoring pass (KL to the frozen model
    on the continuation), and the checkpoint evaluates as the trained method on the prefix task; with ``per_head``
    each (layer, KV head) keeps its own tokens, in training (the parallel forward) and evaluation (the cache)."""
    from kvcondense.checkpoint import read_log
    from kvcondense.loader import load_checkpoint
    from kvcondense.prefix_task import prefix_task
    from kvcondense.train import TrainConfig, train

    params = {"ratio": 0.75, "score_window": 4, "per_head": per_head}
    cfg = TrainConfig(method="scored", method_params=params, model=str(tiny_dir),
                      data=str(sample_path), out=str(tmp_path / "scored-lora"), steps=8, batch_size=2,
                      block_tokens=64, lr=1e-2, save_every=0, objective="kl", continuation_tokens=16)  # fmt: skip
    train(cfg)
    log = read_log(cfg.out)
    assert len(log) == 8 and all(r["loss_kl"] > 0 for r in log)  # the pruned prompt differs from the full one
    assert log[-1]["kv_kept"] < 1
    got = load_checkpoint(cfg.out)
    assert got.method.name == "scored" and got.method.ratio == 0.75 and got.method.per_head == per_head
    windows = [(text(40, 5), torch.randint(0, 90, (8,), generator=torch.Generator().manual_seed(6)))]
    res = prefix_task(got.model, got.method, got.token_ids, windows)
    assert res["kv_kept"] == 10 / 40 and res["kl_to_full"] > 0


def test_scoring_pass_is_the_same_in_training_mode_with_gradient_checkpointing():
    """Training lays blocks out on a model in train mode: no dropout in the pass, no checkpointing dropping the
    chunks' cache, and every module's mode restored afterwards."""
    ids, want = text(50).ids, token_scores(tiny_model("llama"), text(50).ids, 6, chunk_tokens=16)
    model = tiny_model("llama")
    model.config.attention_dropout = 0.5
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.model.norm.eval()  # a module left in eval mode by its owner stays so
    torch.testing.assert_close(token_scores(model, ids, 6, chunk_tokens=16), want)
    assert model.training and model.model.layers[0].training and not model.model.norm.training


def test_scoring_pass_refuses_a_sliding_window_cache():
    """Every layer sliding (Mistral), or some (Qwen2 with max_window_layers): a text longer than the window is one
    line, including one short enough that the cache still holds every key (its scores would be wrong)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    shape = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=16)  # fmt: skip
    for cfg in (MistralConfig(**shape), Qwen2Config(**shape, use_sliding_window=True, max_window_layers=1)):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
        for n in (20, 60):
            with pytest.raises(UsageError, match="sliding window"):
                token_scores(model, text(n).ids, 6, chunk_tokens=16)
        assert token_scores(model, text(16).ids, 6).shape == (16,)  # within the window: every layer sees it all


@pytest.mark.parametrize("n", [64, 100, 512])
def test_scored_sentinel_never_exceeds_the_budget_when_the_window_could_take_it_all(n):
    """The default window (32) can take every slot left after the sinks at a small budget: one slot stays for the
    older region's <CR>, so the layout keeps at most kept x n."""
    t = text(n)
    t.scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    for ratio in (0.75, 0.9, 0.9375):
        lay = build_method("sentinel", ratio=ratio, placement="scored").layout(t, TOKENS)
        assert lay.kept_slots() <= int((1 - ratio) * n + 1e-9), (n, ratio)


def test_scored_eviction_keeps_the_last_token_when_the_sinks_fill_the_budget():
    t = text(22)
    t.scores = torch.rand(22, generator=torch.Generator().manual_seed(0))
    lay = build_method("scored", ratio=0.75, sinks=16, score_window=4).layout(t, {})
    assert int(lay.expire[-1]) == NEVER and lay.kept_slots() == 5


def test_prompt_end_compression_refuses_what_would_measure_full_attention(tiny_dir, sample_path, tmp_path):
    """Scored eviction and sentinel evict=end free nothing while the text is read: perplexity over the text and a
    training loss without a continuation would be full attention's, so both are one clear line."""
    from kvcondense.cli import main
    from kvcondense.train import TrainConfig, train

    for method in (["--method", "scored"], ["--method", "sentinel", "--placement", "scored", "--evict", "end"]):
        argv = ["eval", *method, "--model", tiny_dir, "--data", sample_path, "--split", "train"]
        assert main([str(a) for a in argv]) == 2
    cfg = TrainConfig(method="scored", model=str(tiny_dir), data=str(sample_path), out=str(tmp_path / "x"),
                      steps=1, batch_size=1, block_tokens=64, save_every=0)  # fmt: skip
    with pytest.raises(UsageError, match="continuation-tokens"):
        train(cfg)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_scores_are_each_kv_heads_attention(family):
    """Per layer and KV head: the eager attention of the last w rows, summed over them and over the query heads
    that share the KV head (GQA groups for llama, one head each for gpt2)."""
    model = tiny_model(family, attn="eager")
    ids, w = text(40).ids, 5
    with torch.no_grad():
        att = model(input_ids=ids[None], output_attentions=True).attentions  # per layer (1, H, T, T)
    kv = model.config.num_key_value_heads if family == "llama" else model.config.n_head
    want = torch.stack([a[0, :, -w:].sum(1).view(kv, -1, 40).sum(1) for a in att])
    got = head_scores(tiny_model(family), ids, w, chunk_tokens=9)
    assert got.shape == (len(att), kv, 40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_mean_scores_divide_by_the_queries_that_see_each_token():
    """``score_mean``: with the whole text scoring (H2O's accumulated attention), token t is seen by T - t queries;
    its score is their mean attention, so early tokens are not favoured for being seen more often."""
    from kvcondense.scoring import pool_scores, seen_by

    assert seen_by(10, 4).tolist() == [4.0] * 7 + [3.0, 2.0, 1.0]
    model, t = tiny_model("llama"), text(40)
    m = build_method("scored", ratio=0.5, score_window=40, score_mean=True, per_head=True)
    got = with_scores(model, m, t)
    heads = head_scores(model, t.ids, 40)
    torch.testing.assert_close(got.head_scores, pool_scores(heads / torch.arange(40, 0, -1).float()))
    summed = with_scores(model, build_method("scored", ratio=0.5, score_window=40, per_head=True), t)
    assert not torch.allclose(summed.head_scores, got.head_scores)


def test_value_norm_weighs_each_score_by_its_value_and_pool_1_leaves_them_raw():
    """``value_norm`` (ExpectedAttention's weighting) against the eager model's own attention and stored values;
    ``score_pool=1`` ranks the raw scores."""
    model = tiny_model("llama", attn="eager")
    ids, w = text(30).ids, 5
    with torch.no_grad():
        out = model(input_ids=ids[None], output_attentions=True, use_cache=True)
    kv = model.config.num_key_value_heads
    att = torch.stack([a[0, :, -w:].sum(1).view(kv, -1, 30).sum(1) for a in out.attentions])  # (layers, kv, T)
    norms = torch.stack([layer.values[0].norm(dim=-1) for layer in out.past_key_values.layers])
    got = head_scores(tiny_model("llama"), ids, w, value_norm=True)
    torch.testing.assert_close(got, att * norms, atol=1e-5, rtol=1e-4)
    m = build_method("scored", score_window=w, per_head=True, score_pool=1, value_norm=True)
    torch.testing.assert_close(with_scores(tiny_model("llama"), m, text(30)).head_scores, got)
    with pytest.raises(UsageError, match="odd width"):
        build_method("scored", score_pool=4)


def test_replay_scores_are_kvzips_without_its_request_and_mix_as_shares():
    from kvcondense.scoring import share

    model = tiny_model("llama")
    t = text(24)
    replayed = repeat_scores(model, t.ids, t.ids[:0])
    alone = with_scores(model, build_method("scored", per_head=True, replay=1.0, score_pool=1), t).head_scores
    torch.testing.assert_close(alone, replayed)
    mixed = with_scores(model, build_method("scored", per_head=True, replay=0.25, score_pool=1, score_window=6), t)
    want = 0.75 * share(head_scores(model, t.ids, 6)) + 0.25 * share(replayed)
    torch.testing.assert_close(mixed.head_scores, want)
    torch.testing.assert_close(mixed.head_scores.sum(-1), torch.ones(want.shape[:2]))
    with pytest.raises(UsageError, match="weight in"):
        build_method("scored", replay=1.5)


def test_scores_over_query_blocks_equal_one_block(monkeypatch):
    """The scoring queries run in blocks (bounded memory on long prompts): sums and maxima equal one block's."""
    import kvcondense.score_tally as score_tally

    model, ids = tiny_model("llama"), text(40).ids
    whole = (head_scores(model, ids, 40), repeat_scores(model, ids, ids[:3]), head_scores(model, ids, 9))
    monkeypatch.setattr(score_tally, "QUERY_BLOCK", 4)
    blocked = (head_scores(model, ids, 40), repeat_scores(model, ids, ids[:3]), head_scores(model, ids, 9))
    for a, b in zip(whole, blocked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_scored_heads_reads_the_text_and_its_copy_once_for_both_scores():
    """The preset's two scores (mean attention x value norm, and the replay's) come from one read of 2T tokens, not
    T + 2T, and equal the two scores computed apart."""
    from kvcondense.scoring import seen_by, share

    model, t = tiny_model("llama"), text(40)
    read = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: read.append(args[0].shape[1]))
    got = with_scores(model, build_method("scored-heads"), t)
    hook.remove()
    assert sum(read) == 80
    attention = head_scores(model, t.ids, 40, value_norm=True) / seen_by(40, 40)
    want = 0.25 * share(attention) + 0.75 * share(repeat_scores(model, t.ids, t.ids[:0]))  # the preset's weight
    torch.testing.assert_close(got.head_scores, want, atol=1e-6, rtol=1e-5)


def test_scored_heads_trains_on_recall_episodes_read_as_prompt_and_continuation(tiny_dir, tmp_path):
    """``train --method scored-heads --data recall-quiz``: each episode's facts are one prompt, pruned once read,
    and its query and answer follow as the continuation (what ``eval --task qa`` asks of the cache); a method
    that compresses as it reads is refused in one line."""
    from kvcondense.checkpoint import read_log
    from kvcondense.data.episodes import load_episodes
    from kvcondense.models import load_model
    from kvcondense.train import TrainConfig, train
    from kvcondense.train_data import episode_prompts

    _, tok = load_model(str(tiny_dir))
    episodes = load_episodes("recall-quiz", "train", 0)[:3]
    items = episode_prompts(episodes, tok, 240)  # this tiny tokenizer: about 27 tokens a fact, 110 the query + answer
    for ep, item in zip(episodes, items, strict=True):
        joined = tok.decode(item.prompt.ids) + tok.decode(item.continuation)
        assert joined.endswith(ep.query + ep.answer) and ep.chunks[-1] in joined  # the last facts kept, then Q + A
        assert not joined.startswith(ep.chunks[0]) and len(item.prompt) + len(item.continuation) <= 240  # cut
    cfg = TrainConfig(method="scored-heads", model=str(tiny_dir), data="recall-quiz", out=str(tmp_path / "sh"),
                      steps=3, batch_size=2, block_tokens=240, lr=1e-2, save_every=0, objective="kl",
                      sample_ratios=(0.5, 0.75))  # fmt: skip
    train(cfg)
    log = read_log(cfg.out)
    assert len(log) == 3 and all(r["loss_kl"] > 0 for r in log) and all(r["kv_kept"] < 1 for r in log)
    with pytest.raises(UsageError, match="online episodes"):
        train(dataclasses.replace(cfg, method="sentinel", method_params={}, out=str(tmp_path / "st")))


def test_eval_budget_check_skips_the_scoring_pass_of_a_method_that_keeps_its_budget_exactly(monkeypatch):
    """``eval --kv-budget`` checks that a method reaches the budget by laying the contexts out; a scored method keeps
    floor(kept x n) tokens of any prompt by construction, so its check costs no scoring pass (which would double
    the evaluation's time)."""
    import kvcondense.prefix_task as prefix_task

    def refuse(*args, **kwargs):
        raise AssertionError("laid out")

    monkeypatch.setattr(prefix_task, "method_layout", refuse)
    windows = [(text(40), None)]
    prefix_task.check_reachable(None, build_method("scored-heads", ratio=0.75), {}, windows, 0.25)
    with pytest.raises(AssertionError, match="laid out"):
        prefix_task.check_reachable(None, build_method("sentinel", ratio=0.75), {}, windows, 0.25)
    t = text(157)
    t.scores = torch.rand(157)
    for kept in (0.5, 0.25, 0.125):
        assert build_method("scored", ratio=1 - kept).layout(t, {}).kept_slots() == int(kept * 157)
