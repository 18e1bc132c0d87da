"""The online memory session: the same answer likelihood as the parallel training forward, memory that grows by n
slots per chunk (concat) or stays at n (merge), answers that leave the memory unchanged, and save/load."""

import os

import pytest
import torch
from conftest import COMP, episode, lora_model

from kvcondense.errors import UsageError
from kvcondense.forward import parallel_forward
from kvcondense.layout import IGNORE
from kvcondense.memory_file import MemoryFileError, check_save_path
from kvcondense.methods import build_method
from kvcondense.session import MemorySession


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
    lay = m.episode_layout(ep, COMP)
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
    with pytest.raises(ValueError, match="1-D tensor of token ids"):
        session.feed(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        session.answer("who?", max_new_tokens=-1)


@pytest.mark.parametrize(
    "method, params, slots",
    [
        ("full", {}, lambda n: n),  # everything is kept
        ("window", {"slots": 6, "sinks": 2}, lambda n: min(n, 6)),  # two sinks and the last four tokens
        ("no-context", {}, lambda n: 0),  # every turn is forgotten
    ],
)
def test_baseline_sessions_match_their_parallel_layout(method, params, slots):
    """full, window and no-context hold a chat memory too (they raised AttributeError), each exactly what its
    episode layout in the memory evaluation is."""
    session, m, model = make(method, **params)
    ep = episode(chunks=4)
    fed = 0
    for t, chunk in enumerate(ep.chunks, 1):
        session.feed(chunk)
        fed += len(chunk)
        assert session.steps == t and session.memory_slots() == slots(fed)
    nll, n = session.score(ep.query, ep.answer)
    assert n == len(ep.answer)
    assert abs(nll - parallel_nll(model, m, ep)) < 1e-3
    assert session.memory_slots() == slots(fed)  # scoring changed nothing
    session.answer(ep.query, max_new_tokens=3, stop="")
    assert session.score(ep.query, ep.answer)[0] == nll


@pytest.mark.parametrize("method", ["full", "window", "no-context", "ccm-concat"])
def test_baseline_and_ccm_memories_round_trip(tmp_path, method):
    session, m, model = make(method, slots=5, sinks=1)
    ep = episode(chunks=3)
    for chunk in ep.chunks[:2]:
        session.feed(chunk)
    path = session.save(tmp_path / "m.safetensors")
    other = MemorySession(model, Tok(), m, COMP)
    other.load(path)
    assert other.writer.state() == session.writer.state() and other.memory_slots() == session.memory_slots()
    session.feed(ep.chunks[2]), other.feed(ep.chunks[2])
    assert abs(other.score(ep.query, ep.answer)[0] - session.score(ep.query, ep.answer)[0]) < 1e-4


def test_methods_without_a_chat_memory_are_refused():
    m = build_method("sentinel")
    with pytest.raises(UsageError, match="keeps no memory"):
        MemorySession(lora_model("llama", m), Tok(), m, COMP)


def test_a_failed_feed_leaves_the_memory_as_before(tmp_path):
    """A failure half way through the layers (one layer has stored the chunk's keys, the next has not) puts the
    memory back exactly: the saved bytes are the same."""
    session, m, model = make("ccm-merge")
    ep = episode(chunks=3)
    for chunk in ep.chunks[:2]:
        session.feed(chunk)
    before = session.save(tmp_path / "before.safetensors").read_bytes()
    state = session.writer.state()

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    layer = model.base_model.model.model.layers[1]
    handle = layer.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.feed(ep.chunks[2])
    handle.remove()
    assert session.writer.state() == state
    assert session.save(tmp_path / "after.safetensors").read_bytes() == before
    session.feed(ep.chunks[2])  # and it goes on exactly like a session that never failed
    fresh, _, _ = make("ccm-merge")
    fresh.model = model
    for chunk in ep.chunks:
        fresh.feed(chunk)
    assert session.score(ep.query, ep.answer) == fresh.score(ep.query, ep.answer)


def test_save_is_atomic_and_refuses_unwritable_paths(tmp_path):
    session, _, _ = make("ccm-concat")
    session.feed(episode().chunks[0])
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old memory")
    session.save(target)
    assert target.read_bytes()[:8] != b"old memor" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for bad, match in ((blocker / "m.safetensors", "is a file"), (tmp_path, "is a directory")):
        with pytest.raises(MemoryFileError, match=match):
            check_save_path(bad)
        with pytest.raises(MemoryFileError, match=match):
            session.save(bad)
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", target.name]
    assert check_save_path(tmp_path / "new" / "dir" / "m.safetensors")  # missing folders are made on save
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused_before_saving(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(MemoryFileError, match="not writable"):
            check_save_path(folder / "m.safetensors")
    finally:
        folder.chmod(0o755)


def test_each_method_hands_out_its_own_memory_writer():
    """MemorySession asks the method for its writer (no isinstance chain): CCM's compressed memory, the baselines'
    plain text, and a one-line refusal for methods that keep no chat memory."""
    from kvcondense.methods.ccm import MemoryWriter
    from kvcondense.methods.memory import TextWriter

    assert isinstance(build_method("ccm-merge", comp_tokens=2).memory_writer(COMP), MemoryWriter)
    window = build_method("window", slots=10, sinks=2).memory_writer({})
    assert isinstance(window, TextWriter) and window.window == 8 and window.sinks == 2
    assert build_method("no-context").memory_writer({}).keep is False
    with pytest.raises(UsageError, match="keeps no memory"):
        build_method("gist").memory_writer({})
