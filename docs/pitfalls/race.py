"""Pitfall: shared state read before an await and written after it."""

import asyncio
import sys

balance = 100


async def withdraw(amount: int) -> None:
    global balance
    if balance >= amount:
        await asyncio.sleep(0.01)  # a call to the payment service: other tasks run here
        balance -= amount


async def main() -> None:
    await asyncio.gather(withdraw(80), withdraw(80))
    print("balance:", balance)  # -60: both checks passed before either withdrawal


if "--uvloop" in sys.argv:
    import uvloop

    uvloop.run(main())
else:
    asyncio.run(main())
