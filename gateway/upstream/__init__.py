"""Talking to Triton: the HTTP client, fleet health, and model metadata."""
