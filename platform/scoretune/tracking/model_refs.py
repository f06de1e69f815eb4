"""Model references: resolve what ``scoretune evaluate MODEL`` names and load it, never unpickling.

:func:`load_model` takes a scoretune checkpoint, a RobustBench-style export (``scoretune.export``),
an MLflow run id / ``runs:/<id>/model``, or a ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` /
``models:/m-<id>`` URI (``REF_HELP``). What the model was trained on (dataset, eps, norm, val split)
comes from the checkpoint's config, the export's sidecar, or the MLflow run's ``config.json``
artifact validated as :class:`~scoretune.config.ExperimentConfig` (:func:`run_training_config`).

Nothing in the store runs code. An MLflow model is accepted only as a torch.export ('pt2')
program (:func:`load_pt2_model`; a 'pickle' one is refused with :class:`PickleModelError`), and
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is set to ``false`` before MLflow's loader runs. A run's
checkpoint artifact is read with ``torch.load(weights_only=True)`` (``engine.load_checkpoint``).

Loading a pt2 program gives a ``GraphModule`` on which ``.eval()`` raises ``NotImplementedError``. It
was exported in eval mode (BatchNorm uses running statistics: verified on the graph), so it is
wrapped in :class:`ExportedModel`, whose ``eval()`` is a no-op and whose ``train()`` refuses.
Gradients with respect to the input flow through it. MLflow is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..engine import CheckpointError, checkpoint_config, load_checkpoint, model_from_checkpoint
from ..errors import UserError
from ..models import ModelSizeError
from . import client as make_client
from . import forbid_pickle, mlflow_error, resolve_tracking_uri

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
REF_HELP = ("a checkpoint file (.pt), a RobustBench export (.pt with its .json sidecar), an MLflow run id, "
            "runs:/<run_id>/model, models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-<model_id>")


class ExportedModel(nn.Module):
    """A torch.export ``GraphModule`` (MLflow's PyTorch flavour) usable like a normal eval-mode model.

    The graph was traced in eval mode (BatchNorm on running statistics, no dropout), so ``eval()``
    only sets the flag; ``train()`` refuses, since a traced graph cannot switch to training.
    """

    def __init__(self, graph: nn.Module):
        super().__init__()
        _check_exported_eval(graph)
        self.graph = graph
        self.training = False
        object.__setattr__(graph, "training", False)

    def train(self, mode: bool = True) -> "ExportedModel":
        if mode:
            raise RuntimeError("an exported (MLflow) model is frozen in eval mode and cannot be trained; "
                               "train from the run's checkpoint instead")
        self.training = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def _check_exported_eval(graph: nn.Module) -> None:
    g = getattr(graph, "graph", None)
    if g is None:
        return
    for node in g.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        training = None
        if "batch_norm" in name and "no_training" not in name:
            training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
        elif "dropout" in name:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        if training is True:
            raise UserError(f"the logged model was exported in training mode ({name}); re-log it after "
                            "net.eval() (scoretune train does this)")


@dataclass
class LoadedModel:
    """A model to evaluate and what is known about it.

    ``kind``: ``checkpoint`` | ``robustbench`` | ``mlflow``. ``run_id``: the MLflow run the model
    came from (metrics are logged there), None for files. ``dataset``/``eps``/``norm``/``val_size``/
    ``data_seed``/``data_root``: defaults from the training config (None when unknown).
    ``spec``: the architecture spec (``engine.model_spec``) when known.
    """

    net: nn.Module
    ref: str
    kind: str
    run_id: str | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None
    dataset: str | None = None
    eps: float | None = None
    norm: str | None = None
    val_size: float | None = None
    data_seed: int | None = None
    data_root: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] | None = None


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
REF_HELP = ("a checkpoint file (.pt), a RobustBench export (.pt with its .json sidecar), an MLflow run id, "
            "runs:/<run_id>/model, models:/NAME@ALIAS, models:/NAME/VERSION or models:/m-<model_id>")


def _apply_config(loaded: LoadedModel, cfg: Any) -> None:
    loaded.dataset = cfg.data.name
    loaded.eps, loaded.norm = float(cfg.attack.eps), cfg.attack.norm
    loaded.val_size, loaded.data_seed = float(cfg.data.val_size), int(cfg.seed)
    loaded.data_root, loaded.data_options = cfg.data.root, dict(cfg.data.options)


def _load_checkpoint_ref(ref: str, device: torch.device) -> LoadedModel:
    state = load_checkpoint(ref)  # torch.load(weights_only=True): no unpickling of objects
    try:
        checkpoint_config(state, ref)  # a stored config that does not validate: named field, one line
        net, cfg = model_from_checkpoint(state, device=device)
        spec = json.loads(state["model_spec"])
    except CheckpointError:
        raise
    except ModelSizeError as e:
        raise CheckpointError(f"{ref}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a checkpoint of another format / version
        raise CheckpointError(f"{ref} is not a usable scoretune checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    loaded = LoadedModel(net=net, ref=ref, kind="checkpoint", spec=spec)
    _apply_config(loaded, cfg)
    loaded.dataset = spec.get("dataset", loaded.dataset)
    return loaded


def load_model(ref: str, device: torch.device | str = "cpu", *, tracking_uri: str | None = None) -> LoadedModel:
    """Load the model ``ref`` points at (see ``REF_HELP``) onto ``device``, in eval mode.

    Files win over run ids. Raises :class:`~scoretune.engine.CheckpointError` for a missing or
    corrupt file, :class:`PickleModelError` for a pickle-format MLflow model and :class:`UserError`
    for a reference that names nothing.
    """
    device = torch.device(device)
    ref = str(ref)
    p = Path(ref).expanduser()
    if not ref.startswith(("models:/", "runs:/")) and p.exists():
        if p.is_dir():
            raise CheckpointError(f"{ref} is a directory; pass a checkpoint file such as {p / 'best.pt'}")
        from ..export import is_robustbench_export, load_robustbench, read_sidecar

        if is_robustbench_export(p):
            side = read_sidecar(p)
            net = load_robustbench(p, device=device)
            spec = side.get("model_spec") or {}
            return LoadedModel(net=net, ref=ref, kind="robustbench", spec=spec,
                               dataset=spec.get("dataset"), eps=side.get("eps"), norm=side.get("norm"))
        return _load_checkpoint_ref(str(p), device)
    if ref.startswith(("models:/", "runs:/")) or _RUN_ID.match(ref):
        return _load_mlflow_ref(ref, device, tracking_uri)
    if p.suffix in (".pt", ".pth", ".ckpt") or os.sep in ref:
        raise CheckpointError(f"checkpoint not found: {ref}")
    raise UserError(f"unknown model reference '{ref}': expected {REF_HELP}")


def _resolve_run_of_model_uri(client: Any, uri: str) -> str | None:
    """The source run id of a ``models:/`` URI (registered version or logged model)."""
    rest = uri[len("models:/"):].strip("/")
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        return client.get_logged_model(rest).source_run_id
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    name, _, version = rest.partition("/")
    if not version:
        raise UserError(f"model URI '{uri}' names no version: use models:/{name}@ALIAS or models:/{name}/VERSION")
    if version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise UserError(f"registered model '{name}' has no versions")
        return max(versions, key=lambda v: int(v.version)).run_id
    if not version.isdigit():
        raise UserError(f"model URI '{uri}': stages are not supported; use models:/{name}@ALIAS or a version number")
    return client.get_model_version(name, version).run_id


def _load_mlflow_ref(ref: str, device: torch.device, tracking_uri: str | None) -> LoadedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    where = f"in the MLflow store {uri} (pass --tracking-uri to use another)"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"cannot resolve '{ref}': the MLflow store {uri} does not exist "
                        "(pass --tracking-uri, or run from the directory that holds mlflow.db)")
    cl = make_client(uri)
    mlflow.set_tracking_uri(uri)
    try:
        if ref.startswith("models:/"):
            run_id, model_uri = _resolve_run_of_model_uri(cl, ref), ref
        elif ref.startswith("runs:/"):
            run_id = ref[len("runs:/"):].split("/", 1)[0]
            model_uri = ref if "/" in ref[len("runs:/"):].strip("/") else f"runs:/{run_id}/model"
        else:
            run_id, model_uri = ref, f"runs:/{ref}/model"
        run = cl.get_run(run_id) if run_id else None
    except MlflowException as e:
        raise UserError(f"cannot resolve '{ref}' {where}: {mlflow_error(e)}") from None
    loaded = LoadedModel(net=nn.Identity(), ref=ref, kind="mlflow", run_id=run_id, model_uri=model_uri,
                         tracking_uri=uri)
    if run is not None:
        cfg = run_training_config(run)
        if cfg is not None:
            _apply_config(loaded, cfg)
        else:
            _apply_run_params(loaded, run.data.params)
    try:
        net = load_pt2_model(model_uri)
    except PickleModelError:
        raise
    except Exception as e:  # noqa: BLE001 - no logged model in the run: fall back to its checkpoint
        net = _checkpoint_artifact(cl, run_id, loaded, device) if run_id and not ref.startswith("models:/") else None
        if net is None:
            raise UserError(f"cannot load the model '{model_uri}' {where}: {mlflow_error(e)}") from None
        loaded.net = net
        return loaded
    if not isinstance(net, nn.Module):
        raise UserError(f"'{model_uri}' is not a PyTorch model (got {type(net).__name__})")
    try:
        net.eval()
    except NotImplementedError:  # torch.export GraphModule
        net = ExportedModel(net)
    loaded.net = net.to(device)
    return loaded


def run_training_config(run: Any) -> Any | None:
    """The run's ``config.json`` artifact as an :class:`~scoretune.config.ExperimentConfig`, or None
    when the run has none (not a scoretune train run) or it does not validate."""
    import mlflow.artifacts

    from ..config import ExperimentConfig

    try:
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.json")
    except Exception:  # noqa: BLE001 - no such artifact
        return None
    try:
        return ExperimentConfig.model_validate_json(text)
    except ValueError:
        return None


def _apply_run_params(loaded: LoadedModel, params: dict[str, str]) -> None:
    """The one fallback for a run without ``config.json`` (e.g. logged by hand): its flat params."""

    def value(k: str, cast: Any = str) -> Any:
        v = params.get(k)
        if v in (None, "", "None"):
            return None
        try:
            return cast(v)
        except ValueError:
            return None

    loaded.dataset, loaded.norm, loaded.data_root = value("data.name"), value("attack.norm"), value("data.root")
    loaded.eps, loaded.val_size, loaded.data_seed = value("attack.eps", float), value("data.val_size", float), \
        value("seed", int)


def _checkpoint_artifact(cl: Any, run_id: str, loaded: LoadedModel, device: torch.device) -> nn.Module | None:
    """The run's ``checkpoints/best.pt`` (else ``last.pt``) artifact as a model, or None."""
    try:
        names = [Path(a.path).name for a in cl.list_artifacts(run_id, "checkpoints")]
    except Exception:  # noqa: BLE001
        return None
    for name in ("best.pt", "last.pt"):
        if name in names:
            with tempfile.TemporaryDirectory(prefix="scoretune-eval-") as d:
                local = cl.download_artifacts(run_id, f"checkpoints/{name}", d)
                ck = _load_checkpoint_ref(local, device)
            loaded.spec = ck.spec
            return ck.net
    return None


class PickleModelError(UserError):
    """A logged model stored with pickle: loading it could run arbitrary code, so it is refused."""


def load_pt2_model(model_uri: str) -> nn.Module:
    """Load an MLflow PyTorch model only if it is a torch.export ('pt2') program; never unpickle.

    MLflow's pytorch flavour does not name its serialization format in ``MLmodel``: the format is
    the file in the flavour's ``model_data`` folder, ``model.pth`` (+ ``pickle_module_info.txt``)
    for 'pickle' (``torch.load`` of a whole pickled module: runs code) and ``model.pt2`` for 'pt2'
    (``torch.export.save``). The model is downloaded, its ``MLmodel`` read with :mod:`scoretune.safe_yaml`,
    and anything but a pt2 program without ``code_paths`` (which MLflow would put on ``sys.path``)
    is refused before MLflow's loader runs; that loader then runs with
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, so it also checks the pt2 archive is pickle-free.
    """
    import mlflow.artifacts
    import mlflow.pytorch

    from ..safe_yaml import YamlError, read

    forbid_pickle()
    with tempfile.TemporaryDirectory(prefix="scoretune-model-") as d:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=d))
        try:
            flavor = (read(local / "MLmodel") or {})["flavors"]["pytorch"]
        except (KeyError, TypeError, YamlError):
            raise UserError(f"'{model_uri}' is not an MLflow PyTorch model (no pytorch flavour in its MLmodel "
                            "file); log it with scoretune train / mlflow.pytorch.log_model") from None
        data = local / str(flavor.get("model_data") or "data")
        if (data / "model.pth").exists() or not (data / "model.pt2").is_file():
            raise PickleModelError(
                f"refusing to load '{model_uri}': it is stored in MLflow's 'pickle' format, and unpickling "
                "can run arbitrary code; re-log it in the torch.export format (scoretune train does, or "
                "mlflow>=3 mlflow.pytorch.log_model(net.eval(), name=..., input_example=x, "
                "serialization_format='pt2'))")
        if flavor.get("code"):
            raise PickleModelError(f"refusing to load '{model_uri}': it ships code_paths ({flavor['code']}) that "
                                   "MLflow would put on sys.path; re-log it without code_paths")
        return mlflow.pytorch.load_model(str(local))
