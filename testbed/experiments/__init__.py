"""Experiments over runs: sweeps (Fig. 4), claims, figures and scenario expectations."""
