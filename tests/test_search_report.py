"""What a researcher reads after a search: the status scheme, the summary metrics, the results table and
parent description, the plots, and the MLflow UI view state (no Ray, no MLflow server)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from scoretune.search.report import (
    SearchSummary,
    TrialSummary,
    aa_reranks,
    aa_se,
    divergence,
    format_report,
    format_table,
    status_label,
    trial_summary_metrics,
)
from scoretune.search.space import SearchSpace


def rows(accs, losses, kls=None):
    kls = kls or [1.0] * len(accs)
    return [{"epoch": float(i + 1), "val_clean_acc": a, "val_pgd_acc": a / 2, "train_loss": l, "train_madry_kl": k}
            for i, (a, l, k) in enumerate(zip(accs, losses, kls))]


# -- status scheme
def test_status_label_says_what_stopped_the_trial_and_when():
    assert status_label("stopped_asha", 3) == "[asha@3]"
    assert status_label("stopped_floor", 7) == "[floor@7]"
    assert status_label("completed", 12) == "[done@12]"
    assert status_label("diverged", 4) == "[diverged]"
    assert status_label("failed", 2) == "[failed]"


def test_a_trial_at_chance_accuracy_has_diverged():
    why = divergence(rows([0.3, 0.12, 0.10], [2.0, 2.3, 2.3]), num_classes=10)
    assert why is not None and "chance (1/10)" in why and "epoch 3" in why and "not falling" in why
    why = divergence(rows([0.10], [1.7], kls=[94.0]), num_classes=10)  # one epoch, confidently wrong
    assert why == "val_clean_acc=0.100 at epoch 1 is chance (1/10), train_madry_kl=94"


def test_a_slow_trial_at_chance_after_one_epoch_has_not_diverged():
    assert divergence(rows([0.11], [2.3], kls=[2.3]), num_classes=10) is None  # near uniform: ln 10
    assert divergence(rows([0.11, 0.12], [2.3, 2.25], kls=[2.3, 2.3]), num_classes=10) is None  # still learning


def test_a_learning_trial_has_not_diverged():
    assert divergence(rows([0.3, 0.5, 0.7], [2.0, 1.5, 1.1]), num_classes=10) is None
    assert divergence([], num_classes=10) is None


def test_an_exploding_or_non_finite_loss_is_divergence_whatever_the_accuracy():
    assert "exploded from 1.5 to 4.6" in divergence(rows([0.3, 0.5, 0.5], [2.0, 1.5, 4.6]), num_classes=10)
    assert "became nan" in divergence(rows([0.3, 0.5], [2.0, math.nan]))
    assert divergence(rows([0.3, 0.5, 0.5], [2.0, 1.5, 4.4]), num_classes=10) is None  # under 3x


def test_chance_needs_the_class_count():
    assert divergence(rows([0.3, 0.1], [2.0, 2.1]), num_classes=None) is None


# -- summary metrics
def test_summary_metrics_are_the_best_epoch_values_first_on_a_tie():
    objs = [SimpleNamespace(metric="val_pgd_acc", mode="max")]
    r = rows([0.4, 0.8, 0.8, 0.6], [2, 1.5, 1.4, 1.3])
    assert trial_summary_metrics(r, objs) == {"best_val_pgd_acc": 0.4, "best_val_clean_acc": 0.8, "best_epoch": 2.0,
                                              "epochs_run": 4.0}
    assert trial_summary_metrics([], objs) == {"epochs_run": 0.0}


def test_autoattack_standard_error_is_binomial():
    assert aa_se(0.5, 100) == pytest.approx(0.05)
    assert aa_se(0.0, 10) == 0.0


# -- the table, the report, the parent description
@pytest.fixture
def space():
    return SearchSpace.model_validate({
        "name": "rep", "base": {"data": {"name": "digits"}, "epochs": 4},
        "params": {"lr": {"loguniform": [0.01, 1.0]}, "loss": {"choice": ["se", "kl"]}, "beta": {"uniform": [1, 8]}},
        "objective": {"metric": "val_pgd_acc", "mode": "max"}, "num_samples": 4, "top_k": 2,
        "stoppers": {"floor": {"value": 0.2, "patience": 2}}})


def trial(tid, status, lr, acc, *, aa=None, ep=4, best_ep=3, loss="se", beta=4.0):
    best = {} if acc is None else {"best_val_pgd_acc": acc, "best_epoch": float(best_ep)}
    return TrialSummary(trial_id=tid, run_id=f"run{tid}" + "0" * 24, status=status,
                        point={"lr": lr, "loss": loss, "beta": beta}, epochs=ep, best=best,
                        reason={"stopped_asha": "ASHA stopped it after epoch 1 of 4",
                                "diverged": "val_clean_acc=0.100 at epoch 2 is chance (1/10)"}.get(status, ""),
                        aa_acc=aa, aa_se=None if aa is None else aa_se(aa, 200))


@pytest.fixture
def summary(space):
    ts = [trial("aaaa1111", "completed", 0.1, 0.46, aa=0.30), trial("bbbb2222", "completed", 0.3, 0.44, aa=0.35),
          trial("cccc3333", "stopped_asha", 0.02, 0.20, ep=1, best_ep=1),
          trial("dddd4444", "diverged", 0.9, 0.10, ep=2, best_ep=1)]
    return SearchSummary(name="rep", trials=ts, pareto=[], parent_run_id="p" * 32, experiment_id="7",
                         tracking_uri="sqlite:///x.db", ray_path="/tmp/r", objectives=list(space.objective), space=space)


def test_table_has_aa_acc_best_epoch_and_run_id(summary, space):
    lines = format_table(summary, list(space.params)).splitlines()
    assert lines[0].split() == ["trial", "status", "ep", "best_ep", "lr", "loss", "beta", "val_pgd_acc(max)",
                                "aa_acc", "run"]
    first = lines[1].split()
    assert first[:4] == ["aaaa1111", "completed", "4", "3"]
    assert first[-2] == "0.3000±0.0324" and first[-1] == summary.trials[0].run_id
    assert lines[3].split()[-2] == "-"


def test_report_says_when_autoattack_reranks_and_gives_the_aa_promote_command(summary, space):
    assert aa_reranks(summary).trial_id == "bbbb2222"
    text = format_report(summary, space)
    assert "AutoAttack ranks the top trials differently" in text
    assert "scoretune promote --search rep --metric aa_acc" in text


def test_report_keeps_the_plain_promote_command_when_autoattack_agrees(summary, space):
    summary.trials[1].aa_acc = 0.2
    assert aa_reranks(summary) is None
    assert "--metric aa_acc" not in format_report(summary, space)


def test_parent_description_is_a_markdown_table_with_links_reasons_and_the_aa_line(summary, space):
    from scoretune.search.finalize import parent_description

    md = parent_description(summary, space)
    assert "**Best: [aaaa1111](#/experiments/7/runs/runaaaa1111" + "0" * 24 + "?workflowType=machine_learning)" in md
    assert "| trial | status | ep | best_ep | lr | loss | beta | val_pgd_acc(max) | aa_acc | run |" in md
    assert md.count("\n| [") == 4  # one linked row per trial
    assert "dddd4444 **diverged**: val_clean_acc=0.100" in md
    assert "Stopped: completed 2, diverged 1, stopped_asha 1." in md
    assert "`scoretune promote --search rep --metric aa_acc`" in md


def test_tied_trials_keep_their_mark_on_the_description_links(summary, space):
    from scoretune.search.finalize import parent_description
    from scoretune.search.report import rank_trials

    summary.trials[1].best = dict(summary.trials[0].best)  # bbbb2222 ties aaaa1111, at the same best epoch
    summary.trials = rank_trials(summary.trials, space.objective)
    md = parent_description(summary, space)
    assert "| [aaaa1111=](#/experiments/7/runs/runaaaa1111" in md and "| [bbbb2222=](" in md


# -- plots
def test_plots_exist_with_labelled_axes_and_the_floor_on_the_clipped_loss_panel(summary, space, tmp_path):
    from scoretune.search.plots import Curves, draw_plots

    c = Curves()
    for i, t in enumerate(summary.trials):
        n = t.epochs
        c.objective[t.trial_id] = ([float(e) for e in range(1, n + 1)], [0.1 + 0.1 * e * (i < 2) for e in range(n)])
        c.loss[t.trial_id] = ([float(e) for e in range(1, n + 1)],
                              [50.0 * e for e in range(1, n + 1)] if t.status == "diverged" else [0.6 - 0.1 * e for e in range(n)])
    figs = draw_plots(summary, space, c, floor=0.2)
    assert set(figs) == {"plots/learning_curves.png", "plots/objective_vs_params.png",
                         "plots/param_importance.png", "plots/parallel_coordinates.png"}
    obj, loss = figs["plots/learning_curves.png"].axes[:2]
    assert obj.get_xlabel() == "epoch" and obj.get_ylabel() == "val_pgd_acc"
    assert loss.get_ylabel().startswith("R_Madry")
    labels = [t.get_text() for t in obj.get_legend().get_texts()]
    assert labels[0].startswith("#1 aaaa1111  0.460") and labels[1].startswith("#2 bbbb2222")  # in rank order
    first, second = (next(ln for ln in obj.get_lines() if ln.get_label() == lab) for lab in labels[:2])
    assert first.get_color() != second.get_color()
    assert all(float(x).is_integer() for x in obj.get_xticks())  # epochs: no tick at 1.5
    assert any("floor" in lab for lab in [t.get_text() for t in loss.get_legend().get_texts()])
    lo, hi = loss.get_ylim()
    assert hi < 1.0 and lo <= 0.2  # the diverged trial's 200 is clipped away, the floor is on the panel
    dashed = [ln for ln in obj.get_lines() if ln.get_linestyle() == "--" and len(ln.get_xdata()) == 1]
    assert dashed  # the ASHA-stopped trial (one epoch) is dashed
    axes = figs["plots/objective_vs_params.png"].axes
    assert [a.get_xlabel() for a in axes] == ["lr (log scale)", "loss", "beta"]
    ticks = [t.get_text() for t in axes[0].get_xticklabels()]
    assert not any("10^" in t or "$" in t for t in ticks)
    for name, fig in figs.items():
        path = tmp_path / name.split("/")[-1]
        fig.savefig(path)
        assert path.stat().st_size > 5000


# -- the MLflow UI view state
def test_view_state_sorts_by_the_best_objective_with_params_and_summary_columns():
    from scoretune.tracking.ui_links import view_state

    parent = SimpleNamespace(info=SimpleNamespace(run_id="P1"), data=SimpleNamespace(params={"search.objective": "val_pgd_acc:max"}))
    child = SimpleNamespace(data=SimpleNamespace(params={"beta": "3", "lr": "0.1", "method": "trades", "eps": "0.2",
                                                         "floor": "0.2"}, metrics={}))
    st = view_state(parent, [child])
    assert st["orderByKey"] == "metrics.`best_val_pgd_acc`" and st["orderByAsc"] is False
    assert st["searchFilter"] == "tags.`mlflow.parentRunId` = 'P1'"
    assert st["selectedColumns"][:3] == ["params.`beta`", "params.`lr`", "metrics.`best_val_pgd_acc`"]
    assert "metrics.`aa_acc`" in st["selectedColumns"] and "tags.`scoretune.stop_reason`" in st["selectedColumns"]


def test_a_ranked_search_sorts_its_runs_table_by_the_logged_rank():
    from scoretune.tracking.ui_links import view_state

    parent = SimpleNamespace(info=SimpleNamespace(run_id="P1"), data=SimpleNamespace(params={"search.objective": "val_pgd_acc:max"}))
    child = SimpleNamespace(data=SimpleNamespace(params={"beta": "3"}, metrics={"rank": 1.0}))
    st = view_state(parent, [child])
    assert st["orderByKey"] == "metrics.`rank`" and st["orderByAsc"] is True


def test_the_chart_view_starts_with_the_parallel_coordinates_of_every_searched_param_then_the_curves():
    from scoretune.tracking.ui_links import view_state

    parent = SimpleNamespace(info=SimpleNamespace(run_id="P1"), data=SimpleNamespace(params={"search.objective": "val_pgd_acc:max"}))
    params = {"beta": "3", "lr": "0.1", "loss": "se", "clip": "0", "eps": "0.2"}
    child = SimpleNamespace(data=SimpleNamespace(params=params, metrics={"val_pgd_acc": 0.4, "train_loss": 1.0, "epoch": 2.0}))
    st = view_state(parent, [child])
    first, *curves = st["compareRunCharts"]
    assert first["type"] == "PARALLEL" and first["selectedParams"] == ["beta", "lr", "loss", "clip"]
    assert first["selectedMetrics"] == ["best_val_pgd_acc"]
    assert [c["metricKey"] for c in curves] == ["val_pgd_acc", "train_loss"]  # the curves the trials logged
    assert [s["isReordered"] for s in st["compareRunSections"]] == [True]  # MLflow appends the rest after them


def test_the_compare_view_is_the_top_k_runs_of_the_search():
    from scoretune.tracking.ui_links import view_state

    parent = SimpleNamespace(info=SimpleNamespace(run_id="P1"), data=SimpleNamespace(params={"search.objective": "val_pgd_acc:max"}))
    st = view_state(parent, [], runs=["a1", "b2"])
    assert st["searchFilter"] == "tags.`mlflow.parentRunId` = 'P1' and attributes.run_id IN ('a1', 'b2')"


def test_a_logged_model_carries_its_objectives_first_and_not_the_whole_epoch_row(space):
    from scoretune.search.finalize import model_metrics

    row = {"epoch": 3.0, "lr": 0.1, "train_loss": 1.2, "val_clean_acc": 0.8, "val_pgd_acc": 0.5, "epoch_time": 2.0}
    assert list(model_metrics(row, space.objective).items()) == [("model_val_pgd_acc", 0.5), ("model_val_clean_acc", 0.8)]


# -- one ranking rule: value, then the earlier best epoch, then the trial id
def _ranked(*rows):
    from scoretune.search.report import TrialSummary

    return [TrialSummary(trial_id=tid, run_id=None, status="completed", point={}, epochs=4,
                         best={"best_val_pgd_acc": v, "best_epoch": ep}) for tid, v, ep in rows]


def test_a_tie_goes_to_the_earlier_best_epoch_then_the_smaller_trial_id():
    from scoretune.search.report import rank_trials
    from scoretune.search.space import ObjectiveSpec

    trials = _ranked(("c", 0.4519, 3), ("b", 0.4519, 2), ("a", 0.4519, 3), ("d", 0.46, 4))
    order = [t.trial_id for t in rank_trials(trials, [ObjectiveSpec()])]
    assert order == ["d", "b", "a", "c"]


def test_tied_trials_are_marked_in_the_summary_table():
    from scoretune.search.report import SearchSummary, rank_trials, table_rows
    from scoretune.search.space import ObjectiveSpec

    trials = rank_trials(_ranked(("c", 0.4519, 3), ("b", 0.4519, 2), ("d", 0.46, 4)), [ObjectiveSpec()])
    summary = SearchSummary(name="s", trials=trials, pareto=[], parent_run_id="P", experiment_id="0",
                            tracking_uri="", ray_path="", objectives=[ObjectiveSpec()])
    _, rows = table_rows(summary, [])
    assert [r[0] for r in rows] == ["d", "b=", "c="]


def test_promote_breaks_a_tie_as_the_summary_does(monkeypatch):
    from scoretune.tracking.promote import pick_best

    def run(tid, v, ep):
        return SimpleNamespace(info=SimpleNamespace(run_id=f"r{tid}"),
                               data=SimpleNamespace(tags={"scoretune.trial_id": tid, "scoretune.model_uri": "m"},
                                                    metrics={"best_val_pgd_acc": v, "best_epoch": ep}, params={}))

    runs = [run("c", 0.4519, 3), run("b", 0.4519, 2), run("a", 0.4519, 3)]
    parent = SimpleNamespace(info=SimpleNamespace(run_id="P", experiment_id="0", run_name="p"),
                             data=SimpleNamespace(params={"search.objective": "val_pgd_acc:max"}, tags={}))
    monkeypatch.setattr("scoretune.tracking.promote.child_runs", lambda cl, p, stage=None: runs)
    best, value = pick_best(None, parent, "val_pgd_acc", "max")
    assert best.data.tags["scoretune.trial_id"] == "b" and value == 0.4519


# -- the best checkpoint outlives Ray's pruning
def test_preserved_checkpoint_survives_the_deletion_of_the_original(tmp_path):
    import shutil

    from trainables.ray_checkpoint import preserve_checkpoint

    src = tmp_path / "trial" / "checkpoint_000002"
    src.mkdir(parents=True)
    (src / "state.pt").write_bytes(b"weights-2")
    (src / "history.json").write_text("[]")
    kept = preserve_checkpoint(str(src))
    assert kept == str(tmp_path / "trial" / "best_checkpoint")
    shutil.rmtree(src)  # what Ray's num_to_keep pruning does
    assert (tmp_path / "trial" / "best_checkpoint" / "state.pt").read_bytes() == b"weights-2"
    newer = tmp_path / "trial" / "checkpoint_000005"
    newer.mkdir()
    (newer / "state.pt").write_bytes(b"weights-5")
    preserve_checkpoint(str(newer))  # a new best replaces the copy as a whole
    assert sorted(p.name for p in (tmp_path / "trial" / "best_checkpoint").iterdir()) == ["state.pt"]
    assert (tmp_path / "trial" / "best_checkpoint" / "state.pt").read_bytes() == b"weights-5"
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["best_checkpoint", "checkpoint_000005"]


def test_the_refined_floor_is_drawn_beside_the_estimated_one_and_kept_on_the_panel(summary, space):
    from scoretune.search.plots import Curves, draw_plots

    c = Curves()
    for t in summary.trials:
        c.objective[t.trial_id] = ([1.0, 2.0], [0.1, 0.2])
        c.loss[t.trial_id] = ([1.0, 2.0], [0.6, 0.5])
    figs = draw_plots(summary, space, c, floor=0.2, refined=0.05)
    loss = figs["plots/learning_curves.png"].axes[1]
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert "floor (C^l1)^2/2 = 0.2" in labels and "floor refined from the best model = 0.05" in labels
    assert loss.get_ylim()[0] <= 0.05


# -- seeds: configurations over seeds, paper-style tables
def seeded(loss, beta, pgd, aa, clean=None):
    """One trial per seed of configuration (loss, beta)."""
    return [{"point": {"loss": loss, "beta": beta, "seed": s}, "run": f"{loss}{beta}-{s}",
             "metrics": {"best_val_pgd_acc": p, "aa_acc": a, **({"clean_acc": clean[s]} if clean else {})}}
            for s, (p, a) in enumerate(zip(pgd, aa))]


def test_trials_that_differ_only_in_seed_are_one_configuration_with_mean_std_and_n():
    from scoretune.search.report import config_id, group_by_config

    trials = seeded("se", 3.0, [0.50, 0.52, 0.54], [0.40, 0.44, 0.48], clean=[0.9, 0.8, 0.7]) + \
        seeded("kl", 3.0, [0.55, 0.57], [0.30, 0.31]) + seeded("se", 6.0, [0.45], [0.42])
    rows = group_by_config(trials, ["loss", "beta"])
    assert [(r.config["loss"], r.config["beta"]) for r in rows] == [("se", 3.0), ("se", 6.0), ("kl", 3.0)]  # by AA
    se3 = rows[0].stats
    assert se3["AutoAttack"].mean == pytest.approx(0.44) and se3["AutoAttack"].std == pytest.approx(0.04)
    assert se3["PGD"].n == 3 and se3["PGD"].std == pytest.approx(0.02)
    assert se3["clean"].mean == pytest.approx(0.8) and se3["clean"].std == pytest.approx(0.1)
    assert rows[1].stats["AutoAttack"].std == 0.0 and rows[1].stats["AutoAttack"].n == 1
    assert rows[2].stats["clean"] is None and rows[2].stats["PGD"].mean == pytest.approx(0.56)
    assert len({config_id(t["point"]) for t in trials if t["point"]["loss"] == "se" and t["point"]["beta"] == 3.0}) == 1
    assert len({config_id(t["point"]) for t in trials}) == 3


def test_report_tables_in_md_csv_and_latex_carry_the_same_numbers_and_bold_the_best_row():
    from scoretune.search.report import format_groups, group_by_config

    rows = group_by_config(seeded("se", 3.0, [0.50, 0.52], [0.40, 0.44]) + seeded("kl", 3.0, [0.6, 0.6], [0.3, 0.3]),
                           ["loss"])
    md = format_groups(rows, ["loss"], "md").splitlines()
    assert md[0] == "| loss | clean (%) | PGD (%) | AutoAttack (%) |"
    assert md[2] == "| **se** | **-** | **51.00 ± 1.41 (2)** | **42.00 ± 2.83 (2)** |"
    assert md[3] == "| kl | - | 60.00 ± 0.00 (2) | 30.00 ± 0.00 (2) |"
    csv = format_groups(rows, ["loss"], "csv").splitlines()
    assert csv[0] == "loss,clean_mean,clean_std,clean_n,PGD_mean,PGD_std,PGD_n,AutoAttack_mean,AutoAttack_std,AutoAttack_n"
    assert csv[1].split(",")[4:] == ["0.510000", "0.014142", "2", "0.420000", "0.028284", "2"]
    latex = format_groups(rows, ["loss"], "latex")
    assert "\\textbf{se} & \\textbf{-} & \\textbf{$51.00 \\pm 1.41$ (2)} & \\textbf{$42.00 \\pm 2.83$ (2)} \\\\" in latex
    assert latex.startswith("\\begin{tabular}{lccc}") and latex.endswith("\\end{tabular}")


def test_scoretune_report_reads_a_seeded_search_from_mlflow(tmp_path, capsys):
    from mlflow.entities import Metric, Param

    from scoretune import cli
    from scoretune.tracking import client, get_or_create_experiment, tags

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = client(uri)
    exp = get_or_create_experiment(cl, "seeded")
    parent = cl.create_run(exp, tags={tags.KIND: "search", tags.SEARCH: "seeded"}).info.run_id
    cl.log_batch(parent, params=[Param("space.loss", "choice(se, kl)"), Param("space.seed", "choice(0, 1)")])
    for loss, seed, aa, status in [("se", 0, 0.40, "completed"), ("se", 1, 0.44, "completed"),
                                   ("kl", 0, 0.30, "completed"), ("kl", 1, 0.99, "failed")]:
        run = cl.create_run(exp, tags={tags.PARENT: parent, tags.TRIAL: f"{loss}{seed}", tags.STATUS: status})
        cl.log_batch(run.info.run_id, params=[Param("loss", loss), Param("seed", str(seed))],
                     metrics=[Metric("aa_acc", aa, 0, 0), Metric("best_val_pgd_acc", aa + 0.1, 0, 0)])
    assert cli.main(["report", "--search", "seeded", "--tracking-uri", uri, "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("loss,clean_mean")
    assert out[1].split(",")[7:] == ["0.420000", "0.028284", "2"] and out[1].startswith("se,")
    assert out[2].split(",")[7:] == ["0.300000", "0.000000", "1"]  # the failed seed is left out
    assert cli.main(["report", "--search", "seeded", "--tracking-uri", uri, "--by", "beta"]) != 0
    err = capsys.readouterr().err
    assert "--by: beta is not a searched param of 'seeded' (searched: loss, seed)" in err and err.count("\n") == 1


def test_configurations_without_autoattack_rank_after_those_with_it_then_by_pgd():
    from scoretune.search.report import group_by_config

    no_aa = [{"point": {"loss": loss, "seed": 0}, "run": loss, "metrics": {"best_val_pgd_acc": pgd}}
             for loss, pgd in (("js", 0.5), ("l1", 0.7))]
    rows = group_by_config(seeded("se", 3.0, [0.2], [0.1]) + no_aa, ["loss"])
    assert [r.config["loss"] for r in rows] == ["se", "l1", "js"]
