"""What one trial runs: Ray Train / Ray Tune trainables built on :mod:`scoretune.engine`."""
