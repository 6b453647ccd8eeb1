"""TRL-style trainers: `TRDPOConfig` and `TRDPOTrainer` live in :mod:`hf_ext.trainers.trdpo`."""
