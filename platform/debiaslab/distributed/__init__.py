"""Ray execution: Ray Data map jobs, Ray Train DDP, Ray Tune sweeps (the only package importing ray)."""
