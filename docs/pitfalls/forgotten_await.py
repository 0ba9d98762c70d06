"""Pitfall: a coroutine called without await. Nothing runs, and nothing fails."""

import asyncio
import sys


async def save(order: str) -> None:
    await asyncio.sleep(0.01)
    print("saved", order)  # never printed


async def main() -> None:
    save("A-17")  # the await is missing
    await asyncio.sleep(0.05)


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
