"""The built-in teachers, small Llamas shipped in the package (loadable with AutoModelForCausalLM / AutoTokenizer,
offline): ``builtin`` in ``teacher/``, trained by ``train_teacher.py`` on the task suite of ``tasks.py``, and
``builtin-reasoner`` in ``reasoner/``, trained by ``train_reasoner.py`` (SFT, then expert iteration) on the worked
traces of ``reasoner_tasks.py``."""

from pathlib import Path
from types import ModuleType

from ckaqad_cli.settings import BUILTIN, BUILTIN_REASONER

TEACHER_DIR = Path(__file__).resolve().parent / "teacher"
REASONER_DIR = Path(__file__).resolve().parent / "reasoner"
TEACHER_DIRS = {BUILTIN: TEACHER_DIR, BUILTIN_REASONER: REASONER_DIR}
"""Each built-in teacher's directory, by its --teacher name (settings.BUILTIN_TEACHERS)."""


def suite(name: str) -> ModuleType:
    """The task suite of the built-in teacher ``name``: a module with ``generate(split, n, seed)`` and
    ``evaluate(model, tokenizer, problems)``."""
    if name == BUILTIN_REASONER:
        from ckaqad_cli.builtin import reasoner_tasks

        return reasoner_tasks
    from ckaqad_cli.builtin import tasks

    return tasks
