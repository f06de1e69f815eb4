"""Drivers: the processes that run trainings and searches (single process, Ray Train, Ray Tune).

They sit above ``trainables`` (what a worker or a trial runs) and below ``commands`` (argument parsing)."""
