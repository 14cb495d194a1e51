"""``ckaqad plan``: which quantization units stay in BF16 under a bit budget.

units.py (what must share a format, and its bytes in each), switch.py (turning one unit's fake quantization on and off
in one model), sensitivity.py (per-unit CKA, KL and gradient scores), budget.py (the chooser), evaluate.py (uniform
NVFP4 against a plan: layer CKA, KL, task accuracy), report.py (report.json / report.md / plan.png and the tables),
recorded.py (the finished plan of a run, for distill and pack). docs/plan.md explains the method.
"""
