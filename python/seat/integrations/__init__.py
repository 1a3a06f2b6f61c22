"""Integrations of seat with other training libraries, one module each, imported on demand
(``import seat`` never imports them, nor the libraries they need):

  seat.integrations.trl   SeatSFTTrainer: SEAT inside trl.SFTTrainer (pip install seat[trl])
"""
