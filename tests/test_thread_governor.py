"""The thread governor: torch's threads sized, in the engine's loops, to the CPUs other processes leave free."""

import itertools

import pytest
import torch
from conftest import TINY
from scoretune import thread_governor as tg
from scoretune import threads
from scoretune.config import build_config

POLICY = {threads.COUNT_VAR: "2", threads.MARK_VAR: "OMP_NUM_THREADS=2"}  # the policy's own count


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("others, cpus, max_threads, want", [
    (0.0, 2, 2, 2),    # a free machine: the whole budget
    (0.4, 2, 2, 2),    # light load: the second CPU is mostly free
    (0.5, 2, 2, 1),    # half a CPU taken: one thread
    (1.0, 2, 2, 1),    # one busy process on 2 CPUs
    (2.0, 2, 2, 1),    # two: still one thread, never none
    (0.0, 8, 4, 4),    # never more than the budget
    (3.0, 8, 8, 5),    # five CPUs free
    (3.4, 8, 8, 5),    # 4.6 free: the fifth mostly free
    (3.6, 8, 8, 4),    # 4.4 free
    (-0.1, 2, 2, 2),   # a sample below zero counts as free
])
def test_threads_follow_the_cpus_the_others_leave_free(others, cpus, max_threads, want):
    assert tg.threads_for(others, cpus, max_threads) == want


def test_only_a_policy_set_count_is_governed():
    assert tg.governable(POLICY)
    assert tg.governable({})
    assert not tg.governable({**POLICY, threads.COUNT_VAR: "1"})  # changed since: the user's
    assert not tg.governable({threads.COUNT_VAR: "2"})  # unmarked: the user's (or Ray's)
    assert not tg.governable({**POLICY, "OMP_WAIT_POLICY": "PASSIVE"})
    assert not tg.governable({**POLICY, "GOMP_SPINCOUNT": "10000"})
    assert not tg.governable({threads.MARK_VAR: "off"})


STAT = """cpu  {a} 0 {b} {idle} 0 0 0 0 0 0
cpu0 {a0} 0 {b0} {idle0} 0 0 0 0 0 0
cpu1 {a1} 0 {b1} {idle1} 0 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""


def _stat(path, cpu0: tuple[int, int, int], cpu1: tuple[int, int, int]) -> None:
    """cpuN: (user, system, idle) jiffies; the aggregate line sums them."""
    a, b, idle = (x + y for x, y in zip(cpu0, cpu1))
    path.write_text(STAT.format(a=a, b=b, idle=idle, a0=cpu0[0], b0=cpu0[1], idle0=cpu0[2],
                                a1=cpu1[0], b1=cpu1[1], idle1=cpu1[2]))


def test_busy_and_total_jiffies_come_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    assert tg.read_cpu_jiffies(stat) is None  # no /proc/stat (macOS): nothing to read
    stat.write_text("cpu  10 1 5 100 4 2 3 7 0 0\n")  # user nice system idle iowait irq softirq steal
    assert tg.read_cpu_jiffies(stat) == (10 + 1 + 5 + 2 + 3 + 7, 10 + 1 + 5 + 2 + 3 + 7 + 100 + 4)
    _stat(stat, (100, 20, 500), (40, 10, 900))
    assert tg.read_cpu_jiffies(stat) == (170, 1570)
    assert tg.read_cpu_jiffies(stat, {1}) == (50, 950)  # only the CPUs the process may run on
    assert tg.read_cpu_jiffies(stat, {0, 1}) == (170, 1570)
    assert tg.read_cpu_jiffies(stat, {5}) is None


def test_the_others_load_is_the_busy_time_less_our_own_over_the_wall_time(tmp_path):
    stat = tmp_path / "stat"
    clock, own = [100.0], [7.0]
    load = tg.OthersLoad(stat, {0, 1}, clock=lambda: clock[0], own_cpu=lambda: own[0], ticks_per_second=100)
    _stat(stat, (1000, 0, 0), (1000, 0, 0))
    assert load() is None  # the first sample: no interval yet
    # 0.5 s: the CPUs were busy 90 jiffies = 0.9 CPU-s, 0.4 of them ours -> others 0.5 s / 0.5 s = 1 CPU
    clock[0], own[0] = 100.5, 7.4
    _stat(stat, (1045, 0, 5), (1045, 0, 5))
    assert load() == pytest.approx(1.0)
    # 1 s, all of the busy time ours (our own clock may run ahead of the jiffies): nobody else, not below 0
    clock[0], own[0] = 101.5, 8.5
    _stat(stat, (1095, 0, 55), (1095, 0, 55))
    assert load() == 0.0
    stat.unlink()
    assert load() is None


class Script:
    """A fake load: the values in turn (the last one repeats), each call counted."""

    def __init__(self, *values: float):
        self.values, self.calls = list(values), 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values[min(self.calls, len(self.values)) - 1]


def test_ticks_sample_once_per_interval_and_resize_only_on_a_change(monkeypatch):
    torch.set_num_threads(2)
    clock = [0.0]
    load = Script(1.0, 1.0, 0.0)
    gov = tg.ThreadGovernor(2, "cpu", interval=0.5, env=POLICY, others=load, cpus=2, clock=lambda: clock[0])
    assert gov.active
    sets = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (sets.append(n), real(n)))
    with gov:
        for t in (0.1, 0.2, 0.4):
            clock[0] = t
            gov.tick()
        assert load.calls == 0 and torch.get_num_threads() == 2  # within the first interval: no sample
        clock[0] = 0.5
        gov.tick()
        assert load.calls == 1 and torch.get_num_threads() == 1  # one busy process: one thread
        clock[0] = 1.2
        gov.tick()
        assert load.calls == 2 and sets == [1]  # still busy: not set again
        clock[0] = 1.6
        gov.tick()
        assert load.calls == 2  # 0.4 s after the last sample
        clock[0] = 1.7
        gov.tick()
        assert load.calls == 3 and torch.get_num_threads() == 2  # free again
        clock[0] = 2.2
        gov.tick()
        assert torch.get_num_threads() == 2 and sets == [1, 2]
    load.values = [2.0]
    clock[0] = 3.0
    with gov:
        gov.tick()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # the loop's end puts the budget back
    with gov:
        assert torch.get_num_threads() == 1  # the next loop starts from the last decision


@pytest.mark.parametrize("max_threads, device, env", [
    (1, "cpu", POLICY),                                    # one thread: nothing to size
    (2, "cuda", POLICY),                                   # the GPU does the work
    (2, "cpu", {threads.MARK_VAR: "off"}),                 # SCORETUNE_THREADS=off
    (2, "cpu", {threads.COUNT_VAR: "2"}),                  # the user's count
    (2, "cpu", {**POLICY, "OMP_WAIT_POLICY": "PASSIVE"}),  # the user's wait setting
])
def test_the_governor_leaves_alone_what_it_should_not_size(max_threads, device, env):
    torch.set_num_threads(2)
    load = Script(2.0)
    gov = tg.ThreadGovernor(max_threads, device, env=env, others=load, cpus=2, clock=itertools.count().__next__)
    with gov:
        for _ in range(5):
            gov.tick()
    assert not gov.active and load.calls == 0 and torch.get_num_threads() == 2


def test_without_proc_stat_the_governor_does_nothing(monkeypatch, tmp_path):
    real = tg.OthersLoad
    monkeypatch.setattr(tg, "OthersLoad", lambda cpus=None: real(tmp_path / "missing", cpus))
    assert not tg.ThreadGovernor(2, "cpu", env=POLICY).active


def test_a_cpu_training_drops_to_one_thread_while_the_machine_is_busy():
    """A real epoch (training, the R_Madry probe, validation) with the Trainer's governor on a fake load."""
    from scoretune.engine import Trainer

    torch.set_num_threads(2)
    trainer = Trainer(build_config(TINY))
    seen = []  # torch's threads at each sample, before its decision

    def load() -> float:
        seen.append(torch.get_num_threads())
        return 2.0 if len(seen) <= 4 else 0.0  # busy for four samples, then free

    trainer.governor = tg.ThreadGovernor(2, trainer.device, env=POLICY, others=load, cpus=2,
                                         clock=itertools.count().__next__)  # every tick samples
    row = trainer.train_one_epoch()
    assert seen[:6] == [2, 1, 1, 1, 1, 2]
    assert len(seen) > len(trainer.train_loader) + 1  # the probe and the validation ticked too
    assert torch.get_num_threads() == 2 and row["train_loss"] > 0


def test_autoattack_ticks_a_governor_on_every_forward_pass(monkeypatch):
    """AutoAttack's own loops call the model, not the engine: it attacks a :class:`Governed` wrapper."""
    from scoretune import robustness

    torch.set_num_threads(2)
    made = []

    def governor(max_threads, device):
        made.append(tg.ThreadGovernor(max_threads, device, env=POLICY, others=Script(2.0), cpus=2,
                                      clock=itertools.count().__next__))
        return made[-1]

    monkeypatch.setattr(robustness, "ThreadGovernor", governor)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))  # APGD-T's DLR loss needs 4 classes
    with torch.no_grad():
        net[1].bias[0] = 5.0  # class 0 by a margin eps 0.1 cannot overcome: every point is attacked to the end
    x, y = torch.rand(6, 1, 2, 2), torch.zeros(6, dtype=torch.long)
    result = robustness.autoattack_accuracy(net, x, y, 0.1, version="fast")
    assert result.robust_acc == 1.0
    assert made[0].others.calls > 100  # APGD's iterations ticked it
    assert torch.get_num_threads() == 2  # and the attack's end put the budget back
