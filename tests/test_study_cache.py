"""The search's Optuna study served from memory (``SingleWriterStorage``): it holds exactly what the
database holds after every kind of write, TPE suggests the same points from it as from Optuna's own
cache, it sends no query for a read once loaded, and an unpickled one (``--resume``) reads the database
again. Real Optuna on real SQLite files."""

from __future__ import annotations

import pickle

import optuna
import pytest
from sqlalchemy import event

from scoretune.search.searcher import SingleWriterStorage, single_writer_storage
from scoretune.search.study_storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = {"lr": optuna.distributions.FloatDistribution(0.01, 0.5, log=True),
         "beta": optuna.distributions.FloatDistribution(1.0, 8.0),
         "loss": optuna.distributions.CategoricalDistribution(["se", "kl"])}


def _view(trials):
    """What a sampler or the dashboard reads of each trial."""
    return [(t.number, t.state, t.values, t.params, t.intermediate_values, t.user_attrs,
             dict(t.system_attrs)) for t in trials]


def _sampler():
    return optuna.samplers.TPESampler(seed=3, multivariate=True, constant_liar=True, n_startup_trials=4)


def _drive(study, rounds: int = 4, running: int = 3) -> list[dict]:
    """A search's pattern: ``running`` trials asked at once, each reporting epochs and attrs, then told
    (one failed, one pruned), ``rounds`` times; returns every suggested point."""
    points = []
    for r in range(rounds):
        asked = [study.ask(SPACE) for _ in range(running)]
        for i, t in enumerate(asked):
            points.append(dict(t.params))
            for step in (1, 2):
                t.report(t.params["lr"] * step + i, step)
            t.set_user_attr("scoretune.constraint_metrics", {"val_clean_acc": 0.5 + 0.01 * i})
            study._storage.set_trial_system_attr(t._trial_id, "ray_trial_id", f"r{r}-{i}")
        study.tell(asked[0], state=optuna.trial.TrialState.FAIL)
        study.tell(asked[1], 0.1 * r + asked[1].params["beta"] / 10)
        if running > 2:
            study.tell(asked[2], state=optuna.trial.TrialState.PRUNED)
    return points


def _url(tmp_path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}"


def test_after_every_kind_of_write_the_cache_holds_what_the_database_holds(tmp_path):
    url = _url(tmp_path, "a.db")
    cached = single_writer_storage(open_storage(url))
    assert isinstance(cached, SingleWriterStorage)
    study = optuna.create_study(study_name="s", storage=cached, sampler=_sampler(), direction="maximize")
    study.enqueue_trial({"lr": 0.1, "beta": 4.0, "loss": "se"})  # a points_to_evaluate trial
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.2, "beta": 2.0, "loss": "kl"}, distributions=SPACE,
                                              value=0.3))  # a warm-start trial
    _drive(study, rounds=2)
    running = study.ask(SPACE)  # one left RUNNING with its params
    running.report(0.7, 1)
    cached.set_trial_param(running._trial_id, "width", 0.5,  # a write made straight to the storage, not
                           optuna.distributions.FloatDistribution(0.0, 1.0))  # through the Trial object
    cached.set_trial_user_attr(running._trial_id, "note", "direct")
    cached.set_trial_intermediate_value(running._trial_id, 2, 0.8)
    fresh = optuna.storages.RDBStorage(url)
    sid = fresh.get_study_id_from_name("s")
    assert _view(cached.get_all_trials(sid)) == _view(fresh.get_all_trials(sid))
    assert len(fresh.get_all_trials(sid)) == 1 + 2 * 3 + 1  # the enqueued trial is the first one asked
    for t in fresh.get_all_trials(sid):
        assert _view([cached.get_trial(t._trial_id)]) == _view([t])


def test_tpe_suggests_the_same_points_as_from_optunas_own_cache(tmp_path):
    ours = optuna.create_study(study_name="s", storage=single_writer_storage(open_storage(_url(tmp_path, "a.db"))),
                               sampler=_sampler(), direction="maximize")
    optunas = optuna.create_study(study_name="s", storage=open_storage(_url(tmp_path, "b.db")),
                                  sampler=_sampler(), direction="maximize")
    assert _drive(ours, rounds=5) == _drive(optunas, rounds=5)


def test_a_loaded_study_is_read_without_a_query(tmp_path):
    cached = single_writer_storage(open_storage(_url(tmp_path, "a.db")))
    study = optuna.create_study(study_name="s", storage=cached, sampler=_sampler(), direction="maximize")
    _drive(study, rounds=2)
    running = [study.ask(SPACE) for _ in range(3)]  # three trials running, as while the search asks for more
    queries = []
    event.listen(cached._backend.engine, "before_cursor_execute", lambda *a, **k: queries.append(a[2]))
    sid = study._study_id
    for _ in range(5):
        cached.get_all_trials(sid, deepcopy=False)
        cached.get_all_trials(sid, states=(optuna.trial.TrialState.COMPLETE,))
        assert cached.get_trial(running[0]._trial_id).params == running[0].params
    assert queries == []
    plain = open_storage(_url(tmp_path, "a.db"))
    plain = optuna.storages._CachedStorage(plain)  # Optuna's cache re-reads the running trials on every read
    plain.get_all_trials(sid)
    event.listen(plain._backend.engine, "before_cursor_execute", lambda *a, **k: queries.append(a[2]))
    plain.get_all_trials(sid)
    assert queries, "the comparison is void: Optuna's own cache sent no query either"


def test_an_unpickled_storage_reads_what_was_written_while_it_was_saved(tmp_path):
    url = _url(tmp_path, "a.db")
    cached = single_writer_storage(open_storage(url))
    study = optuna.create_study(study_name="s", storage=cached, sampler=_sampler(), direction="maximize")
    _drive(study, rounds=1)
    saved = pickle.dumps(cached)  # Ray's searcher checkpoint
    later = optuna.load_study(study_name="s", storage=open_storage(url))  # e.g. the killed driver went on
    t = later.ask(SPACE)
    later.tell(t, 0.9)
    restored = pickle.loads(saved)
    assert isinstance(restored, SingleWriterStorage)
    sid = study._study_id
    got = restored.get_all_trials(sid)
    assert len(got) == 4 and got[-1].values == [0.9]
    assert _view(got) == _view(optuna.storages.RDBStorage(url).get_all_trials(sid))


@pytest.mark.parametrize("storage", [None, "memory"])
def test_storages_without_a_database_are_left_as_they_are(storage):
    s = None if storage is None else optuna.storages.InMemoryStorage()
    assert single_writer_storage(s) is s


def test_the_pickled_storage_carries_no_trial(tmp_path):
    cached = single_writer_storage(open_storage(_url(tmp_path, "a.db")))
    study = optuna.create_study(study_name="s", storage=cached, sampler=_sampler(), direction="maximize")
    small = len(pickle.dumps(cached))
    _drive(study, rounds=4)
    assert len(pickle.dumps(cached)) == small  # Tune's snapshot of the searcher does not grow with the study
