"""Wire formats of the inference endpoint: KServe v2 (JSON + binary extension) and msgpack."""
