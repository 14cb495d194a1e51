"""lm-evaluation-harness tasks for ``ckaqad diagnose --lm-eval-tasks``: the specs checked and turned into a plan
before any model loads (harness task names, local task YAMLs, multiple-choice JSONL files), and the harness's
results read back as {metric: {"value", "stderr"}}. lm_eval itself is imported only by :func:`plan_lm_eval`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import yaml

from ckaqad_cli.data import jsonl_rows
from ckaqad_cli.errors import CkaqadError

CHOICE_FIELDS = ("query", "choices", "gold")
"""A multiple-choice JSONL task file: one {"query": prompt, "choices": [continuations], "gold": index} per line."""


class _HarnessYaml(yaml.SafeLoader):
    """A safe loader for harness task YAMLs: their ``!function`` tags (Python hooks) read as None."""


_HarnessYaml.add_multi_constructor("!", lambda _loader, _suffix, _node: None)


@dataclass
class LmEvalPlan:
    """What lm-evaluation-harness runs on every model: task names and configs, and the index that knows them."""

    tasks: list[str | dict]
    manager: object  # lm_eval.tasks.TaskManager
    files: list[str]  # the local task files, recorded as stage inputs


def _yaml_task_name(path: Path) -> str:
    try:
        config = yaml.load(path.read_text(), Loader=_HarnessYaml)  # a SafeLoader subclass
    except (OSError, yaml.YAMLError) as e:
        raise CkaqadError(f"cannot read lm-eval task {path}: {str(e).splitlines()[0]}") from None
    config = config if isinstance(config, dict) else {}
    name = config.get("task")
    if not isinstance(name, str):  # a group YAML lists its tasks under `task:`
        name = config.get("group")
    if not isinstance(name, str):
        raise CkaqadError(f"lm-eval task {path} has no `task:` (or `group:`) name")
    return name


def _is_choice_item(item: object) -> bool:
    if not isinstance(item, dict):
        return False
    choices, gold = item.get("choices"), item.get("gold")
    return (isinstance(item.get("query"), str) and isinstance(choices, list) and bool(choices)
            and all(isinstance(c, str) for c in choices) and type(gold) is int and 0 <= gold < len(choices))


def _choice_task(path: Path) -> dict:
    """A harness multiple-choice task config for a JSONL file of CHOICE_FIELDS items: the prompt is the query, each
    choice is scored as its exact continuation (no separator added), metrics acc and acc_norm."""
    items = 0
    for number, item in jsonl_rows(path):
        if not _is_choice_item(item):
            raise CkaqadError(f'{path} line {number}: each line must be {{"query": text, "choices": [texts], '
                              '"gold": index of the right choice}')
        items += 1
    if not items:
        raise CkaqadError(f"lm-eval task file {path} holds no items")
    query, choices, gold = CHOICE_FIELDS
    return {
        "task": path.stem,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": query,
        "doc_to_choice": choices,
        "doc_to_target": gold,
        "target_delimiter": "",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }


def plan_lm_eval(specs: list[str]) -> LmEvalPlan | None:
    """Check ``--lm-eval-tasks`` before any model loads (lm_eval must be installed): harness task names, local task
    YAMLs (their folder joins the harness's index, whose built-in tasks are left out when every task is local) and
    multiple-choice JSONL files. A spec is a file when it ends in .yaml, .yml or .jsonl or holds a "/"."""
    if not specs:
        return None
    from lm_eval.tasks import TaskManager

    tasks: list[str | dict] = []
    names, include, files = [], [], []
    for spec in specs:
        path = Path(spec)
        if path.suffix not in (".yaml", ".yml", ".jsonl") and "/" not in spec:
            names.append(spec)
            tasks.append(spec)
            continue
        if not path.is_file():
            raise CkaqadError(f"lm-eval task file {spec} does not exist")
        if path.suffix == ".jsonl":
            tasks.append(_choice_task(path))
        elif path.suffix in (".yaml", ".yml"):
            include.append(str(path.resolve().parent))
            names.append(_yaml_task_name(path))
            tasks.append(names[-1])
        else:
            raise CkaqadError(f"--lm-eval-tasks takes task names, task .yaml files and .jsonl files; got {spec}")
        files.append(spec)
    manager = TaskManager(include_path=sorted(set(include)) or None, include_defaults=len(names) > len(include))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise CkaqadError(f"lm-evaluation-harness knows no task {', '.join(unknown)}")
    return LmEvalPlan(tasks, manager, files)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, numbers.Real) else None  # numpy scalars too; "N/A" -> None


def harness_metrics(values: dict) -> dict:
    """{metric: {"value", "stderr"}} from one task's harness results ("acc,none", "acc_stderr,none", ...). A filter
    other than "none" stays in brackets ("exact_match (strict-match)"); a stderr the harness has not ("N/A") is None."""
    out = {}
    for key, value in values.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric.endswith("_stderr"):
            continue
        name = metric if filt == "none" else f"{metric} ({filt})"
        out[name] = {"value": _number(value), "stderr": _number(values.get(f"{metric}_stderr,{filt}"))}
    return out
