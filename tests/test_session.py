"""The online memory session: the same answer likelihood as the parallel training forward, memory that grows by n
slots per chunk (concat) or stays at n (merge), answers that leave the memory unchanged, and save/load."""

import pytest
import torch
from test_ccm import COMP, episode, lora_model

from kvcondense.forward import parallel_forward
from kvcondense.layout import IGNORE
from kvcondense.methods import build_method
from kvcondense.session import MemoryFileError, MemorySession


class Tok:
    """Ids in, ids out: the session only needs encode/decode and an end-of-sequence id."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def make(method: str, **params):
    m = build_method(method, comp_tokens=2, **params)
    model = lora_model("llama", m)
    return MemorySession(model, Tok(), m, COMP), m, model


def parallel_nll(model, m, ep) -> float:
    lay = m.layout(ep, COMP)
    with torch.no_grad():
        logits = parallel_forward(model, [lay]).logits[0]
    scored = lay.targets != IGNORE
    return float(torch.nn.functional.cross_entropy(logits[scored], lay.targets[scored], reduction="sum"))


@pytest.mark.parametrize("method", ["ccm-concat", "ccm-merge"])
@pytest.mark.parametrize("recurrent", [True, False])
def test_session_matches_parallel_forward(method, recurrent):
    session, m, model = make(method, recurrent=recurrent)
    ep = episode(chunks=5)
    for t, chunk in enumerate(ep.chunks, 1):
        session.feed(chunk)
        assert session.steps == t
        assert session.memory_slots() == (2 * t if method == "ccm-concat" else 2)
    nll, n = session.score(ep.query, ep.answer)
    assert n == len(ep.answer)
    assert abs(nll - parallel_nll(model, m, ep)) < 1e-3


def test_answer_and_score_leave_the_memory_unchanged():
    session, _, _ = make("ccm-merge")
    ep = episode(chunks=3)
    for chunk in ep.chunks:
        session.feed(chunk)
    before = (session.memory_slots(), session.cache.seen, session.writer.state())
    first = session.score(ep.query, ep.answer)
    reply = session.answer(ep.query, max_new_tokens=5, stop="")
    assert len(reply.split()) == 5
    assert (session.memory_slots(), session.cache.seen, session.writer.state()) == before
    assert session.score(ep.query, ep.answer) == first


def test_save_load_round_trip(tmp_path):
    session, m, model = make("ccm-merge")
    ep = episode(chunks=4)
    for chunk in ep.chunks[:2]:
        session.feed(chunk)
    path = session.save(tmp_path / "memory.safetensors")
    other = MemorySession(model, Tok(), m, COMP)
    other.load(path)
    assert other.score(ep.query, ep.answer) == session.score(ep.query, ep.answer)
    for chunk in ep.chunks[2:]:  # the loaded memory keeps going exactly like the original
        session.feed(chunk), other.feed(chunk)
    assert abs(other.score(ep.query, ep.answer)[0] - parallel_nll(model, m, ep)) < 1e-3


def test_memory_from_another_checkpoint_is_refused(tmp_path):
    session, _, _ = make("ccm-merge")
    session.feed(episode().chunks[0])
    path = session.save(tmp_path / "m.safetensors")
    stranger, _, model = make("ccm-concat")
    with pytest.raises(MemoryFileError, match="made with another checkpoint"):
        stranger.load(path)
    with pytest.raises(MemoryFileError, match="does not exist"):
        stranger.load(tmp_path / "missing.safetensors")


def test_empty_turn_is_refused():
    session, _, _ = make("ccm-concat")
    with pytest.raises(ValueError, match="turn is empty"):
        session.feed("   ")
    with pytest.raises(ValueError, match="turn is empty"):
        session.feed(torch.tensor([], dtype=torch.long))
