"""Toy sequence tasks (copy, reverse, duplicate, associative recall) trained with attnjax.

Modules: :mod:`~attnjax.toy.tasks` (data and the token layout), :mod:`~attnjax.toy.models`
(encoder-decoder and decoder-only Transformers), :mod:`~attnjax.toy.decoding` (greedy decoding
with the key/value cache), :mod:`~attnjax.toy.train` (the training loop).
"""
