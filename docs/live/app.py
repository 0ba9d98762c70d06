import asyncio
import time


async def fetch_user(user_id: int, ready: asyncio.Event) -> None:
    await ready.wait()  # waiting for the database


async def handle(user_id: int, ready: asyncio.Event) -> None:
    await fetch_user(user_id, ready)


async def report() -> None:
    while True:
        time.sleep(0.02)  # building a report on the loop
        await asyncio.sleep(0.1)


async def main() -> None:
    ready = asyncio.Event()
    requests = [asyncio.create_task(handle(i, ready), name=f"request-{i}") for i in range(3)]
    reporter = asyncio.create_task(report(), name="reporter")
    await asyncio.sleep(30)
    ready.set()
    reporter.cancel()
    await asyncio.gather(*requests)


asyncio.run(main())
