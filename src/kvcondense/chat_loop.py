"""The chat loop over a :class:`~kvcondense.session.MemorySession`: each user line, its answer and the reply go
into memory as one turn, whole or not at all (``kvcondense chat``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    from .session import MemorySession


def chat(
    session: MemorySession, lines, out, err, stats: bool = False, max_new_tokens: int = 48, echo: bool = False
) -> int:
    """Chat turn by turn: each user line and each reply is compressed into memory as one turn (speakers A/B, the
    dialogue format of :mod:`kvcondense.data.episodes`). Returns the number of rejected (empty) turns. ``echo``
    prints each user line as ``A: ...`` before its reply (piped input, which the terminal did not show).

    A turn (the user's line, the answer, the reply) goes into memory whole or not at all. One that would pass the
    model's context is refused before it runs (:class:`~kvcondense.session.ContextFullError`); one that fails in
    any way, or is interrupted, leaves the memory as it was before it (:meth:`MemorySession.turn
    <kvcondense.session.MemorySession.turn>`). Either error propagates (a failure that is not the user's is named
    on ``err`` first), so the caller can still save the memory, the last good state, in a ``finally``.
    """
    from .data.episodes import SPEAKERS, TURN

    user, bot = SPEAKERS
    prompt = f"{bot}:"
    answer_tokens = len(session._ids(prompt, "prompt")) + max_new_tokens
    reply_tokens = len(session._ids(TURN.format(speaker=bot, text="."), "reply")) - 1 + max_new_tokens  # estimate
    rejected = 0
    for line in lines:
        message = line.strip()
        if not message:
            print("error: the turn is empty; type some text (nothing was added to memory)", file=err)
            rejected += 1
            continue
        if echo:
            print(f"{user}: {message}", file=out, flush=True)
        ids = session._ids(TURN.format(speaker=user, text=message), "turn")
        session.check_room(session.turn_end(len(ids), answer_tokens, reply_tokens))
        try:
            with session.turn():
                session.feed(ids)
                reply = session.answer(prompt, max_new_tokens=max_new_tokens).strip()
                if reply:
                    session.feed(TURN.format(speaker=bot, text=reply))
        except UsageError:
            raise
        except Exception as e:
            print(f"error: the turn failed ({type(e).__name__}: {e}); the memory is as before it", file=err)
            raise
        print(f"{bot}: {reply}", file=out, flush=True)
        if stats:
            print(f"memory: {session.memory_slots()} slots, {session.memory_bytes()} bytes", file=out, flush=True)
    return rejected
