"""The built-in teacher: a small Llama trained by ``train_teacher.py`` on the procedurally generated task suite of
``tasks.py``, shipped in ``teacher/`` (loadable with AutoModelForCausalLM / AutoTokenizer, offline)."""

from pathlib import Path

TEACHER_DIR = Path(__file__).resolve().parent / "teacher"
