"""Pitfall: a retry loop that swallows cancellation, so the timeout around it does not hold."""

import asyncio
import sys
import time


async def fetch() -> str:
    await asyncio.sleep(0.4)  # a slow upstream
    raise ConnectionError("upstream reset the connection")


async def fetch_with_retry(attempts: int = 3) -> str | None:
    for _ in range(attempts):
        try:
            return await fetch()
        except BaseException:  # also catches CancelledError: the timeout's cancellation is lost
            continue
    return None


async def main() -> None:
    start = time.monotonic()
    async with asyncio.timeout(0.5):
        result = await fetch_with_retry()
    print(f"result {result} after {time.monotonic() - start:.1f} s, with a 0.5 s timeout")


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
