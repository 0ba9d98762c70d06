"""Two tests with classic asyncio mistakes: `pytest --loopwatch` fails both, with the line."""

import asyncio
import time

import pytest

background: set[asyncio.Task[None]] = set()


def render_invoice(order: str) -> str:
    time.sleep(0.25)  # a synchronous PDF library
    return f"invoice for {order}"


async def refresh_prices() -> None:
    while True:
        await asyncio.sleep(60)


@pytest.mark.asyncio
async def test_checkout() -> None:
    assert render_invoice("A-17") == "invoice for A-17"


@pytest.mark.asyncio
async def test_prices() -> None:
    task = asyncio.create_task(refresh_prices())  # never stopped
    background.add(task)
    await asyncio.sleep(0)
