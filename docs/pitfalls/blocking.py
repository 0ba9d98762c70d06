"""Pitfall: a blocking call inside a coroutine. Every other task waits while it runs."""

import asyncio
import sys
import time


def load_prices() -> dict[str, float]:
    # Stands for any synchronous call: requests.get, a database driver, a big json.dumps.
    time.sleep(0.3)  # blocks the loop
    return {"EUR": 1.0}


async def handle_request() -> None:
    prices = load_prices()
    await asyncio.sleep(0.01)
    print("prices:", prices)


async def main() -> None:
    await asyncio.create_task(handle_request(), name="request-1")


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
