"""Pitfall: tasks started and never cleaned up: a lost exception, and a task nobody holds."""

import asyncio
import gc
import sys


async def send_receipt(order: str) -> None:
    await asyncio.sleep(0.01)
    raise ConnectionError(f"mail server refused the receipt for {order}")


async def wait_for_payment(order: str) -> None:
    await asyncio.get_running_loop().create_future()  # nobody else holds this future


async def main() -> None:
    asyncio.create_task(send_receipt("A-17"))  # fire and forget: its error goes nowhere
    asyncio.create_task(wait_for_payment("A-17"))  # nobody keeps a reference to it
    await asyncio.sleep(0.1)
    gc.collect()  # any collection, at any time, destroys the pending task
    await asyncio.sleep(0.1)


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
