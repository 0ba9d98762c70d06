"""Hang: a task that ignores its cancellation, so the shutdown waiting for it waits on."""

import asyncio
import sys


async def flush(buffer: list[str], done: asyncio.Event) -> None:
    while not done.is_set():
        try:
            await done.wait()  # "not until the buffer is flushed"
        except asyncio.CancelledError:
            continue  # the cancellation is ignored: the loop goes round and waits again
    buffer.clear()


async def main() -> None:
    done = asyncio.Event()
    flusher = asyncio.create_task(flush(["a", "b"], done))  # the flusher starts
    await asyncio.sleep(0.05)
    flusher.cancel()
    # A shutdown would now wait for ever; this one gives up after a second, for the demo.
    finished, _ = await asyncio.wait([flusher], timeout=1.0)
    print(f"flusher finished after its cancellation: {bool(finished)}")
    done.set()
    await flusher


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
