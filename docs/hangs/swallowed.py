"""Hang: a consumer that swallows its cancellation, so shutdown thinks it stopped cleanly."""

import asyncio
import sys


async def consume(queue: asyncio.Queue[str]) -> int:
    handled = 0
    while True:
        try:
            item = await queue.get()  # waiting for work when shutdown cancels it
        except asyncio.CancelledError:
            break  # "stop quietly": the cancellation is swallowed here
        handled += len(item)
    return handled


async def main() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    consumer = asyncio.create_task(consume(queue))  # the consumer starts
    await queue.put("order-1")
    await asyncio.sleep(0.05)
    consumer.cancel()
    handled = await consumer  # no CancelledError: whoever waits believes it finished its work
    print(f"consumer returned {handled}; cancelled: {consumer.cancelled()}")


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
