"""`python -m seat.demo`: the library's main job, end to end.

A seeded synthetic world of people and facts (seat.demo.world), a small Llama trained
from scratch to answer questions about the people it knows and to say "I don't know ."
about people it has never seen (seat.demo.base, cached on disk), then fine-tuning on new
people's facts with full fine-tuning, LoRA, sparse only, KL only and SEAT
(seat.demo.methods), each evaluated with seat.evaluate: IDK rate on held-out unknown
people, recall on the new facts, retention of the known ones (seat.demo.run).

`python -m seat.demo.ops_tour` is a smaller tour of the public ops on a toy model.
"""
