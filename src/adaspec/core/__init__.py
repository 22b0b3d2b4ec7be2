"""The engine: configs, sampling, acceptance rules, length policies, the cost model, KV caches, drafters, backends,
the one-sequence loop (decode.py) and the batched step (batch.py). Nothing here imports from outside core/
(tests/test_layers.py checks it): methods, routing, bench, train, serve and the CLI build on it."""
