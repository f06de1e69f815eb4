"""Ray Tune adapters for the early-stopping rules of :mod:`scoretune.stopping`.

Tune calls ``stopper(trial_id, result)`` after every reported result (one epoch of a trial)
and ``stopper.stop_all()`` to end the whole experiment. :class:`RuleStopper` keeps one rule
per trial, so trials never share state, and records why each stopped trial stopped in
``stops`` (the search's MLflow logging tags the trial's run with it).

    from trainables.stoppers import FloorStopper
    tune.RunConfig(stop=FloorStopper(floor=0.03, patience=2))
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ray.tune import Stopper
from scoretune.stopping import FloorRefiner, FloorRule, Rule, Stop

__all__ = ["RuleStopper", "FloorStopper"]


class RuleStopper(Stopper):
    """One rule per trial from ``rule_factory()``; a trial stops when its rule says so.

    ``stops[trial_id]`` is the :class:`~scoretune.stopping.Stop` of each stopped trial (which rule, why,
    at which epoch, the watched value, the floor). Never stops the whole experiment.
    Keep ``rule_factory`` picklable (a class or ``functools.partial``, not a lambda) so the
    stopper can be checkpointed with the experiment.
    """

    def __init__(self, rule_factory: Callable[[], Rule]):
        self.rule_factory = rule_factory
        self.rules: dict[str, Rule] = {}
        self.stops: dict[str, Stop] = {}

    def rule(self, trial_id: str) -> Rule:
        """The rule watching ``trial_id`` (created on first use)."""
        if trial_id not in self.rules:
            self.rules[trial_id] = self.rule_factory()
        return self.rules[trial_id]

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        rule = self.rule(trial_id)
        stop = bool(rule.should_stop(result))
        if stop and trial_id not in self.stops:
            self.stops[trial_id] = rule.stop(result) or Stop("early", rule.reason or "early_stopped")
        return stop

    def stop_all(self) -> bool:
        return False


class FloorStopper(RuleStopper):
    """SCORE's floor rule per trial: stop after ``patience`` epochs with ``metric`` (``train_r_madry``,
    the robust cross-entropy at the CE-PGD maximiser: R_Madry) below ``floor`` = (C^l1)^2/2 (Pang et
    al. 2022, Corollary 1). ``refine``: one :class:`~scoretune.stopping.FloorRefiner` shared by every
    trial's rule, so the floor is refined from the best trial so far (its ``val_c_l1`` at its best
    ``val_pgd_acc``); a stopped trial's ``Stop.floor`` is the floor it fell below."""

    def __init__(self, floor: float, patience: int = 2, metric: str = "train_r_madry", refine: bool = False):
        FloorRule(floor, patience, metric)  # validate now, not at the first result
        self.refiner = FloorRefiner(float(floor)) if refine else None
        super().__init__(functools.partial(FloorRule, float(floor), int(patience), metric, self.refiner or False))
        self.floor, self.patience, self.metric = float(floor), int(patience), metric
