"""`python -m seat.demo`: the library's main job, end to end.

Until the synthetic abstention world lands, this is a small SEAT run on a toy language
model built from the public ops: a random sparse mask, the reference forward by swapping
in the original values, the paired CE + KL loss from hidden states, gradient compaction
in a post-accumulate-grad hook, and sparse AdamW. See seat/demo/ops_tour.py.
"""
