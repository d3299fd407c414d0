"""Classify handwritten digits through the gateway over msgpack (numpy in, numpy out)."""

import asyncio

import numpy as np
from sklearn.datasets import load_digits

from gateway.client import GatewayClient


async def main() -> None:
    digits = load_digits()
    images = digits.images[:8].astype(np.float32).reshape(8, 1, 8, 8)
    async with GatewayClient("http://localhost:8000") as client:
        result = await client.infer("digits_cnn", {"image": images}, outputs=["probabilities"])
    print("predicted:", result.outputs["probabilities"].argmax(axis=1).tolist())
    print("actual:   ", digits.target[:8].tolist())
    print("served by version", result.model_version)


asyncio.run(main())
