"""Classify handwritten digits through the gateway with the official Triton client."""

import numpy as np
import tritonclient.http as httpclient
from sklearn.datasets import load_digits

digits = load_digits()
images = digits.images[:8].astype(np.float32).reshape(8, 1, 8, 8)  # raw 0..16 pixels

client = httpclient.InferenceServerClient("localhost:8000")
inp = httpclient.InferInput("image", list(images.shape), "FP32")
inp.set_data_from_numpy(images, binary_data=True)
result = client.infer("digits_cnn", [inp], outputs=[httpclient.InferRequestedOutput("probabilities")])
probabilities = result.as_numpy("probabilities")
print("predicted:", probabilities.argmax(axis=1).tolist())
print("actual:   ", digits.target[:8].tolist())
print("served by version", result.get_response()["model_version"])
