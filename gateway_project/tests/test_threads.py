"""Work handed to a worker thread whose result holds something to give back
(gateway_project/threads.py, ``in_thread_or_undo``): a caller cancelled at
any moment of the hop never strands it."""

import asyncio
import contextlib
import threading

import pytest

from gateway_project import threads


@pytest.mark.parametrize("when", ["while_the_thread_works", "as_the_result_lands"])
def test_a_cancelled_hop_undoes_what_its_thread_took(monkeypatch, when):
    # Given a hop whose awaiting task is cancelled either while its thread
    # works, or in the loop turn its result arrives in (before the task wakes)
    holder: dict[str, asyncio.Task] = {}
    undone: list[str] = []
    done = threading.Event()
    original = threads._settle

    def settle(future, result, error, undo):
        if when == "while_the_thread_works":
            holder["task"].cancel()
            original(future, result, error, undo)
        else:
            original(future, result, error, undo)
            holder["task"].cancel()

    monkeypatch.setattr(threads, "_settle", settle)

    async def undo(result: str) -> None:
        undone.append(result)
        done.set()

    async def main() -> str:
        task = asyncio.ensure_future(threads.in_thread_or_undo(lambda: "taken", undo))
        holder["task"] = task
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The undo runs in the background, on this loop: let it.
        while not done.is_set():
            await asyncio.sleep(0.01)
        return "cancelled" if task.cancelled() else "returned"

    outcome: dict[str, str] = {}
    runner = threading.Thread(target=lambda: outcome.update(r=asyncio.run(main())))
    runner.start()
    runner.join(20)

    # Then the task is cancelled, and what the thread took is undone once
    assert outcome == {"r": "cancelled"}
    assert undone == ["taken"]


def test_a_hop_that_is_not_cancelled_undoes_nothing():
    undone: list[str] = []

    async def undo(result: str) -> None:
        undone.append(result)

    async def main() -> str:
        return await threads.in_thread_or_undo(lambda: "kept", undo)

    assert asyncio.run(main()) == "kept"
    assert undone == []
